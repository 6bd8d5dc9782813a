"""An eval over a few hundred prompts with a tiny model shows progress and finishes on CPU in a
couple of minutes. The slow test's model (hidden size 64, random weights) rarely emits its end
token, so about three quarters of the 300 GSM8K prompts run to the task's default 512 new tokens:
the expensive case. Generation runs on one thread: on a shared, loaded 2-core machine torch's two
intra-op threads contend and make the tiny model's many small steps 4x slower (measured for 100
prompts at load 6: 214 s with 2 threads, 50 s with 1)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from posttrain.cli import main


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _eval(capsys, monkeypatch, model, tmp_path, limit: int, *extra: str) -> tuple[int, str, float]:
    monkeypatch.setenv("POSTTRAIN_PROGRESS", "1")
    start = time.monotonic()
    code = main(["eval", str(model), "--tasks", "gsm8k", "--limit", str(limit), "--out", str(tmp_path), *extra])
    elapsed = time.monotonic() - start
    return code, capsys.readouterr().err, elapsed


def test_progress_is_shown(capsys, monkeypatch, eval_data, saved_model, tmp_path):
    code, err, _ = _eval(capsys, monkeypatch, saved_model(0), tmp_path, 5, "--set", "gsm8k.max_new_tokens=4")
    assert code == 0, err
    assert "generate: 5/5" in err


@pytest.mark.slow
def test_a_few_hundred_prompts_in_a_couple_of_minutes(capsys, monkeypatch, eval_data, saved_model, tmp_path,
                                                      one_thread):
    code, err, elapsed = _eval(capsys, monkeypatch, saved_model(0, hidden=64), tmp_path, 300)
    assert code == 0, err
    assert "generate: 300/300" in err
    records = [json.loads(line) for line in (tmp_path / "gsm8k.jsonl").read_text().splitlines()]
    assert len(records) == 300 and sum(r["truncated"][0] for r in records) > 150  # most ran 512 tokens
    assert elapsed < 180, f"{elapsed:.0f}s"
