"""Sandboxed executions per second: posttrain's code sandbox vs an unsandboxed exec baseline.

Workload: a trivial program (``def f(x): return x + 1``) with one assert, run N times, two at
a time (the machine's 2 cores), as verify_code_batch does; then the 164 HumanEval canonical
solutions when the shared data is present. Goal: >= 20 executions/s for trivial programs.

Peer: there is no sandboxing library on PyPI to compare with, so the peer is a minimal
re-implementation of HumanEval's reference harness (human-eval's ``execution.py``): per
execution a ``multiprocessing.Manager`` list and a forked ``Process`` that chdirs to a temp
dir, arms a timer and ``exec``s program + tests, the result read back from the manager. It
isolates nothing (no namespaces, no uid, no rlimits, the tests run in the program's own
process), so the ratio is the price of isolation, not a like-for-like race.

Each side runs in its own fresh process; repeats are interleaved (ours, peer, ours, ...) and
medians quoted. Peak RSS is the larger of the driver process and its largest child.

Last line of output: one JSON object (name, ours, peer, throughput_ratio, peak_rss_ratio, env).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SHARED_DATA = Path(os.environ.get("POSTTRAIN_SHARED_DATA", ROOT.parent.parent / "shared" / "data"))
PROGRAM = "def f(x):\n    return x + 1\n"
TEST = "assert f(1) == 2"
WORKERS = 2


def humaneval_rows() -> list[dict]:
    path = SHARED_DATA / "humaneval" / "HumanEval.jsonl"
    return [json.loads(line) for line in path.open()] if path.exists() else []


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024, 1)


def cpu_s() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(run, n: int) -> dict:
    cpu_before, started = cpu_s(), time.perf_counter()
    passed = run()
    elapsed = time.perf_counter() - started
    assert passed == n, f"only {passed} of {n} executions passed"
    return {"executions_per_s": round(n / elapsed, 2), "cpu_ms_per_execution": round((cpu_s() - cpu_before) / n * 1000, 2)}


# -- ours ---------------------------------------------------------------------------------------


def side_ours(n: int) -> dict:
    sys.path.insert(0, str(ROOT.parent))
    from posttrain.rewards.verifiers import sandbox
    from posttrain.rewards.verifiers.code import verify_code_batch

    results: dict = {}
    for level in ("auto", *sandbox.LEVELS):
        if level != "auto" and sandbox.probe_isolation(level) is not None:
            continue
        limits = sandbox.SandboxLimits(isolation=level)
        rows = [{"tests": [TEST]}] * n
        verify_code_batch([PROGRAM] * 4, rows[:4], limits=limits, max_workers=WORKERS)  # warm-up

        def run(limits=limits, rows=rows) -> int:
            scored = verify_code_batch([PROGRAM] * n, rows, limits=limits, max_workers=WORKERS)
            return sum(result.score == 1.0 for result in scored)

        key = "trivial" if level == "auto" else f"trivial_{level}"
        results[key] = timed(run, n)
        if level == "auto":
            results["level"] = sandbox.resolve_isolation("auto")
    rows = humaneval_rows()
    if rows:
        def run_humaneval() -> int:
            scored = verify_code_batch([row["canonical_solution"] for row in rows], rows, max_workers=WORKERS)
            return sum(result.score == 1.0 for result in scored)

        results["humaneval"] = timed(run_humaneval, len(rows))
    results["peak_rss_mb"] = peak_rss_mb()
    return results


# -- peer: HumanEval's reference execution harness, minimally re-implemented ---------------------


def _unsafe_execute(program: str, timeout: float, result) -> None:
    import signal
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)

        def alarm(signum, frame):
            raise TimeoutError("timed out")

        signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            exec(program, {})
            result.append("passed")
        except BaseException as error:
            result.append(f"failed: {error}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


def check_correctness(program: str, timeout: float = 3.0) -> bool:
    import multiprocessing

    context = multiprocessing.get_context("fork")
    with context.Manager() as manager:
        result = manager.list()
        process = context.Process(target=_unsafe_execute, args=(program, timeout, result))
        process.start()
        process.join(timeout=timeout + 1)
        if process.is_alive():
            process.kill()
        return len(result) == 1 and result[0] == "passed"


def side_peer(n: int) -> dict:
    def run_all(programs: list[str]) -> int:
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            return sum(pool.map(check_correctness, programs))

    results = {"trivial": timed(lambda: run_all([PROGRAM + TEST + "\n"] * n), n)}
    rows = humaneval_rows()
    if rows:
        programs = [row["prompt"] + row["canonical_solution"] + "\n" + row["test"] + f"\ncheck({row['entry_point']})\n"
                    for row in rows]
        results["humaneval"] = timed(lambda: run_all(programs), len(rows))
    results["peak_rss_mb"] = peak_rss_mb()
    return results


# -- driver ---------------------------------------------------------------------------------------


def run_side(side: str, n: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--side", side, "--n", str(n)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict]) -> dict:
    merged: dict = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            merged[key] = {k: statistics.median(run[key][k] for run in runs) for k in value}
        elif isinstance(value, (int, float)):
            merged[key] = statistics.median(run[key] for run in runs)
        else:
            merged[key] = value
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="trivial executions per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", choices=("ours", "peer"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps((side_ours if args.side == "ours" else side_peer)(args.n)))
        return
    runs: dict[str, list[dict]] = {"ours": [], "peer": []}
    for repeat in range(args.repeats):
        for side in ("ours", "peer"):
            runs[side].append(run_side(side, args.n))
            print(f"repeat {repeat + 1} {side}: {json.dumps(runs[side][-1])}", flush=True)
    ours, peer = median_of(runs["ours"]), median_of(runs["peer"])
    ours["goal_executions_per_s"] = 20
    ours["goal_met"] = ours["trivial"]["executions_per_s"] >= 20
    peer["name"] = "HumanEval execution.py approach (fork + exec, no isolation), re-implemented"
    summary = {
        "name": "sandbox",
        "ours": ours,
        "peer": peer,
        "throughput_ratio": round(ours["trivial"]["executions_per_s"] / peer["trivial"]["executions_per_s"], 3),
        "peak_rss_ratio": round(ours["peak_rss_mb"] / peer["peak_rss_mb"], 3),
        "env": {"workers": WORKERS, "cpus": os.cpu_count(), "python": sys.version.split()[0],
                "n": args.n, "repeats": args.repeats, "load_avg_at_end": os.getloadavg()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
