"""Check the vllm rollout engine (posttrain/rollout/vllm.py) on a CUDA machine with vLLM installed.
It has not been run in this repository yet: no GPU was lent when the engine was written.

On a tiny Llama built in memory (the demo tokenizer; hidden 256, 2 layers, 4 heads of 64, fp32):

1. gap: max |sampler logprob - trainer logprob| over every sampled token, the trainer's logprobs
   recomputed by the online loop's path (``loops.online.batch_logprobs``), in fp32 and under bf16
   autocast (what the loop's ``logprob_gap_max`` sees on a GPU with ``precision: auto``);
2. sync: after one optimizer step, ``generate`` must refuse (stale engine); after
   ``sync(model, 1)`` the engine's samples change, their gap to the updated trainer is as small as
   before, and their gap to the pre-step weights is not (so the engine really holds the new ones);
3. temperature 0: the same ids twice, and alone vs. batched; agreement with the hf engine's greedy
   ids is reported, not required (different kernels).

Each temperature runs in a fresh process (one engine per process; the logprobs mode is fixed per
engine): 1.0 exercises vLLM's raw_logprobs, 0.7 its processed_logprobs.

    python benchmarks/gpu_vllm_check.py [--temperatures 1.0,0.7] [--dtype model|bfloat16] [--max-gap 0.05]

Prints the numbers of each check, then one JSON line per temperature; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from posttrain.config.components import TinyModelConfig  # noqa: E402
from posttrain.data.render import render_prompt  # noqa: E402
from posttrain.demo.world import demo_tokenizer, prompt_rows  # noqa: E402
from posttrain.loops.online import batch_logprobs  # noqa: E402
from posttrain.loops.rl_batch import build_batch, policy_logprobs  # noqa: E402
from posttrain.models.tiny import build_tiny_llama  # noqa: E402
from posttrain.rollout.base import SamplingParams  # noqa: E402
from posttrain.rollout.hf import HFSampler  # noqa: E402
from posttrain.types import Rollout  # noqa: E402

PROMPTS, SAMPLES, NEW_TOKENS = 8, 4, 32


def gaps(model: torch.nn.Module, rollouts: list[Rollout], temperature: float, pad_id: int) -> dict[str, float]:
    """Max and mean |sampler - trainer| logprob over the sampled tokens, trainer in fp32 and bf16."""
    batch = build_batch(rollouts, [0.0] * len(rollouts), pad_id, mask_truncated=False).to("cuda")
    keep = batch.completion
    out = {}
    for name, context in (("fp32", torch.autocast("cuda", enabled=False)),
                          ("bf16_autocast", torch.autocast("cuda", dtype=torch.bfloat16))):
        with context:
            trainer = batch_logprobs(model, batch, temperature=temperature, chunk=1024, micro_batch_size=16,
                                     share_prompt=False)
        gap = (trainer - batch.sampler_logp).abs()[keep]
        out[f"gap_max_{name}"], out[f"gap_mean_{name}"] = float(gap.max()), float(gap.mean())
    return out


def optimizer_step(model: torch.nn.Module, rollouts: list[Rollout], temperature: float, pad_id: int) -> None:
    """One AdamW step raising the sampled completions' likelihood: enough to move every weight."""
    batch = build_batch(rollouts, [0.0] * len(rollouts), pad_id, mask_truncated=False).to("cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    logp, _ = policy_logprobs(model, batch, temperature=temperature, chunk=1024)
    (-(logp * batch.completion).sum() / batch.completion.sum()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def check_sync(sampler, model, prompts, params, keys, before, pad_id) -> dict:
    old = copy.deepcopy(model)
    optimizer_step(model, before, params.temperature, pad_id)
    try:
        sampler.generate(prompts, params, keys)
        refused = False
    except RuntimeError as err:
        refused = "stale vLLM engine" in str(err)
    t0 = time.perf_counter()
    sampler.sync(model, 1)
    sync_s = time.perf_counter() - t0
    after = sampler.generate(prompts, params, keys)
    changed = any(a.completion_ids != b.completion_ids or a.logprobs != b.logprobs for a, b in zip(before, after))
    return {"stale_generate_refused": refused, "outputs_changed_after_sync": changed, "sync_s": sync_s,
            "after_sync": gaps(model, after, params.temperature, pad_id),
            "after_sync_vs_pre_step_weights": gaps(old, after, params.temperature, pad_id)}


def check_greedy(sampler, model, tokenizer, prompts, keys) -> dict:
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=NEW_TOKENS)
    first = [r.completion_ids for r in sampler.generate(prompts, greedy, keys)]
    second = [r.completion_ids for r in sampler.generate(prompts, greedy, keys)]
    alone = [sampler.generate([p], greedy, [k])[0].completion_ids for p, k in zip(prompts, keys)]
    hf = [r.completion_ids for r in HFSampler(model, tokenizer).generate(prompts, greedy, keys)]
    return {"greedy_repeatable": first == second, "greedy_batch_invariant": first == alone,
            "greedy_agrees_with_hf": sum(a == b for a, b in zip(first, hf)) / len(first)}


def run_one(temperature: float, dtype: str, gpu_memory_utilization: float, max_gap: float) -> bool:
    import vllm

    from posttrain.rollout.vllm import VLLMSampler

    tokenizer = demo_tokenizer()
    cfg = TinyModelConfig(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=512,
                          max_position_embeddings=512, init_seed=0)
    model = build_tiny_llama(cfg, tokenizer).to("cuda")
    prompts = [render_prompt(tokenizer, row["prompt"]) for row in prompt_rows("test", {"n": PROMPTS})]
    keys = list(range(len(prompts)))
    params = SamplingParams(n=SAMPLES, temperature=temperature, max_new_tokens=NEW_TOKENS, seed=0)
    t0 = time.perf_counter()
    sampler = VLLMSampler(model, tokenizer, params, gpu_memory_utilization=gpu_memory_utilization, dtype=dtype,
                          max_model_len=512)
    report = {"temperature": temperature, "dtype": dtype, "logprobs_mode": sampler.logprobs_mode,
              "engine_start_s": time.perf_counter() - t0, "vllm": vllm.__version__,
              "gpu": torch.cuda.get_device_name()}
    before = sampler.generate(prompts, params, keys)
    report["tokens_sampled"] = sum(len(r.completion_ids) for r in before)
    report["before_step"] = gaps(model, before, temperature, tokenizer.pad_token_id)
    report["greedy"] = check_greedy(sampler, model, tokenizer, prompts, keys)
    report["sync"] = check_sync(sampler, model, prompts, params, keys, before, tokenizer.pad_token_id)
    failures = failed_checks(report, max_gap)
    for section in ("before_step", "greedy", "sync"):
        print(f"T={temperature} {section}: {json.dumps(report[section])}")
    print(json.dumps({**report, "failures": failures}))
    return not failures


def failed_checks(report: dict, max_gap: float) -> list[str]:
    sync, greedy = report["sync"], report["greedy"]
    checks = {
        f"gap before the step <= {max_gap}": report["before_step"]["gap_max_fp32"] <= max_gap,
        f"gap after sync <= {max_gap}": sync["after_sync"]["gap_max_fp32"] <= max_gap,
        "the pre-step weights explain the new samples worse": (sync["after_sync_vs_pre_step_weights"]["gap_mean_fp32"]
                                                               > 10 * sync["after_sync"]["gap_mean_fp32"]),
        "a stale engine refused to generate": sync["stale_generate_refused"],
        "samples changed after sync": sync["outputs_changed_after_sync"],
        "greedy repeatable": greedy["greedy_repeatable"],
    }
    return [name for name, ok in checks.items() if not ok]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--temperatures", default="1.0,0.7", help="comma-separated; one process each")
    parser.add_argument("--dtype", default="model", choices=["model", "bfloat16", "float16", "float32"])
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--max-gap", type=float, default=0.05, help="the health alarm's default (health.logprob_gap)")
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return 0 if run_one(args.child, args.dtype, args.gpu_memory_utilization, args.max_gap) else 1
    if not torch.cuda.is_available():
        print("no CUDA GPU: this check needs one (and vllm installed)", file=sys.stderr)
        return 2
    ok = True
    for temperature in args.temperatures.split(","):
        done = subprocess.run([sys.executable, __file__, "--child", temperature, "--dtype", args.dtype,
                               "--gpu-memory-utilization", str(args.gpu_memory_utilization),
                               "--max-gap", str(args.max_gap)])
        ok &= done.returncode == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
