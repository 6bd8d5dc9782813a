"""The preference and kto stages: our whole path (render -> collate -> chunked logps -> loss) equals
TRL's trainers on the same model, tokenizer and batch; the reference cache; bad pairs; alarms."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tiny_recipes import tiny_sft_base
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from posttrain.cli import main
from posttrain.data.pairs import collate_pairs, pairs_from_ranking, render_pairs
from posttrain.loops.distributed import DistInfo
from posttrain.losses.kto import UNPAIRED_LOSSES
from posttrain.monitoring.diagnostics import LengthBiasAlarm, MarginCollapseAlarm
from posttrain.stages.kto import KTOObjective, _render, collate_kto
from posttrain.stages.preference import preference_objective
from posttrain.stages.reference import score_sequences
from posttrain.types import KTOExample, PreferencePair, RowSource

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
PAIRS = [
    {"prompt": "What is 12 + 30?", "chosen": " 12 + 30 = 42.", "rejected": " 12 + 30 = 43. I think."},
    {"prompt": "Compute 55 - 17.", "chosen": " 55 - 17 = 38.", "rejected": " 55 - 17 = 48."},
    {"prompt": "9 + 9 = ?", "chosen": " 18", "rejected": " 19 or maybe 20"},
    {"prompt": "What is 70 + 21?", "chosen": " 70 + 21 = 91.", "rejected": " 91? no, 92."},
]


@pytest.fixture(scope="module")
def world(demo_tokenizer, tiny_model):
    warnings.filterwarnings("ignore")
    tokenizer = copy.deepcopy(demo_tokenizer)
    tokenizer.bos_token = None  # TRL adds no BOS for this tokenizer; neither do we then
    policy = tiny_model(tokenizer, hidden=32, seed=1).eval()
    reference = tiny_model(tokenizer, hidden=32, seed=2).eval()
    with torch.no_grad():  # make policy and reference disagree by whole nats
        for p in list(policy.parameters()) + list(reference.parameters()):
            p.mul_(8.0)
    return tokenizer, policy, reference


def _ours_dpo(world, specs):
    tokenizer, policy, reference = world
    pairs = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], RowSource("x", i)) for i, r in enumerate(PAIRS)]
    rendered, _ = render_pairs(tokenizer, pairs, max_length=128, max_prompt_length=None, on_overlong="error",
                               on_bad_pair="error", max_dropped_share=0.0, where="t")
    sequences = [s for p in rendered for s in (p.chosen, p.rejected)]
    ref = score_sequences(reference, sequences, tokenizer.pad_token_id, batch_size=3, chunk=7)
    objective = preference_objective(specs, ref, chunk=5)
    with torch.no_grad():
        loss, stats = objective(policy, collate_pairs(rendered, tokenizer.pad_token_id), float(len(rendered)))
    return float(loss), stats


def _trl_args(tmp_path, **kwargs):
    return dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", bf16=False, **kwargs)


@pytest.mark.parametrize(("loss_type", "specs"), [
    (["sigmoid"], [("dpo", 1.0, {"beta": 0.3})]),
    (["ipo"], [("ipo", 1.0, {"beta": 0.3})]),
    (["sigmoid_norm"], [("sigmoid_norm", 1.0, {"beta": 0.3})]),
    (["sigmoid", "sft"], [("dpo", 1.0, {"beta": 0.3}), ("sft", 0.5, {})]),
])
def test_stage_objective_equals_trl_dpo_trainer(world, tmp_path, loss_type, specs):
    tokenizer, policy, reference = world
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), processing_class=tokenizer,
                         args=DPOConfig(per_device_train_batch_size=4, beta=0.3, loss_type=loss_type,
                                        loss_weights=[1.0, 0.5][: len(loss_type)], **_trl_args(tmp_path)),
                         train_dataset=Dataset.from_list(PAIRS))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, batch))
    if "sft" in loss_type:
        # TRL's sft term is a token mean over the micro-batch; ours defaults to a per-pair mean
        # (the RPO paper's). Pass TRL's normaliser to compare the same number.
        lengths = batch["completion_mask"][: len(PAIRS), 1:].sum().item() / len(PAIRS)
        specs = [specs[0], ("sft", 0.5, {"nll_length_normaliser": lengths})]
    ours, _ = _ours_dpo(world, specs)
    assert abs(ours - theirs) < 1e-5, (ours, theirs)
    assert abs(ours) > 1e-3


def test_stage_kto_objective_equals_trl_kto_trainer(world, tmp_path):
    tokenizer, policy, reference = world
    rows = [{"prompt": p["prompt"], "completion": p["chosen"] if i % 2 == 0 else p["rejected"], "label": i % 2 == 0}
            for i, p in enumerate(PAIRS)]
    trainer = KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), processing_class=tokenizer,
                         args=KTOConfig(per_device_train_batch_size=4, beta=0.3, **_trl_args(tmp_path)),
                         train_dataset=Dataset.from_list(rows))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, batch))
    examples = [KTOExample(r["prompt"], r["completion"], r["label"], RowSource("x", i)) for i, r in enumerate(rows)]
    rendered = _render(tokenizer, examples, 128, "error")
    sequences = [r.target for r in rendered] + [r.mismatched for r in rendered]
    ref = score_sequences(reference, sequences, tokenizer.pad_token_id, batch_size=8, chunk=16)
    objective = KTOObjective(UNPAIRED_LOSSES.get("kto"), {"beta": 0.3}, ref, 16, CPU)
    kto_batch = collate_kto(rendered, tokenizer.pad_token_id, len(rendered))
    with torch.no_grad():
        objective.before_step(policy, [kto_batch])
        ours, _ = objective(policy, kto_batch, float(len(rows)))
    assert abs(float(ours) - theirs) < 1e-5, (float(ours), theirs)


def test_rankings_become_pairs_without_ties():
    src = RowSource("r", 1)
    best = pairs_from_ranking("p", ["a", "b", "c", "d"], [3.0, 1.0, 3.0, 2.0], mode="best_vs_rest", source=src)
    assert [(p.chosen, p.rejected) for p in best] == [("a", "d"), ("a", "b")]  # a ties c: no pair
    every = pairs_from_ranking("p", ["a", "b", "c"], [1.0, 3.0, 2.0], mode="all_pairs", source=src)
    assert [(p.chosen, p.rejected, p.extra["margin"]) for p in every] == [("b", "c", 1.0), ("b", "a", 2.0),
                                                                          ("c", "a", 1.0)]


def test_margin_collapse_alarm():
    alarm = MarginCollapseAlarm(window=4, threshold=0.5)
    healthy = [{"logps_per_token/chosen": -1.0 + 0.01 * i, "logps_per_token/rejected": -1.0 - 0.2 * i}
               for i in range(8)]
    assert not any(alarm(i + 1, m) for i, m in enumerate(healthy))
    collapsing = [{"logps_per_token/chosen": -1.0 - 0.3 * i, "logps_per_token/rejected": -1.0 - 0.5 * i}
                  for i in range(8)]
    alarm = MarginCollapseAlarm(4, 0.5)
    fired = [i + 1 for i, m in enumerate(collapsing) if alarm(i + 1, m)]
    assert fired == [4, 8]  # chosen fell 0.9 nats over the window (> 0.5); once per window


def _moments(xs, ys):
    return {"length_bias/sum_x": sum(xs), "length_bias/sum_y": sum(ys),
            "length_bias/sum_xy": sum(x * y for x, y in zip(xs, ys)), "length_bias/sum_xx": sum(x * x for x in xs),
            "length_bias/sum_yy": sum(y * y for y in ys), "length_bias/sum_n": len(xs)}


def test_length_bias_alarm():
    gaps = [float(g) for g in range(-8, 8)]
    biased = LengthBiasAlarm(window=2, threshold=0.6, min_pairs=16)
    assert biased(1, _moments(gaps, [0.5 * g + 0.1 for g in gaps])) == []  # the window is not full yet
    assert "length bias" in biased(2, _moments(gaps, [0.5 * g - 0.1 for g in gaps]))[0]
    unbiased = LengthBiasAlarm(window=2, threshold=0.6, min_pairs=16)
    noise = [((i * 7919) % 13) / 13 for i in range(16)]
    assert unbiased(1, _moments(gaps, noise)) == [] and unbiased(2, _moments(gaps, noise[::-1])) == []


# ------------------------------------------------------------------ through the CLI

BASE = tiny_sft_base("pref", n=32)
RECIPE = """\
  dpo:
    kind: preference
    from: base
    data: {data}
    loss: {loss}
    train: {{lr: 1e-3, global_batch_size: 8, micro_batch_size: 4, max_length: 96, checkpoint_every: 0}}
{extra}"""


def _run(tmp_path: Path, overrides=(), data="{builtin: demo.pairs, args: {n: 32}}", loss="{name: dpo, beta: 0.1}",
         extra="", workdir="work") -> tuple[int, Path]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE + RECIPE.format(data=data, loss=loss, extra=extra))
    args = ["run", str(recipe), "--workdir", str(tmp_path / workdir), "--no-progress"]
    for o in overrides:
        args += ["--set", o]
    return main(args), tmp_path / workdir


def _dpo_manifest(work: Path, key_index: int = -1) -> dict:
    manifests = sorted((work / "stages" / "dpo").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(manifests[key_index].read_text())


def test_reference_cache_reused_for_lr_recomputed_for_data_and_reference(tmp_path):
    code, work = _run(tmp_path)
    assert code == 0 and _dpo_manifest(work)["info"]["reference_cache"] == "computed"
    assert _run(tmp_path, ["stages.dpo.train.lr=5e-4"])[0] == 0
    assert _dpo_manifest(work)["info"]["reference_cache"] == "hit"
    assert _run(tmp_path, ["stages.dpo.data.args.n=24"])[0] == 0
    assert _dpo_manifest(work)["info"]["reference_cache"] == "computed"
    assert _run(tmp_path, ["stages.base.train.lr=2e-3"])[0] == 0  # a different reference model
    assert _dpo_manifest(work)["info"]["reference_cache"] == "computed"


def test_reference_free_loss_computes_no_reference(tmp_path):
    code, work = _run(tmp_path, loss="{name: simpo, beta: 2.0, gamma: 0.5}")
    assert code == 0
    manifest = _dpo_manifest(work)
    assert manifest["info"]["reference_cache"] is None and not (work / "cache" / "reference").exists()


def test_unknown_loss_and_loss_parameter_are_config_errors(tmp_path, capsys):
    code, _ = _run(tmp_path, loss="[{name: dpoo}, {name: simpo, bta: 1}]")
    err = capsys.readouterr().err
    assert code == 2 and "stages.dpo.loss.0.name" in err and "did you mean 'dpo'" in err
    assert "stages.dpo.loss.1.bta" in err and "its parameters: beta, gamma" in err


def _bad_pairs(tmp_path: Path) -> str:
    rows = [{"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"},
            {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "4"},
            {"prompt": "What is 3 + 3?", "chosen": "6", "rejected": "   "},
            {"prompt": "What is 4 + 4?" * 20, "chosen": "8", "rejected": "9"}] + [
        {"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(30)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return "{path: pairs.jsonl}"


def test_bad_pairs_fail_naming_the_row_or_are_dropped_and_counted(tmp_path, capsys):
    data = _bad_pairs(tmp_path)
    code, work = _run(tmp_path, data=data, extra="    max_prompt_length: 40\n")
    err = capsys.readouterr().err
    assert code == 2 and "pairs.jsonl:2" in err and "identical chosen and rejected" in err
    assert not work.exists()
    code, work = _run(tmp_path, data=data, extra="    max_prompt_length: 40\n    on_bad_pair: drop\n")
    assert code == 0
    dropped = _dpo_manifest(work)["info"]["pairs"]["dropped"]
    assert dropped == {"identical chosen and rejected": 1, "empty response": 1,
                       "prompt longer than max_prompt_length 40": 1}


def test_kto_stage_runs_and_reports_z0(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE + RECIPE.format(data="{builtin: demo.pairs, args: {n: 16}}", loss="{name: dpo}",
                                           extra="").rstrip() + """
  kto:
    kind: kto
    from: base
    data: {builtin: demo.kto, args: {n: 32}}
    loss: {name: kto, beta: 0.1, desirable_weight: 1.0, undesirable_weight: 1.0}
    train: {lr: 1e-3, global_batch_size: 8, micro_batch_size: 4, max_length: 96, checkpoint_every: 0}
""")
    assert main(["run", str(recipe), "--workdir", str(tmp_path / "w"), "--no-progress"]) == 0
    records = [json.loads(line) for line in next((tmp_path / "w" / "stages" / "kto").glob("*/metrics.jsonl"))
               .read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4 and all("kl_baseline" in r and r["kl_baseline"] >= 0 for r in steps)
    assert all("rewards/chosen" in r and "rewards/rejected" in r for r in steps)
