"""Shared test fixtures.

Real third-party data lives in ``../shared/data`` next to the repository (CI always has it; a
user's clone does not). Tests that need it use the ``shared_data`` fixture, which skips with a
clear reason when it is absent. ``POSTTRAIN_SHARED_DATA`` points elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("POSTTRAIN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"shared evaluation data not found at {SHARED_DATA} "
            "(set POSTTRAIN_SHARED_DATA to the folder holding gsm8k/, math500/, ...)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_tokenizer():
    """The demo world's tokenizer (trained locally, ~300 tokens, ChatML template)."""
    from posttrain.demo.world import demo_tokenizer as make

    return make()


def _tiny_model(tokenizer, *, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0):
    from posttrain.config import TinyModelConfig
    from posttrain.models.tiny import build_tiny_llama

    cfg = TinyModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=hidden * 2,
                          max_position_embeddings=256, init_seed=seed)
    return build_tiny_llama(cfg, tokenizer)


@pytest.fixture(scope="session")
def tiny_model():
    """Factory: tiny_model(tokenizer, hidden=32, layers=2, heads=4, seed=0) -> LlamaForCausalLM (fp32)."""
    return _tiny_model


def _write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def write_jsonl():
    """Factory: write_jsonl(path, rows) writes one JSON object per line and returns the path."""
    return _write_jsonl


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_PROGRESS", "0")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
