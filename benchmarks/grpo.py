"""GRPO throughput and peak memory: posttrain's grpo stage vs TRL's GRPOTrainer, identical workload.

Workload: GSM8K train questions as plain-text prompts (identical token ids on both sides: TRL gets
the BOS text our renderer adds), in order; per optimizer step 2 prompts x G = 8 completions of up
to 32 new tokens sampled at temperature 1.0 (top-p 1, no top-k) with the transformers model (no
vLLM), scored by one deterministic Python reward (``bench_rewards.digit_share``), group-normalised
advantages (r - mean) / (std + 1e-4), PPO-clip loss (eps 0.2; on-policy, so the ratio is 1)
averaged over all completion tokens of the step, no KL (beta 0, so no reference model on either
side), one optimizer step per generation round, AdamW lr 1e-6 (TRL's default), linear schedule,
max grad norm 1.0, fp32. A step = generation + scoring + update on both sides. An untrained model
almost never samples EOS, so nearly every completion is 32 tokens on both sides; our health check
(which stops a run whose completions are all truncated for 5 steps) is set to never stop.

Mapping (docs/rl_algorithms.md): TRL ``scale_rewards="group"`` = our advantage ``grpo``; TRL's
default ``loss_type="dapo"`` = our aggregation ``token-mean``; TRL ``epsilon`` 0.2 = our
``ppo_clip`` default. Tokens per step counted the same way for both: the completion tokens sampled.

Last line of output: one JSON object (name, ours, peer, throughput_ratio, peak_rss_ratio, env).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    TIMING_KEYS,
    PeerClock,
    Stopwatch,
    bench_main,
    check_peer_defaults,
    gsm8k_questions,
    our_timings,
    peer_config,
    report_child,
    run_our_stage,
    setup_child,
    workload_dir,
    write_jsonl,
)

PROMPTS = 2
G = 8
NEW_TOKENS = 32
LR = 1e-6
PEER_OVERRIDES = {
    "bf16": False, "gradient_checkpointing": False, "use_cpu": True, "per_device_train_batch_size": PROMPTS * G,
    "max_completion_length": NEW_TOKENS, "max_steps": "steps", "shuffle_dataset": False, "save_strategy": "no",
    "report_to": [], "logging_steps": 10_000, "disable_tqdm": True, "seed": 0,
}
PEER_DEFAULTS_KEPT = {
    "use_vllm": False, "num_generations": G, "generation_batch_size": PROMPTS * G, "steps_per_generation": 1,
    "num_iterations": 1, "beta": 0.0, "loss_type": "dapo", "scale_rewards": "group", "epsilon": 0.2,
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "learning_rate": LR, "lr_scheduler_type": "linear",
    "max_grad_norm": 1.0, "mask_truncated_completions": False,
}


def _data(folder: Path, steps: int) -> Path:
    path = folder / f"grpo-{steps}.jsonl"
    if not path.exists():
        write_jsonl(path, [{"prompt": q} for q in gsm8k_questions(PROMPTS * steps)])
    return path


def run_ours(size: str, steps: int, warmup: int) -> None:
    import posttrain.stages.grpo as grpo

    folder = workload_dir()
    loop = Stopwatch()
    loop.wrap(grpo, "run_online")
    records, timing = run_our_stage(f"""
name: bench
stages:
  grpo:
    kind: grpo
    model: {{path: {folder / size}}}
    data: {{path: {_data(folder, steps)}}}
    rewards: [{{name: "bench_rewards:digit_share_row"}}]
    sampling: {{n: {G}, temperature: 1.0, top_p: 1.0, top_k: 0, max_new_tokens: {NEW_TOKENS}, batch_size: 64}}
    advantage: {{name: grpo}}
    loss: {{name: ppo_clip}}
    aggregation: token-mean
    kl: {{beta: 0.0}}
    health: {{stop_after: 1000000}}
    train: {{lr: {LR}, schedule: linear, max_steps: {steps}, prompts_per_step: {PROMPTS},
             micro_batch_size: {PROMPTS * G}, shuffle: false, checkpoint_every: 0, precision: fp32,
             max_grad_norm: 1.0}}
""", "grpo")
    tokens = [round(r["completion_length"] * PROMPTS * G) for r in records]
    report_child([r["step_s"] for r in records], tokens, warmup,
                 {"reward_mean": sum(r["reward_mean"] for r in records) / len(records),
                  **our_timings(records, timing, loop, warmup)})


def run_peer(size: str, steps: int, warmup: int) -> None:
    import torch
    from bench_rewards import digit_share_reward
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    folder = workload_dir()
    rows = [json.loads(line) for line in _data(folder, steps).read_text().splitlines()]
    setup_child()
    began = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder / size)
    rows = [{"prompt": tokenizer.bos_token + r["prompt"]} for r in rows]
    model = AutoModelForCausalLM.from_pretrained(folder / size, dtype=torch.float32)
    clock = PeerClock()
    tokens: list[int] = []
    rewards: list[float] = []

    def digit_share(completions, completion_ids, **kwargs):
        tokens.append(sum(len(ids) for ids in completion_ids))
        out = digit_share_reward(completions)
        rewards.extend(out)
        return out

    config = GRPOConfig(output_dir=tempfile.mkdtemp(), **peer_config(PEER_OVERRIDES, steps))
    trainer = GRPOTrainer(model=model, reward_funcs=[digit_share], args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[clock.callback()])
    check_peer_defaults(config, PEER_DEFAULTS_KEPT)
    setup_s = time.perf_counter() - began
    clock.train(trainer)
    clock.report(tokens, warmup, {"setup_s": setup_s, "reward_mean": sum(rewards) / len(rewards)})


def describe(size: str) -> dict:
    return {"model": size, "prompts_per_step": PROMPTS, "completions_per_prompt": G, "max_new_tokens": NEW_TOKENS,
            "reward": "bench_rewards.digit_share", "advantage": "grpo = TRL scale_rewards group",
            "aggregation": "token-mean = TRL loss_type dapo", "kl_beta": 0.0, "data": "gsm8k train questions",
            "tokens": "completion tokens sampled per step",
            "peer_overrides": PEER_OVERRIDES, "peer_defaults_kept": PEER_DEFAULTS_KEPT}


def main() -> None:
    bench_main("grpo", Path(__file__), run_ours, run_peer, _data, "steps_per_s", describe, also=TIMING_KEYS)


if __name__ == "__main__":
    main()
