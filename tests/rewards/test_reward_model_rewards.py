"""Rewards from reward models: scalar, multi-head and PRM scoring, re-tokenised with the reward
model's own tokenizer; ensemble combinators; use from a score stage."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_recipes import tiny_sft_base

from posttrain.cli import main
from posttrain.data.render import render_prompt_completion
from posttrain.data.reward_data import cut_at_last_target, render_steps
from posttrain.errors import UserError
from posttrain.models.heads import RewardModel, save_reward_model
from posttrain.models.tiny import train_bpe_tokenizer
from posttrain.rewards.base import build_scorer
from posttrain.rewards.reward_model import (
    aggregate_steps,
    ensemble_mean,
    pessimistic_mean,
    uncertainty_gate,
    weighted_heads,
)

PROMPT = [{"role": "user", "content": "What is 47 + 85?"}]
COMPLETIONS = ["47 + 85: 7 + 5 = 12. 4 + 8 + 1 = 13. 47 + 85 = 132.", "47 + 85 = 133.", "I do not know."]


def _rm(tokenizer, tiny_model, heads=("reward",), seed=0, kind="reward", meta=None) -> RewardModel:
    model = RewardModel(tiny_model(tokenizer, seed=seed), list(heads), kind=kind, meta=meta, init_seed=seed)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def test_pessimism_lowers_the_reward_only_where_members_disagree():
    scores = torch.tensor([[1.0, 1.0, 0.0], [1.0, 3.0, 0.0]])  # members x samples
    assert ensemble_mean(scores).tolist() == [1.0, 2.0, 0.0]
    assert pessimistic_mean(scores, alpha=1.0).tolist() == [1.0, 1.0, 0.0]  # std 0, 1, 0
    assert pessimistic_mean(scores, alpha=0.5).tolist() == [1.0, 1.5, 0.0]


def test_the_gate_masks_uncertain_samples_instead_of_zeroing_them():
    scores = torch.tensor([[0.0, 2.0, -1.0], [0.0, 6.0, -1.5]])  # std 0, 2, 0.25
    assert uncertainty_gate(scores, max_std=1.0) == [0.0, None, -1.25]


def test_weighted_heads_and_step_aggregation_by_hand():
    rewards = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    assert weighted_heads(rewards, torch.tensor([2.0, 0.5])).tolist() == [1.0, 3.0]
    probabilities = torch.tensor([0.9, 0.5, 0.8])
    assert aggregate_steps(probabilities, "min") == pytest.approx(0.5)
    assert aggregate_steps(probabilities, "product") == pytest.approx(0.36)
    assert aggregate_steps(probabilities, "last") == pytest.approx(0.8)
    assert aggregate_steps(probabilities, "mean") == pytest.approx(2.2 / 3)


def test_scorer_retokenises_with_the_reward_models_own_tokenizer(tiny_model, tmp_path):
    from posttrain.demo.world import corpus

    own = train_bpe_tokenizer(corpus()[:3000], vocab_size=290)  # not the policy's vocabulary
    model = _rm(own, tiny_model)
    save_reward_model(model, own, tmp_path / "rm")
    scorer = build_scorer("reward_model", {"batch_size": 2}, where="rewards.0", path=str(tmp_path / "rm"))
    results = scorer(COMPLETIONS, [{"prompt": PROMPT}] * 3)
    with torch.no_grad():
        expected = []
        for text in COMPLETIONS:
            ids = cut_at_last_target(render_prompt_completion(own, PROMPT, text, "assistant")).input_ids
            tensor = torch.tensor([ids])
            expected.append(float(model.rewards(tensor, torch.arange(len(ids))[None], torch.tensor([len(ids) - 1]))))
    assert [r.score for r in results] == pytest.approx(expected, abs=1e-5)
    assert len(set(round(e, 4) for e in expected)) == 3


def test_multi_head_weights_ensembles_and_option_errors(demo_tokenizer, tiny_model, tmp_path):
    for i in range(2):
        save_reward_model(_rm(demo_tokenizer, tiny_model, ("helpful", "harmless"), seed=i), demo_tokenizer,
                          tmp_path / f"rm{i}")
    rows = [{"prompt": PROMPT}] * 3
    single = build_scorer("reward_model", {"heads": {"helpful": 1.0}}, where="r", path=str(tmp_path / "rm0"))(
        COMPLETIONS, rows)
    assert [r.score for r in single] == pytest.approx([r.components["helpful"] for r in single])
    members = [build_scorer("reward_model", {"heads": {"helpful": 1.0, "harmless": 0.5}}, where="r",
                            path=str(tmp_path / f"rm{i}"))(COMPLETIONS, rows) for i in range(2)]
    paths = [str(tmp_path / "rm0"), str(tmp_path / "rm1")]
    pessimistic = build_scorer("reward_model", {"paths": paths, "heads": {"helpful": 1.0, "harmless": 0.5},
                                                "ensemble": "pessimistic", "alpha": 2.0}, where="r")(COMPLETIONS, rows)
    for i, result in enumerate(pessimistic):
        a, b = members[0][i].score, members[1][i].score
        assert result.score == pytest.approx((a + b) / 2 - 2.0 * abs(a - b) / 2, abs=1e-5)
        assert result.meta["ensemble_std"] == pytest.approx(abs(a - b) / 2, abs=1e-5)
    spread = sorted(abs(members[0][i].score - members[1][i].score) / 2 for i in range(3))
    cut = (spread[0] + spread[1]) / 2  # keeps exactly one sample
    gated = build_scorer("reward_model", {"paths": paths, "heads": {"helpful": 1.0, "harmless": 0.5},
                                          "ensemble": "gate", "max_std": cut}, where="r")(COMPLETIONS, rows)
    assert sum(r.score is None for r in gated) == 2 and all("masked" in r.meta for r in gated if r.score is None)
    kept = next(r for r in gated if r.score is not None)
    assert kept.score == pytest.approx(kept.meta["ensemble_mean"])
    bad = [({"ensemble": "gate"}, "needs max_std"), ({"heads": {"nope": 1.0}}, "no head 'nope'"),
           ({"alpha": 1.0}, "no effect"), ({"colour": 1}, "r.colour")]
    for params, message in bad:
        with pytest.raises(UserError, match=message):
            build_scorer("reward_model", params, where="r", path=str(tmp_path / "rm0"))(COMPLETIONS, rows)
    with pytest.raises(UserError, match="exactly one"):
        build_scorer("reward_model", {"paths": paths}, where="r", path=paths[0])


def test_prm_scores_each_step_and_takes_the_minimum(demo_tokenizer, tiny_model, tmp_path):
    model = _rm(demo_tokenizer, tiny_model, ("step",), kind="prm", meta={"separator": ". "})
    save_reward_model(model, demo_tokenizer, tmp_path / "prm")
    scorer = build_scorer("prm", {}, where="r", path=str(tmp_path / "prm"))
    result = scorer(COMPLETIONS[:1], [{"prompt": PROMPT}])[0]
    sequence, ends = render_steps(demo_tokenizer, PROMPT, COMPLETIONS[0].split(". "), ". ")
    ids = torch.tensor([sequence.input_ids])
    with torch.no_grad():
        steps = torch.sigmoid(model.token_scores(ids, torch.arange(ids.shape[1])[None])[0, ends, 0])
    assert len(ends) == 3 and result.score == pytest.approx(float(steps.min()), abs=1e-6)
    save_reward_model(_rm(demo_tokenizer, tiny_model), demo_tokenizer, tmp_path / "orm")
    with pytest.raises(UserError, match="not a prm model"):
        build_scorer("prm", {}, where="r", path=str(tmp_path / "orm"))


def test_a_score_stage_uses_a_reward_model(demo_tokenizer, tiny_model, tmp_path, write_jsonl):
    save_reward_model(_rm(demo_tokenizer, tiny_model), demo_tokenizer, tmp_path / "rm")
    write_jsonl(tmp_path / "rows.jsonl", [{"prompt": PROMPT, "completion": c, "answer": "132"} for c in COMPLETIONS])
    (tmp_path / "recipe.yaml").write_text("""
name: s
stages:
  scored:
    kind: score
    data: {path: rows.jsonl}
    rewards: [{name: reward_model, path: rm, batch_size: 2}, {name: math, weight: 0.5}]
""")
    assert main(["run", str(tmp_path / "recipe.yaml"), "--workdir", str(tmp_path / "w"), "--no-progress"]) == 0
    rows = [json.loads(line) for line in next((tmp_path / "w" / "stages" / "scored").glob("*/data.jsonl")).open()]
    direct = build_scorer("reward_model", {}, where="r", path=str(tmp_path / "rm"))(COMPLETIONS, rows)
    assert [r["rewards"]["reward_model"] for r in rows] == pytest.approx([d.score for d in direct], abs=1e-5)
    assert rows[0]["score"] == pytest.approx(rows[0]["rewards"]["reward_model"] + 0.5 * 1.0, abs=1e-5)

    # The reward model's folder is part of the key: unchanged, the stage is cached; retrained and
    # saved to the same path, the stage runs again and scores with the new weights.
    def rerun() -> list[dict]:
        assert main(["run", str(tmp_path / "recipe.yaml"), "--workdir", str(tmp_path / "w"), "--no-progress"]) == 0
        events = [json.loads(line) for line in (tmp_path / "w" / "ledger.jsonl").read_text().splitlines()]
        return [e for e in events if e.get("stage") == "scored"]

    assert rerun()[-1]["event"] == "cached"
    retrained = _rm(demo_tokenizer, tiny_model)
    with torch.no_grad():
        for parameter in retrained.parameters():
            parameter.add_(0.05)
    save_reward_model(retrained, demo_tokenizer, tmp_path / "rm")
    assert rerun()[-1]["event"] != "cached"
    rows = [json.loads(line) for line in sorted((tmp_path / "w" / "stages" / "scored").glob("*/data.jsonl"),
                                                key=lambda f: f.stat().st_mtime)[-1].open()]
    direct = build_scorer("reward_model", {}, where="r", path=str(tmp_path / "rm"))(COMPLETIONS, rows)
    assert [r["rewards"]["reward_model"] for r in rows] == pytest.approx([d.score for d in direct], abs=1e-5)


RM_RECIPE = tiny_sft_base("s", n=16, batch=8) + """\
  rm:
    kind: reward_model
    from: base
    data: {builtin: demo.pairs, args: {n: 8}}
    train: {lr: 1e-3, global_batch_size: 8, micro_batch_size: 8, max_length: 96, checkpoint_every: 0}
  samples:
    kind: generate
    from: base
    data: {builtin: demo.prompts, args: {n: 3}}
    sampling: {n: 2, max_new_tokens: 8}
  scored:
    kind: score
    data: {stage: samples}
    rewards: [REWARD]
"""


def test_a_score_stage_uses_a_reward_model_stage_of_the_recipe(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RM_RECIPE.replace("REWARD", "{name: reward_model, from: rm}"))
    assert main(["run", str(recipe), "--workdir", str(tmp_path / "w"), "--no-progress"]) == 0
    rows = [json.loads(line) for line in next((tmp_path / "w" / "stages" / "scored").glob("*/data.jsonl")).open()]
    rm_folder = next((tmp_path / "w" / "stages" / "rm").glob("*/manifest.json")).parent
    direct = build_scorer("reward_model", {}, where="r", path=str(rm_folder))([r["completion"] for r in rows], rows)
    assert len(rows) == 6
    assert [r["rewards"]["reward_model"] for r in rows] == pytest.approx([d.score for d in direct], abs=1e-5)


@pytest.mark.parametrize("reward, message", [
    ("{name: reward_model, from: samples}", "stages.scored.rewards.0.from"),
    ("{name: reward_model, from: nowhere}", "stages.scored.rewards.0.from"),
    ("{name: reward_model, from: rm, path: rm}", "set path or from, not both"),
])
def test_a_reward_from_a_stage_must_name_a_reward_model_stage(tmp_path, capsys, reward, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RM_RECIPE.replace("REWARD", reward))
    assert main(["validate", str(recipe)]) == 2
    assert message in capsys.readouterr().err
