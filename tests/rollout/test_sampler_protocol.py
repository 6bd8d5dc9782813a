"""Rollout engines behind the ``Sampler`` protocol: the hf engine satisfies it and labels rollouts
with the synced version; the vllm engine is importable without vLLM (and never imports it before
it is built); choosing it where it cannot run is a config error naming its YAML path, reported
before anything runs; and the new sampling keys leave existing stage keys unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_recipes import tiny_sft_base

from posttrain.cli import main
from posttrain.config.recipe import load_recipe
from posttrain.pipeline.artifacts import key_config, stage_key
from posttrain.rollout import engines
from posttrain.rollout.base import Sampler, SamplingParams
from posttrain.rollout.hf import HFSampler
from posttrain.rollout.vllm import VLLMSampler

REPO = Path(__file__).resolve().parents[2]

BASE = tiny_sft_base("engines", n=16, lr="3e-3", batch=8)
RECIPE = """\
  rl:
    kind: {kind}
    from: base
    data: {{builtin: demo.prompts, args: {{n: 8}}}}
    rewards: [{{name: math}}]
    sampling: {sampling}
    train: {{lr: 1e-3, max_steps: 1, prompts_per_step: 4, micro_batch_size: 4}}
"""


def _recipe(tmp_path: Path, sampling: str = "{n: 2, max_new_tokens: 8}", kind: str = "grpo") -> Path:
    path = tmp_path / f"{kind}.yaml"
    path.write_text(BASE + RECIPE.format(sampling=sampling, kind=kind))
    return path


def test_the_engines_satisfy_the_sampler_protocol(demo_tokenizer, tiny_model):
    model = tiny_model(demo_tokenizer)
    sampler = HFSampler(model, demo_tokenizer)
    assert isinstance(sampler, Sampler)
    sampler.sync(model, 3)
    prompt = demo_tokenizer("1 + 1 =")["input_ids"]
    rollouts = sampler.generate([prompt], SamplingParams(n=2, max_new_tokens=2), keys=[5])
    assert [(r.policy_version, r.prompt_index, r.sample_index) for r in rollouts] == [(3, 5, 0), (3, 5, 1)]
    engine = object.__new__(VLLMSampler)  # its constructor needs vLLM and a GPU
    engine.version = 0
    assert isinstance(engine, Sampler)


def test_importing_the_vllm_engine_and_the_stages_does_not_import_vllm(tmp_path):
    # A stand-in vllm package on the path: a stray `import vllm` would succeed and show up.
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("")
    script = (
        "import sys\n"
        "import posttrain.rollout.vllm, posttrain.rollout.engines, posttrain.stages.online\n"
        "import posttrain.stages.grpo, posttrain.stages.ppo, posttrain.pipeline.runner, posttrain.cli\n"
        "from posttrain.rollout.vllm import vllm_unavailable\n"
        "reason = vllm_unavailable()\n"
        "assert reason is None or 'not installed' not in reason, reason  # the stand-in was found\n"
        "assert 'vllm' not in sys.modules, 'vllm was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_engine_vllm_where_it_cannot_run_names_the_yaml_key_and_runs_nothing(tmp_path, capsys, monkeypatch, kind):
    monkeypatch.setattr(engines, "vllm_unavailable", lambda: "the vllm package is not installed")
    recipe = _recipe(tmp_path, "{n: 2, max_new_tokens: 8, engine: vllm}", kind)
    for argv in (["validate", str(recipe)], ["run", str(recipe), "--workdir", str(tmp_path / "w"), "--no-progress"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "stages.rl.sampling.engine" in err and "the vllm package is not installed" in err, err
        assert "install vllm on a CUDA machine" in err and "use engine: hf" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_engine_vllm_with_settings_vllm_cannot_report_our_logprobs_for_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(engines, "vllm_unavailable", lambda: None)
    recipe = _recipe(tmp_path, "{n: 2, engine: vllm, temperature: 0.7, top_k: 20}")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "stages.rl.sampling" in err and "renormalised over the top-k/top-p tokens" in err, err
    assert "set top_k: 0 and top_p: 1, or temperature: 1, or use engine: hf" in err


@pytest.mark.parametrize(("sampling", "expected"), [
    ("{n: 2, vllm: {enforce_eager: true}}", "'vllm' has no effect with engine: hf"),
    ("{n: 2, engine: vllm, batch_size: 8}", "'batch_size' has no effect with engine: vllm"),
    ("{n: 2, engine: sglang}", "stages.rl.sampling.engine"),
    ("{n: 2, engine: vllm, vllm: {gpu_memory_util: 0.5}}", "did you mean 'gpu_memory_utilization'"),
])
def test_engine_settings_mistakes_name_their_yaml_paths(tmp_path, capsys, sampling, expected):
    assert main(["validate", str(_recipe(tmp_path, sampling))]) == 2
    err = capsys.readouterr().err
    assert "stages.rl.sampling" in err and expected in err and "Traceback" not in err, err


def test_the_default_hf_engine_leaves_stage_keys_unchanged_and_vllm_changes_them(tmp_path):
    default = load_recipe(_recipe(tmp_path))
    stage = default.stages["rl"]
    full = stage.model_dump(by_alias=True, mode="json")["sampling"]
    assert full["engine"] == "hf" and "vllm" in full  # written to config.json and shown by plan
    keyed = key_config(stage)["sampling"]
    assert keyed == {k: v for k, v in full.items() if k not in ("engine", "vllm")}
    keys = {p: "parent" for p in ("base",)}
    explicit = load_recipe(_recipe(tmp_path, "{n: 2, max_new_tokens: 8, engine: hf}"))
    assert stage_key(explicit.stages["rl"], explicit, keys) == stage_key(stage, default, keys)
    vllm = load_recipe(_recipe(tmp_path, "{n: 2, max_new_tokens: 8, engine: vllm}"))
    assert stage_key(vllm.stages["rl"], vllm, keys) != stage_key(stage, default, keys)


def test_shared_prompt_packing_is_on_by_default_without_changing_stage_keys(tmp_path):
    """Packed and padded micro-batches give the same logprobs (tests/loops/test_rl_batch.py), so
    the switch added after artifacts existed keeps their keys at its default, and only turning it
    off changes them."""
    path = _recipe(tmp_path)
    default = load_recipe(path)
    stage = default.stages["rl"]
    assert stage.train.share_prompt is True and "share_prompt" not in key_config(stage)["train"]
    keys = {"base": "parent"}
    explicit = load_recipe(path, ["stages.rl.train.share_prompt=true"])
    assert stage_key(explicit.stages["rl"], explicit, keys) == stage_key(stage, default, keys)
    off = load_recipe(path, ["stages.rl.train.share_prompt=false"])
    assert stage_key(off.stages["rl"], off, keys) != stage_key(stage, default, keys)
