"""KTO throughput and peak memory: posttrain's kto stage vs TRL's KTOTrainer, identical workload.

Workload: unpaired rows from HH-RLHF harmless-base test (split at the last "\\n\\nAssistant:", as in
dpo.py), alternating desirable (the chosen response of one dialogue) and undesirable (the rejected
response of the next), sequences 64-256 tokens (prompt at most 96), 8 rows per optimizer step,
KTO with beta 0.1 and unit weights, AdamW lr 1e-6 (TRL's default), linear schedule, max grad norm
1.0, sequential order, fp32. Identical token ids on both sides (TRL gets the BOS text our renderer
adds). Both estimate the KL reference point z0 from 8 mismatched (prompt, another row's
completion) sequences per step: TRL rotates completions within each batch, we pair each row with
the previous one; the same number and kind of sequences.

Reference log-probs: ours are computed in one pass before training and cached (targets and
mismatched sequences); TRL (default ``precompute_ref_log_probs=False``) runs its reference model on
both in every step. Besides the steady-state step rate each side reports ``total_s``: the same
number of steps *including our reference pass* (ours: reference pass + loop; TRL: ``train()``).

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

ROWS = 8
LR = 1e-6
BETA = 0.1
MAX_LENGTH = 256
PEER_OVERRIDES = {
    "bf16": False, "gradient_checkpointing": False, "use_cpu": True, "per_device_train_batch_size": ROWS,
    "max_steps": "steps", "max_length": MAX_LENGTH, "save_strategy": "no", "report_to": [],
    "logging_steps": 10_000, "disable_tqdm": True, "seed": 0,
}
PEER_DEFAULTS_KEPT = {"loss_type": "kto", "beta": BETA, "desirable_weight": 1.0, "undesirable_weight": 1.0,
                      "learning_rate": LR, "lr_scheduler_type": "linear", "max_grad_norm": 1.0,
                      "train_sampling_strategy": "sequential", "precompute_ref_log_probs": False}


def _data(folder: Path, steps: int) -> Path:
    from transformers import AutoTokenizer

    path = folder / f"kto-{steps}.jsonl"
    if not path.exists():
        triples = hh_triples(AutoTokenizer.from_pretrained(folder / "tiny"), ROWS * steps)
        rows = [{"prompt": t["prompt"], "completion": t["chosen"] if i % 2 == 0 else t["rejected"],
                 "label": i % 2 == 0} for i, t in enumerate(triples)]
        write_jsonl(path, rows)
    return path


def run_ours(size: str, steps: int, warmup: int) -> None:
    import posttrain.stages.kto as kto

    folder = workload_dir()
    reference = Stopwatch()
    reference.wrap(kto, "cached_reference_logprobs")
    records, timing = run_our_stage(f"""
name: bench
stages:
  kto:
    kind: kto
    model: {{path: {folder / size}}}
    data: {{path: {_data(folder, steps)}}}
    loss: {{name: kto, beta: {BETA}}}
    train: {{lr: {LR}, schedule: linear, global_batch_size: {ROWS}, micro_batch_size: {ROWS},
             max_steps: {steps}, max_length: {MAX_LENGTH}, shuffle: false, checkpoint_every: 0,
             precision: fp32, max_grad_norm: 1.0}}
""", "kto")
    report_child([r["step_s"] for r in records], [r["tokens"] for r in records], warmup,
                 {"reference_s": reference.seconds, **our_timings(records, timing, reference, warmup)})


def run_peer(size: str, steps: int, warmup: int) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    folder = workload_dir()
    rows = [json.loads(line) for line in _data(folder, steps).read_text().splitlines()]
    setup_child()
    began = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder / size)
    rows = [{**r, "prompt": tokenizer.bos_token + r["prompt"]} for r in rows]
    model = AutoModelForCausalLM.from_pretrained(folder / size, dtype=torch.float32)
    clock = PeerClock()
    config = KTOConfig(output_dir=tempfile.mkdtemp(), **peer_config(PEER_OVERRIDES, steps))
    trainer = KTOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[clock.callback()])
    check_peer_defaults(config, PEER_DEFAULTS_KEPT)
    data = trainer.train_dataset
    lengths = [len(p) + len(c) for p, c in zip(data["prompt_ids"], data["completion_ids"])]
    setup_s = time.perf_counter() - began
    clock.train(trainer)
    clock.report([sum(lengths[i * ROWS : (i + 1) * ROWS]) for i in range(steps)], warmup,
                 {"reference_s": 0.0, "setup_s": setup_s})


def describe(size: str) -> dict:
    return {"model": size, "rows_per_step": ROWS, "max_length": MAX_LENGTH, "loss": "kto, beta 0.1",
            "data": "hh-rlhf harmless-base test, alternating chosen (desirable) / rejected (undesirable), "
                    "64-256 tok per sequence, prompt <= 96 tok",
            "peer_overrides": PEER_OVERRIDES, "peer_defaults_kept": PEER_DEFAULTS_KEPT}


def main() -> None:
    bench_main("kto", Path(__file__), run_ours, run_peer, _data, "steps_per_s", describe, also=TIMING_KEYS)


if __name__ == "__main__":
    main()
