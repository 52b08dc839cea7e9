"""LLaMA-Factory alpaca / sharegpt records -> one `Example` record (messages, system)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    """One conversation: `messages` alternate user/assistant and end with the assistant turn to learn.

    For evaluation, the prompt is every message but the last and the reference is the last one's content.
    """

    messages: list[dict[str, str]]
    system: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

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
        return {"messages": self.messages, "system": self.system, "meta": self.meta}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Example:
        return cls(messages=record["messages"], system=record.get("system"), meta=record.get("meta", {}))
