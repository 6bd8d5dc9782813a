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
import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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
# Numbers the RL/preference benchmarks report besides the step rate (medians per side, ours/peer
# ratios: lower is better for all of them). CPU seconds are less inflated by other load on the
# machine than wall seconds.
TIMING_KEYS = ("total_s", "total_cpu_s", "median_step_cpu_s")


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


HH_ASSISTANT = "\n\nAssistant:"


def hh_triples(tokenizer, n: int, *, min_len: int = 64, max_len: int = 256, max_prompt: int = 96
               ) -> list[dict[str, str]]:
    """Plain-text prompt/chosen/rejected triples from HH-RLHF harmless-base test.

    Each dialogue is split at its last ``"\n\nAssistant:"`` (the prompt keeps the marker). Kept
    when both sequences, counted as our renderer builds them (BOS + prompt + response + EOS), are
    within [min_len, max_len] tokens, the prompt is at most ``max_prompt`` tokens (about 60 on
    average, as the workload asks), and the prompt/response boundary tokenises cleanly, so that a
    peer tokenising ``prompt + response`` in one piece gets exactly the same ids.
    """
    rows = []
    with gzip.open(SHARED_DATA / "hh_rlhf" / "harmless-base" / "test.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            cut = row["chosen"].rfind(HH_ASSISTANT) + len(HH_ASSISTANT)
            prompt = row["chosen"][:cut]
            if cut < len(HH_ASSISTANT) or not row["rejected"].startswith(prompt):
                continue
            chosen, rejected = row["chosen"][cut:], row["rejected"][cut:]
            if not chosen.strip() or not rejected.strip() or chosen == rejected:
                continue
            p = tokenizer(prompt)["input_ids"]
            lengths = []
            for response in (chosen, rejected):
                r = tokenizer(response)["input_ids"]
                if tokenizer(prompt + response)["input_ids"] != p + r:
                    break
                lengths.append(len(p) + len(r) + 2)
            if len(lengths) == 2 and len(p) + 1 <= max_prompt and all(min_len <= x <= max_len for x in lengths):
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            if len(rows) == n:
                return rows
    sys.exit(f"only {len(rows)} HH-RLHF pairs fit the workload, {n} needed")


def gsm8k_questions(n: int) -> list[str]:
    """The first n GSM8K train questions (prompts for online RL)."""
    lines = (SHARED_DATA / "gsm8k" / "train.jsonl").read_text().splitlines()[:n]
    return [json.loads(line)["question"] for line in lines]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Stopwatch:
    """Time spent inside a module-level function (e.g. our reference pass, our training loop), by
    patching the name the caller looks up; also when it was first entered (wall clock and process
    CPU). Measurement only: the function runs unchanged."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.first_wall: float | None = None  # time.time(), comparable with metric records
        self.first_cpu: float | None = None

    def wrap(self, module: Any, name: str) -> None:
        original = getattr(module, name)

        def timed(*args, **kwargs):
            if self.first_wall is None:
                self.first_wall, self.first_cpu = time.time(), time.process_time()
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - began

        setattr(module, name, timed)


def our_timings(records: list[dict[str, Any]], timing: dict[str, Any], start: Stopwatch, warmup: int
                ) -> dict[str, float]:
    """Our side's totals: from entering ``start``'s function (the reference pass, or the loop when
    there is none) to the last step's end, in wall and CPU seconds; median step intervals."""
    assert start.first_wall is not None and start.first_cpu is not None
    return {"total_s": records[-1]["time"] - start.first_wall, "total_cpu_s": timing["cpu_ends"][-1] - start.first_cpu,
            "run_s": timing["run_s"], "median_interval_s": median_interval([r["time"] for r in records], warmup),
            "median_step_cpu_s": median_interval(timing["cpu_ends"], warmup)}


def peer_timings(train_wall: float, train_cpu: float, ends: list[float], cpu_ends: list[float], warmup: int
                 ) -> dict[str, float]:
    """The peer's totals (``trainer.train()``, wall and CPU) and median step intervals."""
    return {"total_s": train_wall, "total_cpu_s": train_cpu, "median_interval_s": median_interval(ends, warmup),
            "median_step_cpu_s": median_interval(cpu_ends, warmup)}


class PeerClock:
    """Times a TRL trainer as ours is timed: each step (``callback()``, added to the trainer's
    callbacks), and the whole ``train()`` call, wall and process CPU."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []
        self.wall = self.cpu = 0.0

    def callback(self):
        return trl_step_timer(self.times, self.ends, self.cpu_ends)

    def train(self, trainer) -> None:
        began, began_cpu = time.perf_counter(), time.process_time()
        trainer.train()
        self.wall, self.cpu = time.perf_counter() - began, time.process_time() - began_cpu

    def report(self, tokens_per_step: list[int], warmup: int, extra: dict[str, Any] | None = None) -> None:
        report_child(self.times, tokens_per_step, warmup,
                     {**(extra or {}), **peer_timings(self.wall, self.cpu, self.ends, self.cpu_ends, warmup)})


def run_our_stage(recipe_text: str, stage: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run a one-stage recipe through the real pipeline in a fresh workdir (so nothing is cached).

    Returns the stage's per-step metric records and timings: ``run_s`` (the whole ``run_recipe``:
    data preparation, model load, reference pass, training, saving), ``loop_s`` (first step start
    to last step end, from the records' timestamps) and ``cpu_ends`` (process CPU seconds when each
    step's record was logged)."""
    from posttrain.config.recipe import load_recipe
    from posttrain.monitoring.sinks import Metrics
    from posttrain.pipeline.runner import run_recipe

    cpu_ends: list[float] = []
    log = Metrics.log

    def timed_log(self, step: int, metrics: dict[str, Any]) -> None:
        if "step_s" in metrics:
            cpu_ends.append(time.process_time())
        log(self, step, metrics)

    Metrics.log = timed_log  # measurement only: the record is logged unchanged
    work = Path(tempfile.mkdtemp())
    (work / "recipe.yaml").write_text(recipe_text)
    setup_child()
    began = time.perf_counter()
    run_recipe(load_recipe(work / "recipe.yaml"), work / "run", show_progress=False)
    run_s = time.perf_counter() - began
    metrics = next(work.glob(f"run/stages/{stage}/*/metrics.jsonl")).read_text().splitlines()
    records = [r for r in map(json.loads, metrics) if "step_s" in r]
    loop_s = records[-1]["time"] - (records[0]["time"] - records[0]["step_s"])
    return records, {"run_s": run_s, "loop_s": loop_s, "cpu_ends": cpu_ends}


def median_interval(ends: list[float], warmup: int) -> float:
    """Median seconds between consecutive step ends after the warm-up: everything a step costs,
    data loading and logging included (a cross-check of the per-step timers). With process CPU
    times as ``ends``, the CPU seconds a step costs, which other load on the machine inflates less
    than wall time."""
    intervals = [b - a for a, b in zip(ends, ends[1:])][max(warmup - 1, 0):]
    return statistics.median(intervals) if intervals else float("nan")


def check_peer_defaults(config: Any, expected: dict[str, Any]) -> None:
    """Fail if a peer default the workload relies on changed (e.g. after a TRL upgrade)."""
    for key, value in expected.items():
        if getattr(config, key) != value:
            raise RuntimeError(f"{type(config).__name__}.{key} is {getattr(config, key)!r}; the workload expects "
                               f"the default {value!r}")
    # TRL defaults to gradient checkpointing, which transformers 5 renamed activation checkpointing.
    if getattr(config, "activation_checkpointing", False):
        raise RuntimeError("the peer runs with activation checkpointing; the workload has none")


def peer_config(overrides: dict[str, Any], steps: int) -> dict[str, Any]:
    """The peer's overridden settings, with the step count filled in."""
    return {k: (steps if v == "steps" else v) for k, v in overrides.items()}


def trl_step_timer(times: list[float], ends: list[float], cpu_ends: list[float]):
    """A TrainerCallback appending each step's on_step_begin -> on_step_end seconds to ``times``
    (as sft.py measures), and each step's end wall time and process CPU time to ``ends`` and
    ``cpu_ends``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            times.append(now - self.start)
            ends.append(now)
            cpu_ends.append(time.process_time())

    return StepTimer()


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
    parser.add_argument("--envs", default=",".join(ENVIRONMENTS), help="environments to run (default: all)")
    parser.add_argument("--max-load", type=float, default=None,
                        help="before each run wait until the 1-minute load average is at most this")
    parser.add_argument("--max-other", type=float, default=None,
                        help="before each run wait until other processes use at most this many cores (3 s "
                             "sample); a run during which they used more on average is run again (--retries)")
    parser.add_argument("--retries", type=int, default=2, help="re-runs of a run disturbed by other processes")
    parser.add_argument("--max-wait", type=float, default=600, help="seconds to wait for a quiet machine at most")
    return parser.parse_args()


LOCK_PATH = Path(tempfile.gettempdir()) / "posttrain-bench.lock"


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    """One benchmark child at a time on this machine, whoever runs it (an flock on LOCK_PATH):
    two engineers' benchmarks then take turns instead of slowing each other down."""
    with open(LOCK_PATH, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def other_cores(seconds: float = 3.0) -> float:
    """Cores other processes keep busy, sampled over ``seconds`` (this process sleeps meanwhile)."""
    before = busy_cpu_s()
    time.sleep(seconds)
    return (busy_cpu_s() - before) / seconds


def wait_for_quiet(max_load: float | None, max_other: float | None, max_wait: float) -> dict[str, float]:
    """Wait (at most ``max_wait`` s) until the 1-minute load average is <= ``max_load`` and other
    processes use <= ``max_other`` cores; return what was seen.

    On these shared 2-core machines another CPU-bound process makes the two OpenMP threads of a
    run wait for each other at every parallel region (one spins while its partner waits for a
    core): a DPO step of the tiny model then costs 1.8 s instead of 0.05 s, on either side,
    whenever it happens. Interleaving cannot cancel an effect that large and that erratic, so
    runs wait for a quiet machine and record how quiet it was."""
    began = time.monotonic()
    while True:
        load, cores = os.getloadavg()[0], other_cores() if max_other is not None else float("nan")
        quiet = (max_load is None or load <= max_load) and (max_other is None or cores <= max_other)
        if quiet or time.monotonic() - began >= max_wait:
            return {"load_before": load, "other_cores_before": cores, "waited_s": time.monotonic() - began}


def measured_run(args: argparse.Namespace, script: Path, side: str, size: str, env: dict[str, str]) -> dict:
    """One child run on a quiet machine (see ``wait_for_quiet``), re-run while other processes
    used more than ``--max-other`` cores during it; the result records the machine's state."""
    for attempt in range(args.retries + 1):
        with machine_lock():
            seen = wait_for_quiet(args.max_load, args.max_other, args.max_wait)
            busy, child, began = busy_cpu_s(), children_cpu_s(), time.monotonic()
            result = run_child(script, side, size, args.steps, args.warmup, env)
            wall = time.monotonic() - began
            others = max(0.0, (busy_cpu_s() - busy) - (children_cpu_s() - child)) / wall
        result = {**result, **seen, "load_after": os.getloadavg()[0], "other_cores_during": others,
                  "attempt": attempt + 1}
        if args.max_other is None or others <= args.max_other:
            break
        print(f"  disturbed run ({others:.2f} other cores), again: {side} {size}", file=sys.stderr, flush=True)
    return result


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
                      "peak_rss_mb": peak_rss_mb(),
                      "minor_page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt, **extra}))


def run_child(script: Path, side: str, size: str, steps: int, warmup: int, env_extra: dict[str, str]) -> dict:
    env = {**os.environ, **env_extra, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false",
           "POSTTRAIN_PROGRESS": "0", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(script), "--child", side, "--size", size, "--steps", str(steps),
                           "--warmup", str(warmup)], env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{side} {size} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(name: str, script: Path, args: argparse.Namespace, rate_key: str,
            describe: Callable[[str], dict[str, Any]], also: tuple[str, ...] = ()) -> dict[str, Any]:
    """Interleaved runs of both sides for every size and environment; ratios ours/peer.

    ``also`` names further numbers of the children's results (e.g. ``total_s``) whose medians are
    reported per side, with their ours/peer ratio under ``ratios``."""
    results: dict[str, Any] = {"ours": {}, "peer": {}}
    ratios: dict[str, dict[str, float]] = {}
    environments = {name: ENVIRONMENTS[name] for name in args.envs.split(",")}
    for env_name, env in environments.items():
        for size in args.sizes.split(","):
            runs: dict[str, list[dict]] = {"ours": [], "peer": []}
            for _ in range(args.repeats):
                for side in ("ours", "peer"):
                    runs[side].append(measured_run(args, script, side, size, env))
                    print(f"{env_name} {size} {side}: {runs[side][-1]}", file=sys.stderr, flush=True)
            label = f"{size}/{env_name}"
            for side in ("ours", "peer"):
                results[side][label] = {
                    rate_key: statistics.median(r[rate_key] for r in runs[side]),
                    "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs[side]),
                    **{key: statistics.median(r[key] for r in runs[side]) for key in also},
                    "runs": runs[side],
                }
            ours, peer = results["ours"][label], results["peer"][label]
            ratios[label] = {"throughput": ours[rate_key] / peer[rate_key],
                             "peak_rss": ours["peak_rss_mb"] / peer["peak_rss_mb"],
                             **{key: ours[key] / peer[key] for key in also}}
    return {
        "name": name,
        "ours": results["ours"],
        "peer": results["peer"],
        "ratios": ratios,
        # The goal holds only if it holds everywhere: report the worst case.
        "throughput_ratio": min(r["throughput"] for r in ratios.values()),
        "peak_rss_ratio": max(r["peak_rss"] for r in ratios.values()),
        "env": {"threads": THREADS, "dtype": "float32", "environments": environments, "max_load": args.max_load,
                "max_other_cores": args.max_other,
                "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                "workload": {size: describe(size) for size in args.sizes.split(",")}},
    }


def bench_main(name: str, script: Path, run_ours: Callable[[str, int, int], None],
               run_peer: Callable[[str, int, int], None], prepare: Callable[[Path, int], Any],
               rate_key: str, describe: Callable[[str], dict[str, Any]], also: tuple[str, ...] = ()) -> None:
    """A benchmark script's entry point: one side's child run (``--child ours|peer``), or the
    comparison (``prepare(workload folder, steps)`` writes the workload first, then ``compare``)."""
    args = child_args()
    steps = args.steps + args.warmup
    if args.child == "ours":
        run_ours(args.size, steps, args.warmup)
    elif args.child == "peer":
        run_peer(args.size, steps, args.warmup)
    else:
        prepare(workload_dir(), steps)
        print(json.dumps(compare(name, script, args, rate_key, describe, also=also)))
