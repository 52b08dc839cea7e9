import pytest

from retain.data.formats import OPENAI_TAGS, parse_alpaca, parse_sharegpt
from retain.errors import RetainError


def test_alpaca_joins_instruction_and_input():
    example = parse_alpaca({"instruction": "Add", "input": "2 3", "output": "5"}, {}, "a.json", 0)
    assert example.messages == [
        {"role": "user", "content": "Add\n2 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert example.system is None
    assert example.meta == {"source": "a.json", "index": 0}


def test_alpaca_empty_input_history_and_system():
    record = {
        "instruction": "And now?",
        "input": "",
        "output": "Bye",
        "system": "Be brief.",
        "history": [["Hi", "Hello"], ["How are you?", "Fine"]],
    }
    example = parse_alpaca(record, {}, "a.json", 1)
    assert [m["content"] for m in example.messages] == [
        "Hi",
        "Hello",
        "How are you?",
        "Fine",
        "And now?",
        "Bye",
    ]
    assert [m["role"] for m in example.messages] == ["user", "assistant"] * 3
    assert example.system == "Be brief."
    assert example.reference == "Bye"


def test_alpaca_column_mapping_and_meta():
    record = {"q": "Question", "ctx": "Context", "a": 7, "imgs": ["x.jpg"]}
    columns = {"prompt": "q", "query": "ctx", "response": "a", "images": "imgs"}
    example = parse_alpaca(record, columns, "a.json", 0)
    assert example.messages[0]["content"] == "Question\nContext"
    assert example.reference == "7"
    assert example.meta["images"] == ["x.jpg"]


def test_alpaca_missing_column_names_file_record_and_fix():
    with pytest.raises(RetainError) as err:
        parse_alpaca({"instruction": "x", "answer": "y"}, {}, "data/my.json", 3)
    message = str(err.value)
    assert "data/my.json" in message and "record 3" in message and "'output'" in message
    assert "answer" in message and '"response"' in message


def test_alpaca_bad_history_and_response():
    with pytest.raises(RetainError, match="f.json.*history turn 0"):
        parse_alpaca({"instruction": "x", "output": "y", "history": [["only one"]]}, {}, "f.json", 0)
    with pytest.raises(RetainError, match="f.json.*must be text"):
        parse_alpaca({"instruction": "x", "output": ["a", "b"]}, {}, "f.json", 0)


def test_sharegpt_default_tags_system_and_tools():
    record = {
        "conversations": [
            {"from": "system", "value": "You are terse."},
            {"from": "human", "value": "Find a recipe"},
            {"from": "function_call", "value": '{"name": "search"}'},
            {"from": "observation", "value": '{"recipes": []}'},
            {"from": "gpt", "value": "None found."},
        ],
        "tools": "[]",
    }
    example = parse_sharegpt(record, {}, {}, "s.json", 0)
    assert example.system == "You are terse."
    assert [m["role"] for m in example.messages] == ["user", "assistant", "user", "assistant"]
    assert example.reference == "None found."
    assert example.meta["tools"] == "[]"


def test_sharegpt_custom_columns_and_tags():
    record = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
        "sys": "S",
    }
    example = parse_sharegpt(record, {"messages": "messages", "system": "sys"}, OPENAI_TAGS, "m.json", 2)
    assert example.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert example.system == "S"


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"from": "human", "value": "a"}], "does not end with an assistant"),
        ([{"from": "gpt", "value": "a"}], "message 0 .*should be a user turn"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "message 1 .*assistant turn"),
        ([{"from": "bot", "value": "a"}], "role 'bot'"),
        ([{"role": "user", "content": "a"}], "no key 'from'.*role_tag"),
        ([], "non-empty list"),
    ],
)
def test_sharegpt_errors_name_file_and_record(messages, match):
    with pytest.raises(RetainError, match=match) as err:
        parse_sharegpt({"conversations": messages}, {}, {}, "chat.json", 5)
    assert "chat.json: record 5" in str(err.value)


def test_sharegpt_missing_messages_column():
    with pytest.raises(RetainError, match="chat.json: record 0 has no column 'conversations'.*\"messages\""):
        parse_sharegpt({"messages": []}, {}, {}, "chat.json", 0)
