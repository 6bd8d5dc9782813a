"""Recipes: strict schema, every problem at once with path, value and fix; overrides."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from posttrain.config import load_recipe, topological_order
from posttrain.errors import UserError

GOOD = """\
name: t
seed: 3
stages:
  base:
    kind: pretrain
    model: {tokenizer: builtin:demo, tiny: {hidden_size: 32, num_layers: 1, num_heads: 2}}
    data: {builtin: demo.pretrain, args: {docs: 10}}
    train: {lr: 1e-3, global_batch_size: 4, micro_batch_size: 2}
  sft:
    kind: sft
    from: base
    data: {builtin: demo.sft, args: {n: 10}}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _problems(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides)
    return [p.render() for p in info.value.problems]


def test_good_recipe_loads_with_typed_values(tmp_path):
    recipe = load_recipe(_write(tmp_path, GOOD))
    assert list(recipe.stages) == ["base", "sft"]
    assert recipe.stages["base"].train.lr == pytest.approx(1e-3)  # YAML 1.1 would read "1e-3" as a string
    assert recipe.stages["sft"].from_ == "base"
    assert topological_order(recipe) == ["base", "sft"]


def test_every_problem_is_reported_at_once_with_path_line_value_and_fix(tmp_path):
    text = GOOD.replace("lr: 1e-3", "lr: -1, lrr: 3").replace("kind: sft", "kind: stf")
    found = _problems(_write(tmp_path, text))
    joined = "\n".join(found)
    assert len(found) == 3, joined
    assert "recipe.yaml:8 stages.base.train.lr" in joined and "got -1" in joined
    assert "unknown key 'lrr'" in joined and "did you mean 'lr'" in joined
    assert "stages.sft.kind" in joined and "did you mean 'sft'" in joined
    assert all("fix:" in p for p in found)


def test_overrides_apply_and_unknown_override_keys_are_errors(tmp_path):
    path = _write(tmp_path, GOOD)
    recipe = load_recipe(path, ["stages.sft.train.lr=2e-5", "seed=9"])
    assert recipe.stages["sft"].train.lr == pytest.approx(2e-5)
    assert recipe.seed == 9
    found = _problems(path, ["stages.sft.train.learning_rate=1", "stages.nope.train.lr=1"])
    assert any(p.startswith("--set stages.sft.train.learning_rate: unknown key") for p in found)
    assert any("--set stages.nope.train.lr" in p and "no stage named 'nope'" in p for p in found)


def test_the_users_recipe_is_not_mutated_by_overrides(tmp_path):
    path = _write(tmp_path, GOOD)
    before = path.read_text()
    load_recipe(path, ["stages.sft.train.lr=2e-5"])
    assert path.read_text() == before


def test_batch_sizes_must_divide(tmp_path):
    found = _problems(_write(tmp_path, GOOD.replace("global_batch_size: 4", "global_batch_size: 5")))
    assert any("not a multiple of micro_batch_size" in p for p in found)


@pytest.mark.parametrize(("train", "message"), [
    ("{schedule: constant, min_lr_ratio: 0.1}", "'min_lr_ratio' has no effect with schedule: constant"),
    ("{warmup_steps: 3, warmup_ratio: 0.1}", "set warmup_steps or warmup_ratio, not both"),
    ("{epochs: 2, max_steps: 10}", "set epochs or max_steps, not both"),
    ("{on_overlong: error, max_truncated_share: 0.5}", "'max_truncated_share' has no effect"),
])
def test_settings_that_would_be_silently_ignored_are_errors(tmp_path, train, message):
    text = GOOD.replace("    data: {builtin: demo.sft, args: {n: 10}}",
                        f"    data: {{builtin: demo.sft, args: {{n: 10}}}}\n    train: {train}")
    found = _problems(_write(tmp_path, text))
    assert any(message in p for p in found), found


def test_structure_errors_missing_parent_cycle_and_both_sources(tmp_path):
    text = """\
    name: t
    stages:
      a: {kind: sft, from: b, data: {path: x.jsonl}}
      b: {kind: sft, from: a, data: {path: x.jsonl}}
      c: {kind: sft, from: zzz, data: {path: x.jsonl}}
      d: {kind: sft, data: {path: x.jsonl}}
      e: {kind: sft, from: a, model: {path: m}, data: {path: x.jsonl}}
    """
    joined = "\n".join(_problems(_write(tmp_path, text)))
    assert "cycle" in joined and ("a -> b -> a" in joined or "b -> a -> b" in joined)
    assert "no stage named 'zzz'" in joined
    assert "stages.d" in joined and "no starting model" in joined
    assert "stages.e" in joined and "not both" in joined


def test_dataset_needs_exactly_one_source_and_args_only_with_builtin(tmp_path):
    text = GOOD.replace("data: {builtin: demo.sft, args: {n: 10}}", "data: {path: a.jsonl, args: {n: 1}}")
    joined = "\n".join(_problems(_write(tmp_path, text)))
    assert "'args' has no effect without 'builtin'" in joined


def test_invalid_yaml_names_the_line(tmp_path):
    path = _write(tmp_path, "name: t\nstages:\n  a: {kind: sft\n")
    found = _problems(path)
    assert found[0].startswith(f"{path}:") and "invalid YAML" in found[0]
