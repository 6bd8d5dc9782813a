"""DPO throughput and peak memory: posttrain's preference stage vs TRL's DPOTrainer, identical workload.

Workload: HH-RLHF harmless-base test dialogues split at the last "\\n\\nAssistant:" into plain-text
prompt / chosen / rejected, both sequences 64-256 tokens (prompt at most 96, about 60 on average),
4 pairs per optimizer step, sigmoid DPO with beta 0.1, AdamW lr 1e-6 (TRL's default) with a
linear schedule, max grad norm 1.0, sequential data order, fp32. Identical token ids on both
sides: TRL gets the prompt with the BOS text our renderer adds, and both append EOS.

The two sides get their reference log-probs differently: ours computes them in one pass before
training and caches them; TRL (default ``precompute_ref_log_probs=False``) keeps a second model
and runs it in every step. So besides the steady-state step rate (median step after warm-up) each
side reports ``total_s``, the wall time of the same number of steps *including our reference
pass* (ours: reference pass + training loop; TRL: ``trainer.train()``), and ``reference_s``.

TRL runs with its documented defaults except what the workload fixes (listed in the JSON ``env``).
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
    hh_triples,
    our_timings,
    peer_config,
    report_child,
    run_our_stage,
    setup_child,
    workload_dir,
    write_jsonl,
)

PAIRS = 4
LR = 1e-6
BETA = 0.1
MAX_LENGTH = 256
PEER_OVERRIDES = {
    "bf16": False, "gradient_checkpointing": False, "use_cpu": True, "per_device_train_batch_size": PAIRS,
    "max_steps": "steps", "max_length": MAX_LENGTH, "train_sampling_strategy": "sequential",
    "save_strategy": "no", "report_to": [], "logging_steps": 10_000, "disable_tqdm": True, "seed": 0,
}
PEER_DEFAULTS_KEPT = {"loss_type": ["sigmoid"], "beta": BETA, "learning_rate": LR, "lr_scheduler_type": "linear",
                      "max_grad_norm": 1.0, "precompute_ref_log_probs": False}


def _data(folder: Path, steps: int) -> Path:
    from transformers import AutoTokenizer

    path = folder / f"dpo-{steps}.jsonl"
    if not path.exists():
        write_jsonl(path, hh_triples(AutoTokenizer.from_pretrained(folder / "tiny"), PAIRS * steps))
    return path


def run_ours(size: str, steps: int, warmup: int) -> None:
    import posttrain.stages.preference as preference

    folder = workload_dir()
    reference = Stopwatch()
    reference.wrap(preference, "cached_reference_logprobs")
    records, timing = run_our_stage(f"""
name: bench
stages:
  dpo:
    kind: preference
    model: {{path: {folder / size}}}
    data: {{path: {_data(folder, steps)}}}
    loss: {{name: dpo, beta: {BETA}}}
    train: {{lr: {LR}, schedule: linear, global_batch_size: {PAIRS}, micro_batch_size: {PAIRS},
             max_steps: {steps}, max_length: {MAX_LENGTH}, shuffle: false, checkpoint_every: 0,
             precision: fp32, max_grad_norm: 1.0}}
""", "dpo")
    report_child([r["step_s"] for r in records], [r["tokens"] for r in records], warmup,
                 {"reference_s": reference.seconds, **our_timings(records, timing, reference, warmup)})


def run_peer(size: str, steps: int, warmup: int) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    folder = workload_dir()
    rows = [json.loads(line) for line in _data(folder, steps).read_text().splitlines()]
    setup_child()
    began = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder / size)
    rows = [{**r, "prompt": tokenizer.bos_token + r["prompt"]} for r in rows]
    model = AutoModelForCausalLM.from_pretrained(folder / size, dtype=torch.float32)
    clock = PeerClock()
    config = DPOConfig(output_dir=tempfile.mkdtemp(), **peer_config(PEER_OVERRIDES, steps))
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[clock.callback()])
    check_peer_defaults(config, PEER_DEFAULTS_KEPT)
    data = trainer.train_dataset
    lengths = [2 * len(p) + len(c) + len(r) for p, c, r in zip(data["prompt_ids"], data["chosen_ids"],
                                                                  data["rejected_ids"])]
    setup_s = time.perf_counter() - began
    clock.train(trainer)
    clock.report([sum(lengths[i * PAIRS : (i + 1) * PAIRS]) for i in range(steps)], warmup,
                 {"reference_s": 0.0, "setup_s": setup_s})


def describe(size: str) -> dict:
    return {"model": size, "pairs_per_step": PAIRS, "max_length": MAX_LENGTH, "loss": "sigmoid DPO, beta 0.1",
            "data": "hh-rlhf harmless-base test, 64-256 tok per sequence, prompt <= 96 tok",
            "peer_overrides": PEER_OVERRIDES, "peer_defaults_kept": PEER_DEFAULTS_KEPT}


def main() -> None:
    bench_main("dpo", Path(__file__), run_ours, run_peer, _data, "steps_per_s", describe, also=TIMING_KEYS)


if __name__ == "__main__":
    main()
