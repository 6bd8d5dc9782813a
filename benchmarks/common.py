"""Shared machinery for side-by-side benchmarks against a peer (see ../shared/BENCHMARKS.md).

Workload: a byte-level BPE tokenizer of about 12k tokens trained locally on the shared evaluation
text, two Llama-style sizes (tiny: hidden 64, 2 layers; small: hidden 256, 6 layers), fp32, 2 torch
threads, identical initial weights saved once and loaded by both sides. Each side runs in its own
fresh process; runs are interleaved (ours, peer, ours, peer, ...) and medians quoted, under the
default allocator and under the tuned glibc settings, because page faults from fresh mmaps of
large temporaries can cost as much as the training itself.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
SHARED_DATA = Path(os.environ.get("POSTTRAIN_SHARED_DATA", ROOT.parent.parent / "shared" / "data"))
VOCAB = 12_000
THREADS = 2
SIZES = {
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 256},
    "small": {"hidden_size": 256, "num_layers": 6, "num_heads": 8, "intermediate_size": 1536},
}
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296",
                "MALLOC_TOP_PAD_": "536870912"}
ENVIRONMENTS = {"default": {}, "tuned_malloc": TUNED_MALLOC}


def corpus() -> list[str]:
    """Real text for the tokenizer: GSM8K, MATH and HH-RLHF from the shared data folder."""
    if not SHARED_DATA.is_dir():
        sys.exit(f"benchmarks need the shared data folder at {SHARED_DATA} (set POSTTRAIN_SHARED_DATA)")
    texts = []
    for line in (SHARED_DATA / "gsm8k" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts += [row["question"], row["answer"]]
    for line in (SHARED_DATA / "math" / "test.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts += [row["problem"], row["solution"]]
    with gzip.open(SHARED_DATA / "hh_rlhf" / "harmless-base" / "test.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            texts += [row["chosen"], row["rejected"]]
    return texts


def workload_dir() -> Path:
    """Tokenizer and initial weights of both sizes, built once and cached under benchmarks/out."""
    key = hashlib.sha256(json.dumps([VOCAB, SIZES]).encode()).hexdigest()[:10]
    folder = OUT / f"workload-{key}"
    if (folder / "done").exists():
        return folder
    import torch

    from posttrain.config import TinyModelConfig
    from posttrain.models.tiny import build_tiny_llama, train_bpe_tokenizer

    torch.manual_seed(0)
    tokenizer = train_bpe_tokenizer(corpus(), VOCAB, split_digits=False)
    for size, shape in SIZES.items():
        model = build_tiny_llama(TinyModelConfig(**shape, max_position_embeddings=512), tokenizer)
        model.save_pretrained(folder / size)
        tokenizer.save_pretrained(folder / size)
    (folder / "done").write_text("ok")
    return folder


def gsm8k_pairs(tokenizer, n: int, min_len: int = 64, max_len: int = 256) -> list[dict[str, str]]:
    """Prompt/completion pairs from GSM8K train whose total length is in [min_len, max_len]."""
    rows = []
    for line in (SHARED_DATA / "gsm8k" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        prompt, completion = row["question"] + "\n", row["answer"]
        total = len(tokenizer(prompt)["input_ids"]) + len(tokenizer(completion)["input_ids"]) + 2
        if min_len <= total <= max_len:
            rows.append({"prompt": prompt, "completion": completion})
        if len(rows) == n:
            break
    return rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["ours", "peer"])
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", default="tiny,small")
    return parser.parse_args()


def setup_child() -> None:
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)


def report_child(step_times: list[float], tokens_per_step: list[int], warmup: int, extra: dict[str, Any]) -> None:
    """The child's one-line JSON result (steps after the warm-up only)."""
    times, tokens = step_times[warmup:], tokens_per_step[warmup:]
    median = statistics.median(times)
    print(json.dumps({"median_step_s": median, "steps_per_s": 1 / median,
                      "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, times)),
                      "tokens_per_step": statistics.median(tokens), "measured_steps": len(times),
                      "peak_rss_mb": peak_rss_mb(), **extra}))


def run_child(script: Path, side: str, size: str, steps: int, warmup: int, env_extra: dict[str, str]) -> dict:
    env = {**os.environ, **env_extra, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false",
           "POSTTRAIN_PROGRESS": "0", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(script), "--child", side, "--size", size, "--steps", str(steps),
                           "--warmup", str(warmup)], env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{side} {size} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(name: str, script: Path, args: argparse.Namespace, rate_key: str,
            describe: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """Interleaved runs of both sides for every size and environment; ratios ours/peer."""
    results: dict[str, Any] = {"ours": {}, "peer": {}}
    ratios: dict[str, dict[str, float]] = {}
    for env_name, env in ENVIRONMENTS.items():
        for size in args.sizes.split(","):
            runs: dict[str, list[dict]] = {"ours": [], "peer": []}
            for _ in range(args.repeats):
                for side in ("ours", "peer"):
                    runs[side].append(run_child(script, side, size, args.steps, args.warmup, env))
                    print(f"{env_name} {size} {side}: {runs[side][-1]}", file=sys.stderr, flush=True)
            label = f"{size}/{env_name}"
            for side in ("ours", "peer"):
                results[side][label] = {
                    rate_key: statistics.median(r[rate_key] for r in runs[side]),
                    "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs[side]),
                    "runs": runs[side],
                }
            ours, peer = results["ours"][label], results["peer"][label]
            ratios[label] = {"throughput": ours[rate_key] / peer[rate_key],
                             "peak_rss": ours["peak_rss_mb"] / peer["peak_rss_mb"]}
    return {
        "name": name,
        "ours": results["ours"],
        "peer": results["peer"],
        "ratios": ratios,
        # The goal holds only if it holds everywhere: report the worst case.
        "throughput_ratio": min(r["throughput"] for r in ratios.values()),
        "peak_rss_ratio": max(r["peak_rss"] for r in ratios.values()),
        "env": {"threads": THREADS, "dtype": "float32", "environments": ENVIRONMENTS,
                "workload": {size: describe(size) for size in args.sizes.split(",")}},
    }
