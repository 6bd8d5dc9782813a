"""Reading data: every format and source, and errors that name file:line, the field and the fix."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from posttrain.config import DataConfig
from posttrain.data.formats import load_dataset
from posttrain.errors import UserError
from posttrain.types import ChatExample, KTOExample, PreferencePair, PromptCompletionExample, PromptExample


def _load(path, **kwargs):
    return load_dataset(DataConfig(path=str(path), **kwargs), where="data")


def _error(path, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        _load(path, **kwargs)
    return info.value.render()


def test_formats_are_detected_from_fields(tmp_path, write_jsonl):
    cases = {
        "text": ({"text": "hello"}, "text"),
        "pc": ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        "msgs": ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
        "pref": ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
        "kto": ({"prompt": "a", "completion": "b", "label": True}, "kto"),
        "prompt": ({"prompt": "a", "answer": 3, "level": 2}, "prompt"),
    }
    for name, (row, fmt) in cases.items():
        data = _load(write_jsonl(tmp_path / f"{name}.jsonl", [row]))
        assert data.format == fmt
    prompt = _load(tmp_path / "prompt.jsonl").examples[0]
    assert isinstance(prompt, PromptExample) and prompt.answer == "3" and prompt.extra == {"level": 2}


def test_conversational_preference_with_implicit_prompt(tmp_path, write_jsonl):
    user = {"role": "user", "content": "hi"}
    row = {"chosen": [user, {"role": "assistant", "content": "good"}],
           "rejected": [user, {"role": "assistant", "content": "bad"}]}
    pair = _load(write_jsonl(tmp_path / "p.jsonl", [row])).examples[0]
    assert isinstance(pair, PreferencePair)
    assert pair.prompt == [user] and pair.chosen[0]["content"] == "good" and pair.rejected[0]["content"] == "bad"


def test_json_csv_parquet_txt_and_gzip_sources(tmp_path):
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.csv").write_text("prompt,completion\np1,c1\np2,c2\n")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for name in ("a.json", "a.csv", "a.jsonl.gz", "a.parquet"):
        data = _load(tmp_path / name)
        assert [e.completion for e in data.examples] == ["c1", "c2"], name
        assert isinstance(data.examples[0], PromptCompletionExample)
    (tmp_path / "a.txt").write_text("doc one\nline two\n\n\ndoc two\n")
    texts = [e.text for e in _load(tmp_path / "a.txt").examples]
    assert texts == ["doc one\nline two", "doc two"]


def test_sharegpt_messages_and_renamed_columns(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "q"},
                                                                 {"from": "gpt", "value": "a"}]}])
    data = _load(path, fields={"messages": "conversations"})
    assert isinstance(data.examples[0], ChatExample)
    assert data.examples[0].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_kto_labels_accept_strings(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "p", "completion": "c", "label": "false"}])
    example = _load(path).examples[0]
    assert isinstance(example, KTOExample) and example.label is False


# ------------------------------------------------------------------ bad input


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken"\n')
    message = _error(path)
    assert f"{path}:2" in message and "malformed JSON" in message and "fix:" in message


def test_missing_field_wrong_type_and_empty_completion(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "a", "completion": "fine"},
        {"prompt": 5, "completion": "x"},
        {"prompt": "a", "completion": "   "},
    ])
    message = _error(path, format="prompt_completion")
    assert f"{path}:2 field 'prompt': must be a string" in message
    assert f"{path}:3 field 'completion': empty" in message
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    assert f"{path}:2 field 'completion': missing" in _error(path)


def test_bad_rows_can_be_dropped_and_are_counted(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""}])
    data = _load(path, on_bad_row="drop")
    assert len(data.examples) == 1 and sum(data.report.dropped.values()) == 1


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    message = _error(path)
    assert f"{path}:2" in message and "UTF-8" in message


def test_empty_dataset_missing_file_unreadable_file_and_bad_message(tmp_path, write_jsonl):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert "the dataset is empty" in _error(tmp_path / "empty.jsonl")
    assert "does not exist" in _error(tmp_path / "nope.jsonl")
    (tmp_path / "folder.jsonl").mkdir()  # unreadable as a file, whoever we run as
    assert "is a directory" in _error(tmp_path / "folder.jsonl")
    locked = write_jsonl(tmp_path / "locked.jsonl", [{"text": "x"}])
    os.chmod(locked, 0)
    try:
        if not os.access(locked, os.R_OK):  # root reads mode-000 files; other users get the error
            assert "permission denied" in _error(locked)
    finally:
        os.chmod(locked, 0o644)
    path = write_jsonl(tmp_path / "roles.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    assert "unknown role 'robot'" in _error(path)


def test_mixed_plain_and_conversational_preference_row(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "mix.jsonl", [
        {"prompt": "plain", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "y"}])
    assert "mixes plain text and conversational" in _error(path)


def test_stage_that_needs_another_format_says_so(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(UserError) as info:
        load_dataset(DataConfig(path=str(path)), where="stages.sft.data", expect=("messages",))
    assert "holds 'text' rows" in info.value.render()
