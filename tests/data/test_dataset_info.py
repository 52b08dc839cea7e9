import json
import os

import pytest

from retain.data.dataset_info import load_dataset_info, load_examples
from retain.errors import RetainError


def _write(path, content):
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


@pytest.fixture
def data_dir(tmp_path):
    _write(tmp_path / "qa.json", [{"instruction": "Q", "input": "", "output": "A"}])
    _write(
        tmp_path / "chat.jsonl",
        '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}\n',
    )
    (tmp_path / "parts").mkdir()
    _write(tmp_path / "parts" / "a.json", [{"q": "1", "a": "one"}])
    _write(tmp_path / "parts" / "b.jsonl", '{"q": "2", "a": "two"}\n\n{"q": "3", "a": "three"}\n')
    info = {
        "qa": {"file_name": "qa.json"},
        "chat": {"file_name": "chat.jsonl", "formatting": "sharegpt"},
        "parts": {"file_name": "parts", "columns": {"prompt": "q", "response": "a"}},
        "first_two": {"file_name": "parts", "columns": {"prompt": "q", "response": "a"}, "num_samples": 2},
        "hub_only": {"hf_hub_url": "org/data"},
        "missing": {"file_name": "nope.json"},
        "bad_format": {"file_name": "qa.json", "formatting": "sharegtp"},
        "prefs": {"file_name": "qa.json", "ranking": True},
        "wrong_columns": {"file_name": "qa.json", "columns": {"response": "answer"}},
    }
    _write(tmp_path / "dataset_info.json", info)
    return str(tmp_path)


def test_load_by_name(data_dir):
    (example,) = load_examples("qa", data_dir)
    assert example.messages == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert example.meta["dataset"] == "qa" and example.meta["source"].endswith("qa.json")
    (chat,) = load_examples("chat", data_dir)
    assert chat.reference == "Yo"


def test_folder_entry_columns_and_num_samples(data_dir):
    assert [e.reference for e in load_examples("parts", data_dir)] == ["one", "two", "three"]
    assert len(load_examples("first_two", data_dir)) == 2


def test_load_by_path_guesses_format(data_dir):
    assert load_examples(os.path.join(data_dir, "qa.json"))[0].reference == "A"
    assert load_examples(os.path.join(data_dir, "chat.jsonl"))[0].reference == "Yo"
    assert load_examples("chat.jsonl", data_dir)[0].reference == "Yo"


def test_openai_style_messages_file(tmp_path):
    path = _write(
        tmp_path / "m.json",
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}],
    )
    assert load_examples(path)[0].messages[1] == {"role": "assistant", "content": "Yo"}


def test_json_lines_under_json_name(tmp_path):
    path = _write(
        tmp_path / "lines.json", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n'
    )
    assert [e.reference for e in load_examples(path)] == ["b", "d"]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("qaa", r"dataset_info.json: no dataset named 'qaa' \(did you mean: qa.*available: bad_format"),
        ("hub_only", r"dataset_info.json: dataset 'hub_only' is only on a hub.*offline.*file_name"),
        ("missing", r"nope.json does not exist"),
        ("bad_format", r"dataset_info.json: .*formatting 'sharegtp' \(did you mean: sharegpt"),
        ("prefs", r"dataset_info.json: .*preference data"),
        ("wrong_columns", r"qa.json: record 0 has no column 'answer'"),
    ],
)
def test_entry_errors(data_dir, spec, match):
    with pytest.raises(RetainError, match=match):
        load_examples(spec, data_dir)


def test_file_errors(tmp_path):
    bad = _write(tmp_path / "bad.json", '[\n  {"instruction": "a",\n  "output": }\n]')
    with pytest.raises(RetainError, match=r"bad.json: invalid JSON at line 3, column 13"):
        load_examples(bad)
    bad_lines = _write(tmp_path / "bad.jsonl", '{"instruction": "a", "output": "b"}\n{oops}\n')
    with pytest.raises(RetainError, match=r"bad.jsonl: invalid JSON at line 2"):
        load_examples(bad_lines)
    empty = _write(tmp_path / "empty.json", "[]")
    with pytest.raises(RetainError, match=r"empty.json holds no records"):
        load_examples(empty)
    with pytest.raises(RetainError, match=r"absent.json does not exist"):
        load_examples(str(tmp_path / "absent.json"))
    not_list = _write(tmp_path / "obj.json", '{"data": []}')
    with pytest.raises(RetainError, match=r"obj.json: expected a list of records"):
        load_examples(not_list)
    scalars = _write(tmp_path / "scalars.json", "[1, 2]")
    with pytest.raises(RetainError, match=r"scalars.json: record 0 is a int"):
        load_examples(scalars)


def test_dataset_info_errors(tmp_path):
    with pytest.raises(RetainError, match=r"dataset_info.json does not exist"):
        load_dataset_info(str(tmp_path))
    _write(tmp_path / "dataset_info.json", '{"a": {"file_name": "x.json",}}')
    with pytest.raises(RetainError, match=r"dataset_info.json: invalid JSON at line 1, column 30"):
        load_dataset_info(str(tmp_path))
    with pytest.raises(RetainError, match=r"no dataset_dir"):
        load_examples("some_name")


def test_empty_named_dataset(tmp_path):
    _write(tmp_path / "e.jsonl", "\n")
    _write(tmp_path / "dataset_info.json", {"e": {"file_name": "e.jsonl"}})
    with pytest.raises(RetainError, match=r"dataset 'e' .*e.jsonl.* holds no records"):
        load_examples("e", str(tmp_path))


def test_llamafactory_demo_data(shared_data):
    folder = os.path.join(shared_data, "llamafactory")
    alpaca = load_examples("alpaca_en_demo", folder)
    assert len(alpaca) == 999 and alpaca[0].messages[0]["role"] == "user"
    identity = load_examples("identity", folder)
    assert identity[0].messages[0]["content"] == "hi"
    tools = load_examples("glaive_toolcall_en_demo", folder)
    assert len(tools) == 300 and all(e.messages[-1]["role"] == "assistant" for e in tools)
    assert "tools" in tools[0].meta
    mllm = load_examples("mllm_demo", folder)
    assert mllm[0].meta["images"] and len(mllm[0].messages) == 4
    with pytest.raises(RetainError, match="only on a hub"):
        load_examples("alpaca_en", folder)


def test_easycl_absa_task(shared_data):
    folder = os.path.join(shared_data, "easycl_benchmarks", "benchmark", "ABSACL_ATSC")
    train = load_examples("CanonG3", folder)
    test = load_examples("CanonG3_test", folder)
    assert train and test
    assert {e.reference for e in train} <= {"positive", "negative", "neutral", "conflict"} or train[
        0
    ].reference
    assert "term:" in train[0].messages[0]["content"]
