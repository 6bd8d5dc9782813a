"""Fixtures for the eval tests: a tiny model and its context, a saved model folder, the shared
eval data as the tasks' default data, and a scripted sampler that returns chosen completions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from posttrain.types import Rollout


@pytest.fixture(scope="session")
def tiny_lm(demo_tokenizer, tiny_model):
    return tiny_model(demo_tokenizer, hidden=32, layers=2, heads=4, seed=0).eval()


@pytest.fixture
def eval_ctx(demo_tokenizer, tiny_lm):
    from posttrain.evals.base import EvalContext

    return EvalContext(model=tiny_lm, tokenizer=demo_tokenizer, show_progress=False, seed=0)


@pytest.fixture
def eval_data(shared_data, monkeypatch) -> Path:
    """The real files in ../shared/data as every task's default data."""
    from posttrain.evals.common import EVAL_DATA_ENV

    monkeypatch.setenv(EVAL_DATA_ENV, str(shared_data))
    return shared_data


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory, demo_tokenizer, tiny_model) -> Callable[[int], Path]:
    """Factory: saved_model(seed, hidden=32) -> a save_pretrained folder holding a tiny model
    (cached per seed and size)."""
    made: dict[tuple[int, int], Path] = {}

    def make(seed: int = 0, hidden: int = 32) -> Path:
        if (seed, hidden) not in made:
            folder = tmp_path_factory.mktemp(f"tiny_model_{seed}_{hidden}")
            tiny_model(demo_tokenizer, hidden=hidden, layers=2, heads=4, seed=seed).save_pretrained(folder)
            demo_tokenizer.save_pretrained(folder)
            made[seed, hidden] = folder
        return made[seed, hidden]

    return make


@pytest.fixture
def stubs_importable(monkeypatch) -> str:
    """Puts the repository root on sys.path; returns the stubs' module name for "module:object"."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    return "tests.evals.eval_stubs"


@pytest.fixture
def scripted(monkeypatch):
    """scripted(module, completions_of) makes ``module.sample`` return, for each built prompt i,
    the completions ``completions_of(i, prompt)`` (one Rollout each) instead of generating."""

    def install(module, completions_of: Callable[[int, object], list[str]]) -> list:
        seen: list = []

        def fake_sample(ctx, cfg, prompts, opts, default_max_new_tokens):
            seen.extend(prompts)
            return [[Rollout(prompt_ids=p.ids, completion_ids=[1, 2], logprobs=[0.0, 0.0], finish_reason="stop",
                             text=text, prompt_index=i, sample_index=j)
                     for j, text in enumerate(completions_of(i, p))] for i, p in enumerate(prompts)]

        monkeypatch.setattr(module, "sample", fake_sample)
        return seen

    return install
