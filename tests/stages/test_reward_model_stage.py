"""The reward_model, prm and prm_labels stages: our whole path (render -> cut -> collate -> head ->
loss) equals TRL's RewardTrainer on the same model and batch; shared-prompt batches equal separate
sequences; heads train on their own data; real data loads with its drops counted; reward-model
artifacts cannot be used as a policy's starting point."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tiny_recipes import tiny_sft_base
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer

from posttrain.cli import main
from posttrain.config.components import DataConfig
from posttrain.data.formats import load_dataset
from posttrain.data.pairs import render_pairs
from posttrain.data.reward_data import (
    RewardRow,
    StepRow,
    collate_reward_rows,
    collate_step_rows,
    cut_at_last_target,
    render_steps,
)
from posttrain.data.shared_prompt import collate_shared_prompt
from posttrain.demo.world import STEP_SEPARATOR, corrupt_step, prm_rows, worked
from posttrain.losses.reward_model import get_reward_loss
from posttrain.models.heads import RewardModel, save_reward_model
from posttrain.stages.prm import prm_objective
from posttrain.stages.reward_model import HeadObjective, RewardObjective
from posttrain.types import PreferencePair, RowSource

PAIRS = [
    {"prompt": "What is 12 + 30?", "chosen": " 12 + 30 = 42.", "rejected": " 12 + 30 = 43. I think.", "margin": 1.0},
    {"prompt": "Compute 55 - 17.", "chosen": " 55 - 17 = 38.", "rejected": " 55 - 17 = 48.", "margin": 0.0},
    {"prompt": "9 + 9 = ?", "chosen": " 18", "rejected": " 19 or maybe 20", "margin": 2.5},
    {"prompt": "What is 70 + 21?", "chosen": " 70 + 21 = 91.", "rejected": " 91? no, 92.", "margin": 0.5},
]


@pytest.fixture(scope="module")
def world(demo_tokenizer, tiny_model):
    warnings.filterwarnings("ignore")
    tokenizer = copy.deepcopy(demo_tokenizer)
    tokenizer.bos_token = None  # TRL adds no BOS for this tokenizer; neither do we then
    model = RewardModel(tiny_model(tokenizer, hidden=32, seed=1), init_seed=3)
    with torch.no_grad():  # rewards that differ by whole units
        for p in model.parameters():
            p.mul_(8.0)
    return tokenizer, model.eval()


def _rows(tokenizer, pairs=PAIRS, head=0) -> list[RewardRow]:
    typed = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], RowSource("x", i), {"margin": r["margin"]})
             for i, r in enumerate(pairs)]
    rendered, _ = render_pairs(tokenizer, typed, max_length=128, max_prompt_length=None, on_overlong="error",
                               on_bad_pair="error", max_dropped_share=0.0, where="t")
    return [RewardRow(head, (cut_at_last_target(p.chosen), cut_at_last_target(p.rejected)), p.extra["margin"])
            for p in rendered]


def _objective(use_margin: bool = False, coefficient: float = 0.0) -> RewardObjective:
    params = {"center_rewards_coefficient": coefficient} if coefficient else {}
    return RewardObjective([HeadObjective(get_reward_loss("bradley_terry"), params, 1.0, use_margin)], ["reward"], [])


@pytest.mark.parametrize(("margin", "coefficient"), [(False, None), (True, None), (False, 0.05), (True, 0.01)])
def test_stage_objective_equals_trl_reward_trainer(world, tmp_path, margin, coefficient):
    tokenizer, model = world
    save_reward_model(model, tokenizer, tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model")
    rows = [dict(r) for r in PAIRS] if margin else [{k: v for k, v in r.items() if k != "margin"} for r in PAIRS]
    trainer = RewardTrainer(model=hf, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                            args=RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True,
                                              save_strategy="no", bf16=False, per_device_train_batch_size=4,
                                              center_rewards_coefficient=coefficient))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, batch))
    ours_rows = _rows(tokenizer)
    # the same tokens: TRL tokenizes prompt + response + EOS as one text
    assert [r.sequences[0].input_ids for r in ours_rows] == [
        [t for t in ids if t != tokenizer.pad_token_id] for ids in batch["input_ids"][:4].tolist()]
    for collate in (collate_reward_rows, collate_shared_prompt):
        with torch.no_grad():
            ours, stats = _objective(margin, coefficient or 0.0)(model, collate(ours_rows, tokenizer.pad_token_id),
                                                                 float(len(ours_rows)))
        assert abs(float(ours) - theirs) < 1e-5, (collate.__name__, float(ours), theirs)
    assert theirs > 1e-3


def test_shared_prompt_batches_equal_separate_sequences(world):
    tokenizer, model = world
    rows = _rows(tokenizer)
    prompt_ids = rows[0].sequences[0].input_ids[:5]
    point = RewardRow(0, (cut_at_last_target(rows[1].sequences[0]),), 2.0)
    rows.append(point)  # a scored response rides in the same batch
    separate, shared = collate_reward_rows(rows, tokenizer.pad_token_id), collate_shared_prompt(rows, 0)
    assert shared.input_ids.numel() < separate.input_ids.numel()
    with torch.no_grad():
        a = model.scores_at(separate.input_ids, separate.position_ids, separate.read_rows, separate.read_cols)
        b = model.scores_at(shared.input_ids, shared.position_ids, shared.read_rows, shared.read_cols,
                            shared.blocks)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert shared.tokens == separate.tokens and prompt_ids


def test_loss_and_gradients_do_not_depend_on_micro_batching(world):
    tokenizer, model = world
    rows = _rows(tokenizer)
    objective = _objective(True, 0.01)
    model.zero_grad()
    whole, _ = objective(model, collate_shared_prompt(rows, 0), 4.0)
    whole.backward()
    expected = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    parts = 0.0
    for chunk in (rows[:1], rows[1:]):
        loss, _ = objective(model, collate_shared_prompt(chunk, 0), 4.0)
        loss.backward()
        parts += float(loss.detach())
    assert parts == pytest.approx(float(whole.detach()), abs=1e-6)
    for grad, p in zip(expected, [p for p in model.parameters() if p.grad is not None]):
        torch.testing.assert_close(p.grad, grad, rtol=1e-3, atol=1e-4)  # fp32 summation order, x8 weights
    model.zero_grad()


def test_lm_regulariser_adds_the_chosen_responses_mean_nll(world):
    tokenizer, model = world
    rows = _rows(tokenizer)
    objective = RewardObjective([HeadObjective(get_reward_loss("bradley_terry"), {}, 1.0, False, 0.5)],
                                ["reward"], [], chunk=7)
    with torch.no_grad():
        plain, _ = _objective()(model, collate_reward_rows(rows, tokenizer.pad_token_id), 4.0)
        expected = 0.0
        for row in rows:  # the chosen response's mean NLL from the causal LM's own logits
            chosen = row.sequences[0]
            logp = torch.log_softmax(model.backbone(torch.tensor([chosen.input_ids])).logits[0, :-1], -1)
            targets = [t for t in range(1, len(chosen)) if chosen.loss_mask[t]]
            expected += -sum(float(logp[t - 1, chosen.input_ids[t]]) for t in targets) / len(targets)
        for collate in (collate_reward_rows, collate_shared_prompt):
            total, stats = objective(model, collate(rows, tokenizer.pad_token_id), 4.0)
            assert float(total) == pytest.approx(float(plain) + 0.5 * expected / 4, rel=1e-5)
            assert stats["chosen_nll/__num"] == pytest.approx(expected, rel=1e-5)


def test_each_head_uses_only_its_own_rows(world):
    tokenizer, _ = world
    from posttrain.demo.world import demo_tokenizer  # noqa: F401  (tokenizer already built)
    model = RewardModel(copy.deepcopy(world[1].backbone), ["a", "b"], init_seed=1)
    pairs = _rows(tokenizer, head=0)
    point = RewardRow(1, (cut_at_last_target(pairs[0].sequences[0]),), 3.0)
    objective = RewardObjective([HeadObjective(get_reward_loss("bradley_terry"), {}),
                                 HeadObjective(get_reward_loss("regression"), {}, 2.0)], ["a", "b"], [])
    batch = collate_shared_prompt([*pairs, point], 0)
    loss, stats = objective(model, batch, 5.0)
    loss.backward()
    scores = model.scores_at(batch.input_ids, batch.position_ids, batch.read_rows, batch.read_cols,
                             batch.blocks).detach()
    bt = -torch.nn.functional.logsigmoid(scores[batch.pair_chosen, 0] - scores[batch.pair_rejected, 0]).sum()
    mse = (scores[batch.point_index, 1] - 3.0) ** 2
    assert float(loss.detach()) == pytest.approx(float((bt + 2.0 * mse.sum()) / 5.0), rel=1e-5)
    assert stats["b/abs_error/__den"] == 1.0 and stats["a/loss/__den"] == 4.0


# ------------------------------------------------------------------ process reward models


def test_prm_loss_is_read_at_step_ends_only(demo_tokenizer, tiny_model):
    model = RewardModel(tiny_model(demo_tokenizer), ["step"], kind="prm", init_seed=2)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    steps = worked(47, "+", 85, 132).split(STEP_SEPARATOR)
    prompt = [{"role": "user", "content": "What is 47 + 85?"}]
    sequence, ends = render_steps(demo_tokenizer, prompt, steps, STEP_SEPARATOR)
    assert len(ends) == 3 and ends[-1] == len(sequence) - 1 and sequence.input_ids[-1] == demo_tokenizer.eos_token_id
    # a step is read at the token after it: the next step's separator ("12" then ".")
    assert demo_tokenizer.decode(sequence.input_ids[ends[0] - 2 : ends[0] + 1]) == "12."
    labels = [1.0, 0.25, 0.0]
    batch = collate_step_rows([StepRow(sequence, ends, labels)], demo_tokenizer.pad_token_id)
    with torch.no_grad():
        loss, stats = prm_objective()(model, batch, 3.0)
        logits = model.token_scores(batch.input_ids, batch.position_ids)[0, ends, 0]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(labels))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert stats["step_accuracy/__den"] == 3.0


def test_corrupted_steps_carry_their_error_forward():
    import random

    rng = random.Random(0)
    assert corrupt_step(47, "+", 85, 132, 0, rng).startswith("47 + 85: 7 + 5 = 1")
    for row in prm_rows("test", {"n": 60}):
        steps = row["completion"].split(STEP_SEPARATOR)
        a, op, b = row["problem"].split()
        right = worked(int(a), op, int(b), int(row["answer"])).split(STEP_SEPARATOR)
        wrong = row["first_wrong_step"]
        first = next((i for i, (x, y) in enumerate(zip(steps, right)) if x != y), None)
        assert first == wrong and (wrong is None) == (steps[-1] == right[-1])


def test_paired_prm_rows_hold_each_problem_right_then_wrong():
    rows = prm_rows("train", {"n": 40, "paired": True})
    assert len(rows) == 40
    for right, wrong in zip(rows[::2], rows[1::2]):
        assert right["problem"] == wrong["problem"] and right["prompt"] == wrong["prompt"]
        assert right["first_wrong_step"] is None and wrong["first_wrong_step"] in (0, 1, 2)
        a, op, b = right["problem"].split()
        assert right["completion"] == worked(int(a), op, int(b), int(right["answer"]))
        assert wrong["completion"] != right["completion"]


# ------------------------------------------------------------------ through the CLI

BASE = tiny_sft_base("rm", n=16)
RECIPE = """\
  rm:
    kind: reward_model
    from: base
{body}
    train: {{lr: 1e-3, global_batch_size: 8, micro_batch_size: 4, max_length: 96, checkpoint_every: 0}}
{extra}"""


def _run(tmp_path: Path, body: str, extra: str = "", command: str = "run") -> tuple[int, Path]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE + RECIPE.format(body=body, extra=extra))
    work = tmp_path / "work"
    args = [command, str(recipe)] + (["--workdir", str(work), "--no-progress"] if command == "run" else [])
    return main(args), work


def _manifest(work: Path, stage: str = "rm") -> dict:
    return json.loads(next((work / "stages" / stage).glob("*/manifest.json")).read_text())


def test_multi_head_stage_with_categories_and_a_regression_head(tmp_path, write_jsonl):
    rows = [{"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": str(i + 2),
             "category": "small" if i < 8 else "large"} for i in range(16)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    write_jsonl(tmp_path / "scores.jsonl", [{"prompt": f"What is {i} + 1?", "completion": str(i + 1 + i % 3),
                                              "verbosity": float(i % 3)} for i in range(8)])
    body = """    heads:
      - {name: correct, data: {path: pairs.jsonl}, loss: {name: bradley_terry, center_rewards_coefficient: 0.01}}
      - {name: verbosity, data: {path: scores.jsonl}, loss: {name: regression, scale: 2.0}, weight: 0.5}
    eval:
      - {task: rm_accuracy, data: {path: pairs.jsonl}, options: {heads: {correct: 1.0}}}"""
    code, work = _run(tmp_path, body)
    assert code == 0
    manifest = _manifest(work)
    assert manifest["kind"] == "reward_model" and manifest["info"]["heads"] == ["correct", "verbosity"]
    assert {"rm_accuracy", "rm_accuracy_small", "rm_accuracy_large", "rm_reward_std"} <= set(manifest["metrics"])
    records = [json.loads(line) for line in next((work / "stages" / "rm").glob("*/metrics.jsonl")).open()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3  # 24 rows / 8 per step
    assert any("accuracy/small" in r for r in steps) and all("verbosity/abs_error" in r for r in steps[:1] + steps)
    folder = next((work / "stages" / "rm").glob("*/model"))
    assert AutoModelForSequenceClassification.from_pretrained(folder).config.id2label == {0: "correct",
                                                                                          1: "verbosity"}


def test_a_reward_model_cannot_be_a_policys_starting_point(tmp_path, capsys):
    extra = """  dpo:
    kind: preference
    from: rm
    data: {builtin: demo.pairs, args: {n: 8}}"""
    code, _ = _run(tmp_path, "    data: {builtin: demo.pairs, args: {n: 8}}", extra, command="validate")
    err = capsys.readouterr().err
    assert code == 2 and "stages.dpo.from" in err and "produces a reward_model, not a model" in err


def test_config_mistakes_are_reported_with_their_paths(tmp_path, capsys):
    body = """    heads:
      - {name: a, data: {builtin: demo.pairs, args: {n: 8}}, loss: {name: regresion}}
      - {name: b, data: {builtin: demo.pairs, args: {n: 8}}, use_margin: true, loss: {name: mse}}
      - {name: c, data: {builtin: demo.pairs, args: {n: 8}}, target: score}"""
    code, _ = _run(tmp_path, body, command="validate")
    err = capsys.readouterr().err
    assert code == 2 and "stages.rm.heads.0.loss.name" in err and "did you mean 'regression'" in err
    assert "stages.rm.heads.1.use_margin" in err and "stages.rm.heads.2.target" in err
    code, _ = _run(tmp_path, "    data: {builtin: demo.pairs}\n    heads: [{name: a, data: {builtin: demo.pairs}}]",
                   command="validate")
    assert code == 2 and "not both" in capsys.readouterr().err


def test_margin_field_is_required_when_used(tmp_path, capsys, write_jsonl):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c", "margin": 1},
                                       {"prompt": "a", "chosen": "d", "rejected": "e"}])
    code, work = _run(tmp_path, "    data: {path: p.jsonl}\n    use_margin: true")
    err = capsys.readouterr().err
    assert code == 2 and "p.jsonl:2 field 'margin'" in err and not (work / "stages" / "rm").exists()


# ------------------------------------------------------------------ real data


def test_hh_rlhf_and_llamafactory_pairs_load_through_the_rm_path(shared_data, demo_tokenizer):
    hh = load_dataset(DataConfig(path=str(shared_data / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"),
                                 on_bad_row="drop"), where="stages.rm.data", expect=("preference",))
    assert hh.report.rows_read == 2312 and hh.report.dropped == {"malformed HH-RLHF dialogue": 9}
    first = hh.examples[0]
    assert [m["role"] for m in first.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert first.chosen[0]["content"].startswith("No, sorry!") and len(first.chosen) == 1
    pairs, report = render_pairs(demo_tokenizer, hh.examples, max_length=100_000, max_prompt_length=None,
                                 on_overlong="error", on_bad_pair="drop", max_dropped_share=0.05, where="stages.rm")
    # 9 rows have two turns of one role in a row (malformed); 4 end with an empty assistant turn
    assert report.dropped == {"empty response": 4} and report.kept == len(pairs) == 2299
    demo = load_dataset(DataConfig(path=str(shared_data / "preference_llamafactory" / "dpo_en_demo.json")),
                        where="stages.rm.data", expect=("preference",))
    assert demo.report.rows_kept == 299 and not demo.report.dropped
    roles = {tuple(m["role"] for m in e.prompt) for e in demo.examples}
    assert ("system", "user") in roles and all(e.chosen[0]["role"] == "assistant" for e in demo.examples)
    assert "conversations" not in demo.examples[0].extra


def test_hh_rlhf_dialogue_strings_become_turns(tmp_path, write_jsonl):
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4",
             "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 5"},
            {"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "rejected": "\n\nHuman: a\n\nAssistant: d"},
            {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "rejected": "\n\nHuman: a\n\nAssistant: d"}]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    data = load_dataset(DataConfig(path=str(path), on_bad_row="drop"), where="d")
    assert data.report.dropped == {"malformed HH-RLHF dialogue": 2}
    pair = data.examples[0]
    assert pair.prompt == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "2+2?"}]
    assert pair.chosen == [{"role": "assistant", "content": "4"}]
    with pytest.raises(Exception, match=r"hh.jsonl:2 field 'chosen': malformed HH-RLHF dialogue: two Human"):
        load_dataset(DataConfig(path=str(path)), where="d")


def test_llamafactory_rows_with_from_value_messages(tmp_path, write_jsonl):
    rows = [{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"}],
             "chosen": {"from": "gpt", "value": "hello"}, "rejected": {"from": "gpt", "value": "go away"}}]
    data = load_dataset(DataConfig(path=str(write_jsonl(tmp_path / "lf.jsonl", rows))), where="d")
    pair = data.examples[0]
    assert pair.prompt[0] == {"role": "system", "content": "be brief"}
    assert pair.chosen == [{"role": "assistant", "content": "hello"}] and math.isfinite(len(pair.rejected))


# ------------------------------------------------------------------ prm_labels


class OracleSampler:
    """Stands in for HFSampler: from a step prefix, sample 0 finishes the solution correctly when
    the prefix is right, every other sample (and every sample after a wrong prefix) goes wrong."""

    def __init__(self, model, tokenizer, **_kwargs) -> None:
        self.tokenizer = tokenizer

    def generate(self, prompts, params):
        from posttrain.types import Rollout

        out = []
        for i, ids in enumerate(prompts):
            text = self.tokenizer.decode(ids, skip_special_tokens=False).split("assistant\n")[-1]
            a, op, b = text.split(":")[0].split()
            right = worked(int(a), op, int(b), eval(f"{a}{op}{b}"))  # noqa: S307 (two-digit arithmetic)
            for s in range(params.n):
                rest = right[len(text):] if right.startswith(text) and s == 0 else ". 0 + 0 = 0. 1 + 1 = 3."
                out.append(Rollout(list(ids), [1], [0.0], "stop", rest, i, s))
        return out


@pytest.mark.parametrize("label", ["soft", "hard"])
def test_prm_labels_are_the_share_of_continuations_that_reach_the_answer(tmp_path, monkeypatch, label):
    import posttrain.stages.prm as prm_stage

    monkeypatch.setattr(prm_stage, "HFSampler", OracleSampler)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE + f"""  labels:
    kind: prm_labels
    from: base
    data: {{builtin: demo.prm, args: {{n: 24}}}}
    separator: ". "
    verifier: demo
    label: {label}
    sampling: {{n: 2, max_new_tokens: 8}}
""")
    assert main(["run", str(recipe), "--workdir", str(tmp_path / "w"), "--no-progress"]) == 0
    rows = [json.loads(line) for line in next((tmp_path / "w" / "stages" / "labels").glob("*/data.jsonl")).open()]
    assert {r["first_wrong_step"] for r in rows} == {None, 0, 1, 2}
    good = 0.5 if label == "soft" else 1.0
    for row in rows:
        wrong = row["first_wrong_step"]
        expected = [good if wrong is None or k < wrong else 0.0 for k in range(2)] + [float(wrong is None)]
        assert row["labels"] == expected, row
        assert row["completion_correct"] == (wrong is None) and row["provenance"]["prm_labels"]["samples"] == 2
        assert row["steps"] == row["completion"].split(STEP_SEPARATOR)


def test_prm_stage_trains_on_induced_labels_and_reports_localisation(tmp_path, monkeypatch):
    import posttrain.stages.prm as prm_stage
    from posttrain.models.heads import load_reward_model

    monkeypatch.setattr(prm_stage, "HFSampler", OracleSampler)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE + """  labels:
    kind: prm_labels
    from: base
    data: {builtin: demo.prm, args: {n: 16}}
    separator: ". "
    verifier: demo
    sampling: {n: 2, max_new_tokens: 8}
  prm:
    kind: prm
    from: base
    data: {stage: labels}
    separator: ". "
    train: {lr: 1e-3, global_batch_size: 8, micro_batch_size: 4, max_length: 96, checkpoint_every: 0}
    eval:
      - {task: prm_localisation, data: {builtin: demo.prm, split: test, args: {n: 30}}}
""")
    assert main(["run", str(recipe), "--workdir", str(tmp_path / "w"), "--no-progress"]) == 0
    manifest = _manifest(tmp_path / "w", "prm")
    assert manifest["kind"] == "reward_model" and manifest["info"]["data"]["kept"] == 16
    assert 0 <= manifest["metrics"]["prm_first_error_accuracy"] <= 1
    assert manifest["metrics"]["prm_first_error_chance"] == pytest.approx(1 / 3)
    records = [json.loads(line) for line in next((tmp_path / "w" / "stages" / "prm").glob("*/metrics.jsonl")).open()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and "step_accuracy" in records[0]
    model, _ = load_reward_model(next((tmp_path / "w" / "stages" / "prm").glob("*/model")))
    assert model.kind == "prm" and model.meta == {"separator": ". "}


def test_prm_regulariser_reads_only_verified_solutions(demo_tokenizer, tiny_model):
    model = RewardModel(tiny_model(demo_tokenizer), ["step"], kind="prm", init_seed=2)
    prompt = [{"role": "user", "content": "What is 47 + 85?"}]
    right = worked(47, "+", 85, 132).split(STEP_SEPARATOR)
    wrong = corrupt_step(47, "+", 85, 132, 1, __import__("random").Random(0)).split(STEP_SEPARATOR)
    rows = [StepRow(*render_steps(demo_tokenizer, prompt, right, STEP_SEPARATOR), [1.0, 0.75, 1.0]),
            StepRow(*render_steps(demo_tokenizer, prompt, wrong, STEP_SEPARATOR), [1.0, 0.0, 0.0])]
    batch = collate_step_rows(rows, demo_tokenizer.pad_token_id)
    with torch.no_grad():
        plain, _ = prm_objective()(model, batch, 6.0)
        regularised, stats = prm_objective(0.5, chunk=5)(model, batch, 6.0)
        sequence = rows[0].sequence  # only the verified solution is a language-model target
        logp = torch.log_softmax(model.backbone(torch.tensor([sequence.input_ids])).logits[0, :-1], -1)
        targets = [t for t in range(1, len(sequence)) if sequence.loss_mask[t]]
        nll = -sum(float(logp[t - 1, sequence.input_ids[t]]) for t in targets) / len(targets)
    assert stats["verified_nll/__den"] == 1.0 and stats["verified_nll/__num"] == pytest.approx(nll, rel=1e-5)
    assert float(regularised) == pytest.approx(float(plain) + 0.5 * nll / 6.0, rel=1e-5)


# ------------------------------------------------------------------ the demo world's figures (slow)

FIGURES = """\
name: figures
seed: 0
stages:
  base:
    kind: pretrain
    model:
      tokenizer: builtin:demo
      tiny: {hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 256, max_position_embeddings: 256}
    data: {builtin: demo.pretrain, args: {docs: 16000, per_doc: 4}}
    train: {epochs: 1, global_batch_size: 32, micro_batch_size: 32, max_length: 256, lr: 3.0e-3, warmup_steps: 20,
            min_lr_ratio: 0.1, checkpoint_every: 0}
  rm:
    kind: reward_model
    from: base
    data: {builtin: demo.pairs, args: {n: 40000}}
    lm_coefficient: 1.0
    train: {lr: 1.0e-3, warmup_steps: 10, global_batch_size: 32, micro_batch_size: 32, max_length: 96,
            checkpoint_every: 0}
    eval:
      - {task: rm_accuracy}
      - {task: rm_bias_probes, limit: 100}
"""


@pytest.mark.slow
def test_tiny_reward_model_ranks_held_out_correct_answers_above_wrong_ones(tmp_path):
    """A 2-layer model pretrained on worked arithmetic (500 steps), then 1,250 steps of
    Bradley-Terry on demo pairs (right vs wrong final result): held-out ranking accuracy on 300
    test-split pairs (problems never seen in training). Measured: 1.00 (seed 0); 0.92-0.97 for
    seeds 1-3 (docs/reward_models.md)."""
    (tmp_path / "recipe.yaml").write_text(FIGURES)
    assert main(["run", str(tmp_path / "recipe.yaml"), "--workdir", str(tmp_path / "w"), "--no-progress"]) == 0
    metrics = _manifest(tmp_path / "w")["metrics"]
    assert metrics["rm_n"] == 300 and metrics["rm_accuracy"] >= 0.9, metrics
    assert 0.0 <= metrics["rm_bias_length"] <= 1.0 and "rm_bias_false_premise" in metrics


def test_prm_labels_rows_the_verifier_cannot_read_fail_before_sampling(tmp_path, write_jsonl, capsys):
    write_jsonl(tmp_path / "s.jsonl", [{"prompt": "What is 1 + 1?", "completion": "1 + 1 = 2."}])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE + """  labels:
    kind: prm_labels
    from: base
    data: {path: s.jsonl}
    separator: ". "
    verifier: demo
""")
    assert main(["run", str(recipe), "--workdir", str(tmp_path / "w"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "s.jsonl:1 (demo verifier)" in err and "'problem' and 'answer'" in err
    assert not (tmp_path / "w" / "stages").exists()  # failed while preparing: nothing was trained
