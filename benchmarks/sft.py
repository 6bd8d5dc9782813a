"""SFT throughput and peak memory: posttrain's sft stage vs TRL's SFTTrainer, identical workload.

Workload: GSM8K train question (prompt) + worked answer (completion), 64-256 tokens, completion-only
loss, 8 sequences per optimizer step, AdamW lr 1e-4 with a linear schedule, max grad norm 1.0,
sequential data order on both sides. TRL runs with its documented defaults except what the
workload fixes: bf16=False (its default is bf16 even on CPU), gradient_checkpointing=False (on by
default; the workload has none), use_cpu, batch size, steps, max_length=256, sequential sampling,
no saving, no reporting. Tokens counted the same way for
both: non-padding tokens of the step's sequences.

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
    bench_main,
    gsm8k_pairs,
    report_child,
    setup_child,
    workload_dir,
)

BATCH = 8
LR = 1e-4
MAX_LENGTH = 256


def _data(folder: Path, steps: int) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / "tiny")
    path = folder / f"sft-{steps}.jsonl"
    if not path.exists():
        rows = gsm8k_pairs(tokenizer, BATCH * steps)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_ours(size: str, steps: int, warmup: int) -> None:
    from posttrain.config.recipe import load_recipe
    from posttrain.pipeline.runner import run_recipe

    folder = workload_dir()
    data = _data(folder, steps)
    work = Path(tempfile.mkdtemp())
    recipe = work / "recipe.yaml"
    recipe.write_text(f"""
name: bench
stages:
  sft:
    kind: sft
    model: {{path: {folder / size}}}
    data: {{path: {data}}}
    train: {{lr: {LR}, schedule: linear, global_batch_size: {BATCH}, micro_batch_size: {BATCH},
             max_steps: {steps}, max_length: {MAX_LENGTH}, shuffle: false, checkpoint_every: 0,
             precision: fp32, max_grad_norm: 1.0}}
""")
    setup_child()
    run_recipe(load_recipe(recipe), work / "run", show_progress=False)
    records = [json.loads(line) for line in next(work.glob("run/stages/sft/*/metrics.jsonl")).read_text().splitlines()]
    steps_only = [r for r in records if "step_s" in r]
    report_child([r["step_s"] for r in steps_only], [r["tokens"] for r in steps_only], warmup, {})


def run_peer(size: str, steps: int, warmup: int) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    folder = workload_dir()
    rows = [json.loads(line) for line in _data(folder, steps).read_text().splitlines()]
    setup_child()
    tokenizer = AutoTokenizer.from_pretrained(folder / size)
    model = AutoModelForCausalLM.from_pretrained(folder / size, dtype=torch.float32)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    config = SFTConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR,
        lr_scheduler_type="linear", max_grad_norm=1.0, bf16=False, use_cpu=True, max_length=MAX_LENGTH,
        train_sampling_strategy="sequential", save_strategy="no", report_to=[], disable_tqdm=True,
        logging_steps=10_000, seed=0, gradient_checkpointing=False,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[Timer()])
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    trainer.train()
    tokens = [sum(lengths[i * BATCH : (i + 1) * BATCH]) for i in range(steps)]
    report_child(times, tokens, warmup, {})


def describe(size: str) -> dict:
    return {"model": size, "sequences_per_step": BATCH, "max_length": MAX_LENGTH, "data": "gsm8k train 64-256 tok"}


def main() -> None:
    bench_main("sft", Path(__file__), run_ours, run_peer, lambda folder, steps: None, "tokens_per_s", describe)


if __name__ == "__main__":
    main()
