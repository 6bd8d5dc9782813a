"""Reward-model throughput and peak memory: posttrain's reward_model stage vs TRL's RewardTrainer,
identical workload.

Workload: HH-RLHF harmless-base test dialogues split at the last "\\n\\nAssistant:" into plain-text
prompt / chosen / rejected, both sequences 64-256 tokens (prompt at most 96, about 60 on average),
8 pairs per optimizer step, Bradley-Terry loss, AdamW lr 1e-4 (TRL's default) with a linear
schedule, max grad norm 1.0, sequential data order, fp32, the same initial weights on both sides
(the backbone from the shared workload folder; the scalar head drawn from the same seeded normal
with std 0.02). Identical token ids: TRL gets the prompt with the BOS text our renderer adds, and
both append EOS. Tokens counted the same way for both: every token of both sequences of every
pair (our shared-prompt batches count the prompt twice too, as if it had been computed twice).

TRL runs with its documented defaults except what the workload fixes (listed in the JSON ``env``:
bf16 off (TRL's default is bf16 even on CPU), gradient checkpointing off, use_cpu, batch size,
steps, max_length 256, sequential sampling, no saving, no reporting). Besides the median step
rate, each side reports ``total_s`` / ``total_cpu_s`` (the training loop's wall and CPU seconds)
and ``median_step_cpu_s``.

Last line of output: one JSON object (name, ours, peer, throughput_ratio, peak_rss_ratio, env).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    TIMING_KEYS,
    PeerClock,
    Stopwatch,
    bench_main,
    check_peer_defaults,
    hh_triples,
    our_timings,
    peer_config,
    report_child,
    run_our_stage,
    setup_child,
    workload_dir,
    write_jsonl,
)

PAIRS = 8
LR = 1e-4
MAX_LENGTH = 256
HEAD_SEED = 0  # our stage seeds its head with the recipe's seed; the peer gets the same draw
PEER_OVERRIDES = {
    "bf16": False, "gradient_checkpointing": False, "use_cpu": True, "per_device_train_batch_size": PAIRS,
    "max_steps": "steps", "max_length": MAX_LENGTH, "train_sampling_strategy": "sequential",
    "save_strategy": "no", "report_to": [], "logging_steps": 10_000, "disable_tqdm": True, "seed": 0,
}
PEER_DEFAULTS_KEPT = {"learning_rate": LR, "lr_scheduler_type": "linear", "max_grad_norm": 1.0,
                      "center_rewards_coefficient": None, "disable_dropout": True, "pad_to_multiple_of": None}


def _data(folder: Path, steps: int) -> Path:
    from transformers import AutoTokenizer

    path = folder / f"rm-{steps}.jsonl"
    if not path.exists():
        write_jsonl(path, hh_triples(AutoTokenizer.from_pretrained(folder / "tiny"), PAIRS * steps))
    return path


def head_weight(hidden: int, std: float = 0.02):
    """The initial head both sides use (what ``RewardModel(init_seed=HEAD_SEED)`` draws)."""
    import torch

    return torch.randn((1, hidden), generator=torch.Generator().manual_seed(HEAD_SEED)) * std


def run_ours(size: str, steps: int, warmup: int) -> None:
    import posttrain.stages.reward_model as reward_model

    folder = workload_dir()
    loop = Stopwatch()
    loop.wrap(reward_model, "run_offline")
    records, timing = run_our_stage(f"""
name: bench
seed: {HEAD_SEED}
stages:
  rm:
    kind: reward_model
    model: {{path: {folder / size}}}
    data: {{path: {_data(folder, steps)}}}
    train: {{lr: {LR}, schedule: linear, global_batch_size: {PAIRS}, micro_batch_size: {PAIRS},
             max_steps: {steps}, max_length: {MAX_LENGTH}, shuffle: false, checkpoint_every: 0,
             precision: fp32, max_grad_norm: 1.0}}
""", "rm")
    report_child([r["step_s"] for r in records], [r["tokens"] for r in records], warmup,
                 our_timings(records, timing, loop, warmup))


def run_peer(size: str, steps: int, warmup: int) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    folder = workload_dir()
    rows = [json.loads(line) for line in _data(folder, steps).read_text().splitlines()]
    setup_child()
    tokenizer = AutoTokenizer.from_pretrained(folder / size)
    rows = [{**r, "prompt": tokenizer.bos_token + r["prompt"]} for r in rows]
    model = AutoModelForSequenceClassification.from_pretrained(folder / size, num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.copy_(head_weight(model.config.hidden_size, model.config.initializer_range))
    clock = PeerClock()
    config = RewardConfig(output_dir=tempfile.mkdtemp(), **peer_config(PEER_OVERRIDES, steps))
    trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                            callbacks=[clock.callback()])
    check_peer_defaults(config, PEER_DEFAULTS_KEPT)
    data = trainer.train_dataset
    if len(data) != len(rows):
        raise RuntimeError(f"TRL dropped {len(rows) - len(data)} pairs; the workload must fit max_length")
    lengths = [len(c) + len(r) for c, r in zip(data["chosen_ids"], data["rejected_ids"])]
    clock.train(trainer)
    clock.report([sum(lengths[i * PAIRS : (i + 1) * PAIRS]) for i in range(steps)], warmup)


def describe(size: str) -> dict:
    return {"model": size, "pairs_per_step": PAIRS, "max_length": MAX_LENGTH, "loss": "Bradley-Terry",
            "data": "hh-rlhf harmless-base test, 64-256 tok per sequence, prompt <= 96 tok",
            "peer_overrides": PEER_OVERRIDES, "peer_defaults_kept": PEER_DEFAULTS_KEPT}


def main() -> None:
    bench_main("rm", Path(__file__), run_ours, run_peer, _data, "tokens_per_s", describe, also=TIMING_KEYS)


if __name__ == "__main__":
    main()
