"""LLaMA-Factory alpaca / sharegpt records -> one `Example` record (messages, system, images).

Column and tag names follow LLaMA-Factory's dataset_info.json so existing data files load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from retain.data.images import image_list
from retain.errors import RetainError


@dataclass
class Example:
    """One conversation: `messages` alternate user/assistant and end with the assistant turn to learn.

    For evaluation, the prompt is every message but the last and the reference is the last one's content.
    `images` are image file paths, one per `<image>` placeholder in the messages, in order; the parsers
    keep them as the record wrote them and `load_examples` makes them absolute. Text-only data has none.
    """

    messages: list[dict[str, str]]
    system: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Last, so positional Example(messages, system, meta) calls keep working.
    images: list[str] = field(default_factory=list)

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The chat messages given to the model at test time (system first when set)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages[:-1]

    @property
    def chat_messages(self) -> list[dict[str, str]]:
        """The full conversation including the system message, as chat templates expect it."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    @property
    def reference(self) -> str:
        """The expected answer: the content of the last (assistant) message."""
        return self.messages[-1]["content"]

    def to_dict(self) -> dict[str, Any]:
        record = {"messages": self.messages, "system": self.system, "meta": self.meta}
        # Only when present, so text-only records (and saved method states) serialize as before.
        if self.images:
            record["images"] = self.images
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Example:
        return cls(
            messages=record["messages"],
            system=record.get("system"),
            meta=record.get("meta", {}),
            images=list(record.get("images") or []),
        )


# LLaMA-Factory's defaults (data/parser.py): users write dataset_info.json against these names.
ALPACA_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "system": "system",
    "history": "history",
}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system"}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
# OpenAI-style messages ({"role": ..., "content": ...}), used when a plain file's records look like them.
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function_call",
    "system_tag": "system",
}
# Kept as-is in Example.meta: the text pipeline does not use videos, audios or tool schemas yet. Images
# also stay there as written (callers read meta["images"]); Example.images is the checked list to use.
_META_COLUMNS = ("images", "videos", "audios", "tools")


def _column_error(source: str, index: int, record: dict, key: str, column: str) -> RetainError:
    present = ", ".join(sorted(map(str, record))) or "none"
    return RetainError(
        f"{source}: record {index} has no column '{column}' (columns present: {present}); "
        f'set "columns": {{"{key}": "<column name>"}} for this dataset in dataset_info.json'
    )


def _text(value: Any, source: str, index: int, what: str) -> str:
    """Coerce a cell to text; numbers are accepted (labels such as 1 or 0.5), containers are not."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise RetainError(
        f"{source}: record {index} has a {type(value).__name__} in {what}, expected text; "
        "fix the record or map the right column in dataset_info.json"
    )


def _meta(record: dict, columns: dict, source: str, index: int) -> dict[str, Any]:
    meta: dict[str, Any] = {"source": source, "index": index}
    for key in _META_COLUMNS:
        column = columns.get(key, key)
        if record.get(column):
            meta[key] = record[column]
    return meta


def _images(record: dict, columns: dict, source: str, index: int) -> list[str]:
    """The record's image paths from the `images` column (LLaMA-Factory's name unless mapped)."""
    column = columns.get("images", "images")
    return image_list(record.get(column), source, index, column)


def parse_alpaca(record: dict, columns: dict, source: str, index: int) -> Example:
    """Convert one LLaMA-Factory alpaca record (instruction/input/output[/system/history]) to an Example."""
    cols = {**ALPACA_COLUMNS, **(columns or {})}
    for key in ("prompt", "response"):
        if cols[key] not in record:
            raise _column_error(source, index, record, key, cols[key])
    prompt = _text(record[cols["prompt"]], source, index, f"column '{cols['prompt']}'")
    query = _text(record.get(cols["query"]), source, index, f"column '{cols['query']}'")
    # LLaMA-Factory joins instruction and input with one newline, and drops an empty input.
    user = f"{prompt}\n{query}" if query else prompt
    response = record[cols["response"]]
    if response is None or not isinstance(response, (str, int, float)) or isinstance(response, bool):
        raise RetainError(
            f"{source}: record {index} column '{cols['response']}' must be text, "
            f"got {type(response).__name__}; "
            "preference data (chosen/rejected lists) is not supported, use a single response per record"
        )
    messages: list[dict[str, str]] = []
    history = record.get(cols["history"]) or []
    if not isinstance(history, list):
        raise RetainError(
            f"{source}: record {index} column '{cols['history']}' must be a list of [user, assistant] pairs"
        )
    for turn, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RetainError(
                f"{source}: record {index} history turn {turn} must be a [user, assistant] pair, got {pair!r}"
            )
        what = f"history turn {turn}"
        messages.append({"role": "user", "content": _text(pair[0], source, index, what)})
        messages.append({"role": "assistant", "content": _text(pair[1], source, index, what)})
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": _text(response, source, index, "the response")})
    system = _text(record.get(cols["system"]), source, index, f"column '{cols['system']}'") or None
    images = _images(record, cols, source, index)
    return Example(messages=messages, system=system, meta=_meta(record, cols, source, index), images=images)


def parse_sharegpt(record: dict, columns: dict, tags: dict, source: str, index: int) -> Example:
    """Convert one LLaMA-Factory sharegpt record (a list of role-tagged messages) to an Example.

    user/observation turns become role "user", assistant/function_call turns role "assistant"; a leading
    system message (or the system column) becomes `Example.system`. The `images` column (a list of paths,
    or one path) becomes `Example.images`, unresolved; `load_examples` resolves and checks them.
    """
    cols = {**SHAREGPT_COLUMNS, **(columns or {})}
    tag = {**SHAREGPT_TAGS, **(tags or {})}
    if cols["messages"] not in record:
        raise _column_error(source, index, record, "messages", cols["messages"])
    raw = record[cols["messages"]]
    if not isinstance(raw, list) or not raw:
        raise RetainError(
            f"{source}: record {index} column '{cols['messages']}' must be a non-empty list of messages"
        )
    roles = {
        tag["user_tag"]: "user",
        tag["observation_tag"]: "user",
        tag["assistant_tag"]: "assistant",
        tag["function_tag"]: "assistant",
    }
    system = _text(record.get(cols["system"]), source, index, f"column '{cols['system']}'") or None
    messages: list[dict[str, str]] = []
    for position, message in enumerate(raw):
        if not isinstance(message, dict):
            raise RetainError(f"{source}: record {index} message {position} is not an object: {message!r}")
        for key in ("role_tag", "content_tag"):
            if tag[key] not in message:
                keys = ", ".join(sorted(map(str, message)))
                raise RetainError(
                    f"{source}: record {index} message {position} has no key '{tag[key]}' (keys: {keys}); "
                    f'set "tags": {{"{key}": "<key name>", ...}} for this dataset in dataset_info.json'
                )
        role = message[tag["role_tag"]]
        content = _text(message[tag["content_tag"]], source, index, f"message {position}")
        if position == 0 and role == tag["system_tag"]:
            system = content or system
            continue
        if role not in roles:
            raise RetainError(
                f"{source}: record {index} message {position} has role '{role}', expected one of "
                f"{', '.join(map(repr, roles))}; "
                'set "tags" (user_tag, assistant_tag, ...) for this dataset in dataset_info.json'
            )
        expected = "user" if len(messages) % 2 == 0 else "assistant"
        if roles[role] != expected:
            raise RetainError(
                f"{source}: record {index} message {position} ('{role}') should be a {expected} turn; "
                "messages must alternate user/assistant starting with the user; fix or drop this record"
            )
        messages.append({"role": roles[role], "content": content})
    if not messages or messages[-1]["role"] != "assistant":
        raise RetainError(
            f"{source}: record {index} does not end with an assistant turn, so there is nothing to learn; "
            "fix or drop this record"
        )
    images = _images(record, cols, source, index)
    return Example(messages=messages, system=system, meta=_meta(record, cols, source, index), images=images)
