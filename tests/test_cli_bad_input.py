"""Bad input through the CLI: exit code 2, a short message naming file:line or the key and the fix,
no traceback, and nothing written to the workdir."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.cli import main

MODEL = """    model:
      tokenizer: {tokenizer}
      tiny: {{hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}}
"""


def _recipe(tmp_path: Path, data: str = "{path: data.jsonl}", train: str = "{max_steps: 1}", extra: str = "",
            tokenizer: str = "builtin:demo", kind: str = "sft", model: str | None = None) -> Path:
    text = ("name: bad\nstages:\n  sft:\n"
            f"    kind: {kind}\n" + (model if model is not None else MODEL.format(tokenizer=tokenizer))
            + f"    data: {data}\n    train: {train}\n{extra}")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def _rows(tmp_path: Path, rows: list, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD_ROW = {"prompt": "What is 1 + 1?", "completion": "2"}
CHAT_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _fails(capsys, tmp_path: Path, recipe: Path, *needles: str, overrides: tuple[str, ...] = ()) -> str:
    workdir = tmp_path / "work"
    args = ["run", str(recipe), "--workdir", str(workdir), "--no-progress"]
    for o in overrides:
        args += ["--set", o]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert "fix:" in err, err
    for needle in needles:
        assert needle in err, err
    assert not workdir.exists(), "bad input must leave no partial output"
    return err


def test_malformed_json_line(capsys, tmp_path):
    _rows(tmp_path, [GOOD_ROW, '{"prompt": "x", "completion": '])
    _fails(capsys, tmp_path, _recipe(tmp_path), "data.jsonl:2", "malformed JSON")


def test_missing_field(capsys, tmp_path):
    _rows(tmp_path, [GOOD_ROW, {"prompt": "x"}])
    _fails(capsys, tmp_path, _recipe(tmp_path), "data.jsonl:2 field 'completion': missing")


def test_wrong_type(capsys, tmp_path):
    _rows(tmp_path, [GOOD_ROW, {"prompt": ["not", "messages"], "completion": "y"}])
    _fails(capsys, tmp_path, _recipe(tmp_path), "data.jsonl:2 field 'prompt", "content")


def test_empty_completion(capsys, tmp_path):
    _rows(tmp_path, [GOOD_ROW, {"prompt": "x", "completion": ""}])
    _fails(capsys, tmp_path, _recipe(tmp_path), "data.jsonl:2 field 'completion': empty")


def test_non_utf8_bytes(capsys, tmp_path):
    (tmp_path / "data.jsonl").write_bytes(json.dumps(GOOD_ROW).encode() + b'\n{"prompt": "\xff", "completion": "x"}\n')
    _fails(capsys, tmp_path, _recipe(tmp_path), "data.jsonl:2", "UTF-8")


def test_unknown_recipe_key(capsys, tmp_path):
    _rows(tmp_path, [GOOD_ROW])
    _fails(capsys, tmp_path, _recipe(tmp_path, train="{max_steps: 1, learning_rate: 1e-4}"),
           "recipe.yaml:9 stages.sft.train.learning_rate", "unknown key", "did you mean 'lr'")


def test_misspelled_stage_kind(capsys, tmp_path):
    _rows(tmp_path, [GOOD_ROW])
    _fails(capsys, tmp_path, _recipe(tmp_path, kind="stf"), "stages.sft.kind", "did you mean 'sft'")


def test_negative_learning_rate(capsys, tmp_path):
    _rows(tmp_path, [GOOD_ROW])
    _fails(capsys, tmp_path, _recipe(tmp_path, train="{max_steps: 1, lr: -0.001}"), "stages.sft.train.lr",
           "greater than 0")


def test_sequence_over_max_length_with_truncation_off(capsys, tmp_path):
    _rows(tmp_path, [GOOD_ROW, {"prompt": "What is " + "1 + " * 60 + "1?", "completion": "61"}])
    _fails(capsys, tmp_path, _recipe(tmp_path, train="{max_steps: 1, max_length: 64, on_overlong: error}"),
           "data.jsonl:2", "more than max_length 64")


def test_empty_dataset(capsys, tmp_path):
    (tmp_path / "data.jsonl").write_text("\n")
    _fails(capsys, tmp_path, _recipe(tmp_path), "the dataset is empty")


def test_conversation_with_a_tokenizer_without_chat_template(capsys, tmp_path, demo_tokenizer):
    bare = copy.deepcopy(demo_tokenizer)
    bare.chat_template = None
    bare.save_pretrained(tmp_path / "tok")
    _rows(tmp_path, [CHAT_ROW])
    _fails(capsys, tmp_path, _recipe(tmp_path, tokenizer=str(tmp_path / "tok")), "no chat template",
           "model.chat_template")


def test_example_whose_mask_is_all_zero(capsys, tmp_path):
    _rows(tmp_path, [CHAT_ROW, {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}])
    _fails(capsys, tmp_path, _recipe(tmp_path), "data.jsonl:2", "loss mask is all zero")


def test_unreadable_file(capsys, tmp_path):
    (tmp_path / "data.jsonl").mkdir()
    _fails(capsys, tmp_path, _recipe(tmp_path), "stages.sft.data.path", "is a directory")


def test_missing_model_path(capsys, tmp_path):
    _rows(tmp_path, [GOOD_ROW])
    model = "    model: {path: ./no-such-model}\n"
    _fails(capsys, tmp_path, _recipe(tmp_path, model=model), "stages.sft.model.path", "does not exist")


def test_set_on_a_key_that_does_not_exist(capsys, tmp_path):
    _rows(tmp_path, [GOOD_ROW])
    _fails(capsys, tmp_path, _recipe(tmp_path), "--set stages.sft.train.lrr", "did you mean 'lr'",
           overrides=("stages.sft.train.lrr=1",))


def test_wrong_value_type_in_recipe(capsys, tmp_path):
    _rows(tmp_path, [GOOD_ROW])
    _fails(capsys, tmp_path, _recipe(tmp_path, train="{epochs: many}"), "stages.sft.train.epochs", "valid number")


def test_unknown_builtin_dataset(capsys, tmp_path):
    _fails(capsys, tmp_path, _recipe(tmp_path, data="{builtin: demo.sfft}"), "unknown builtin dataset 'demo.sfft'",
           "did you mean 'demo.sft'")


def test_parent_stage_that_does_not_exist(capsys, tmp_path):
    _rows(tmp_path, [GOOD_ROW])
    model = "    from: base\n"
    _fails(capsys, tmp_path, _recipe(tmp_path, model=model), "stages.sft.from", "no stage named 'base'")


def test_preference_rows_for_an_sft_stage(capsys, tmp_path):
    _rows(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    _fails(capsys, tmp_path, _recipe(tmp_path), "holds 'preference' rows")


def test_validate_reports_everything_at_once_and_exits_2(capsys, tmp_path):
    path = _recipe(tmp_path, data="{path: missing.jsonl}", train="{lr: -1, max_steps: 0}")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stages.sft.train.lr" in err and "stages.sft.train.max_steps" in err
    _rows(tmp_path, [GOOD_ROW])
    assert main(["validate", str(_recipe(tmp_path))]) == 0
    assert "ok:" in capsys.readouterr().out


def test_real_process_exit_code_and_no_traceback(tmp_path):
    path = _recipe(tmp_path, kind="stf")
    done = subprocess.run([sys.executable, "-m", "posttrain.cli", "validate", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "did you mean 'sft'" in done.stderr


@pytest.mark.parametrize("command", ["plan", "validate"])
def test_plan_and_validate_succeed_on_a_good_recipe(capsys, tmp_path, command):
    _rows(tmp_path, [GOOD_ROW] * 10)
    assert main([command, str(_recipe(tmp_path, train="{global_batch_size: 4, micro_batch_size: 2}"))]) == 0
    out = capsys.readouterr().out
    if command == "plan":
        for key in ("accumulation: 2", "total_steps: 3", "tokens_per_step", "estimated_tokens"):
            assert key in out, out
