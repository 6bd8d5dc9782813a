"""``posttrain eval`` and ``posttrain data contamination``: command implementations.

    posttrain eval MODEL --tasks gsm8k,ifeval [--limit N] [--set gsm8k.options.n=4 ...]
                   [--config tasks.yaml] [--out DIR] [--parent DIR] [--no-progress]
    posttrain eval --compare A B
    posttrain data contamination TRAIN --against EVAL [EVAL ...] [--ngram 13] [--near 0.8]
                   [--on-contamination report|fail|drop] [--report FILE] [--out FILE]

MODEL is a stage artifact folder (with ``model/``) or a save_pretrained folder. Tasks come from
``--tasks`` (names) and/or ``--config`` (a YAML list of eval entries, the recipe's ``eval:``
syntax); ``--set TASK.KEY=VALUE`` sets a key of a task's entry (``gsm8k.limit=50``,
``gsm8k.options.temperature=0.8``, ``xstest.data.path=x.csv``). Results go to ``--out`` (default
``MODEL/eval``): ``<task>.jsonl`` records and ``metrics.json``, the layout ``--compare`` reads.

Each function returns the exit code; bad input raises UserError (exit 2, no traceback).
``contamination`` exits 1 when it finds overlaps under ``--on-contamination fail``.
Heavy modules are imported inside the functions so that ``posttrain --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- argument parsers (used by posttrain.cli)


def add_eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a model folder on eval tasks, or compare two evaluated checkpoints")
    p.add_argument("model", nargs="?", type=Path, help="stage artifact folder (model/) or save_pretrained folder")
    p.add_argument("--tasks", default="", help="comma-separated task names, e.g. gsm8k,humaneval,ifeval")
    p.add_argument("--config", type=Path, help="YAML list of eval entries ({task, data, limit, options, ...})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="TASK.KEY=VALUE",
                   help="set a key of a task's entry, e.g. gsm8k.options.n=4 (repeatable)")
    p.add_argument("--limit", type=int, help="rows per task (unless a task sets its own)")
    p.add_argument("--out", type=Path, help="results folder (default MODEL/eval)")
    p.add_argument("--parent", type=Path, help="the parent checkpoint (win_rate's default baseline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"),
                   help="print metric deltas B - A with significance (artifact or results folders)")
    p.add_argument("--no-progress", action="store_true")


def add_contamination_parser(data_sub: Any) -> None:
    p = data_sub.add_parser("contamination", help="find training rows that overlap eval sets")
    p.add_argument("train", type=Path, help="training data file")
    p.add_argument("--against", nargs="+", required=True, metavar="EVAL",
                   help="eval data files, or eval task names (their default data)")
    p.add_argument("--ngram", type=int, default=13, help="words per n-gram (default 13)")
    p.add_argument("--near", type=float, default=0.8, help="near-duplicate Jaccard threshold (default 0.8)")
    p.add_argument("--on-contamination", choices=("report", "fail", "drop"), default="report")
    p.add_argument("--report", type=Path, help="write the overlapping pairs as JSONL here")
    p.add_argument("--out", type=Path, help="with drop: where the cleaned training file goes")


def run_eval_args(args: argparse.Namespace) -> int:
    from posttrain.errors import UserError, problem

    if args.compare:
        if args.model is not None or args.tasks or args.config:
            raise UserError(problem("--compare", "compares two results folders; it takes no MODEL or tasks",
                                    "run `posttrain eval --compare A B` alone"))
        return compare_main(args.compare[0], args.compare[1])
    if args.model is None:
        raise UserError(problem("MODEL", "no model folder given", "run `posttrain eval MODEL --tasks ...` or "
                                "`posttrain eval --compare A B`"))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    return eval_main(args.model, tasks, config=args.config, overrides=args.overrides, limit=args.limit,
                     out=args.out, parent=args.parent, seed=args.seed, show_progress=not args.no_progress)


def run_contamination_args(args: argparse.Namespace) -> int:
    return contamination_main(args.train, args.against, ngram=args.ngram, near=args.near,
                              on_contamination=args.on_contamination, report=args.report, out=args.out)


# ---------------------------------------------------------------- eval


def build_task_configs(tasks: Sequence[str], *, config: Path | None = None, overrides: Sequence[str] = (),
                       limit: int | None = None) -> list[Any]:
    """The eval entries of ``--config`` then ``--tasks``, with ``--set`` and ``--limit`` applied;
    every problem (unknown task, option or key) is reported at once."""
    from posttrain.errors import ProblemCollector, UserError, problem

    found = ProblemCollector()
    entries: list[dict[str, Any]] = _config_entries(config) if config is not None else []
    entries += [{"task": name} for name in tasks]
    if not entries:
        raise UserError(problem("--tasks", "no eval tasks given", "e.g. --tasks gsm8k,ifeval (or --config FILE)"))
    for text in overrides:
        _apply_override(entries, text, found)
    if limit is not None:
        for entry in entries:
            entry.setdefault("limit", limit)
    configs = _validate_entries(entries, found)
    found.raise_if_any(title="eval: bad task settings")
    return configs


def _config_entries(path: Path) -> list[dict[str, Any]]:
    from posttrain.config.recipe import read_yaml
    from posttrain.errors import UserError, problem

    data, _ = read_yaml(path)
    if isinstance(data, dict) and "eval" in data:
        data = data["eval"]
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise UserError(problem(str(path), "expected a list of eval entries ({task: ..., ...})",
                                "write e.g. `- {task: gsm8k, limit: 100}` lines (or a mapping with an eval: list)"))
    return [dict(e) for e in data]


def _apply_override(entries: list[dict[str, Any]], text: str, found: Any) -> None:
    from posttrain.config.recipe import apply_overrides

    key, sep, _ = text.partition("=")
    name, _, rest = key.partition(".")
    matches = [i for i, e in enumerate(entries) if e.get("task") == name]
    if not sep or not rest or (not matches and not name.isdigit()):
        found.add(f"--set {text}", "an override must look like TASK.KEY=VALUE for a task being run",
                  "e.g. --set gsm8k.options.n=4 (tasks: " + ", ".join(str(e.get('task')) for e in entries) + ")")
        return
    index = int(name) if name.isdigit() else matches[0]
    if index >= len(entries):
        found.add(f"--set {text}", f"there is no eval entry {index}", f"use 0..{len(entries) - 1}")
        return
    holder = {"entry": entries[index]}
    found.extend(apply_overrides(holder, [f"entry.{rest}={text.partition('=')[2]}"]))


def _validate_entries(entries: list[dict[str, Any]], found: Any) -> list[Any]:
    from pydantic import ValidationError

    from posttrain.config.base import problems_from_validation
    from posttrain.config.components import EvalTaskConfig
    from posttrain.evals.base import check_task_config

    configs = []
    for i, entry in enumerate(entries):
        try:
            cfg = EvalTaskConfig.model_validate(entry)
        except ValidationError as err:
            found.extend(problems_from_validation(err, EvalTaskConfig, prefix=("eval", i)))
            continue
        found.extend(check_task_config(cfg, f"eval.{i}"))
        configs.append(cfg)
    return configs


def eval_main(model: Path, tasks: Sequence[str], *, config: Path | None = None, overrides: Sequence[str] = (),
              limit: int | None = None, out: Path | None = None, parent: Path | None = None, seed: int = 0,
              show_progress: bool = True) -> int:
    """Evaluate ``model`` on the tasks; write records and metrics; print the metrics."""
    import torch

    from posttrain.errors import UserError, problem
    from posttrain.evals.base import EvalContext, run_evals
    from posttrain.evals.common import load_model_folder
    from posttrain.evals.results import write_results

    configs = build_task_configs(tasks, config=config, overrides=overrides, limit=limit)
    if parent is not None and not Path(parent).is_dir():
        raise UserError(problem("--parent", f"{str(parent)!r} is not a folder", "point at the parent model folder"))
    device = torch.device("cuda") if torch.cuda.is_available() else None
    loaded, tokenizer = load_model_folder(Path(model), where="MODEL", device=device)
    ctx = EvalContext(model=loaded, tokenizer=tokenizer, base_dir=Path.cwd(), show_progress=show_progress,
                      seed=seed, parent=parent)
    results = run_evals(ctx, configs)
    folder = out or Path(model) / "eval"
    write_results(folder, results)
    for task, result in results:
        shown = "  ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
        print(f"{task}: {shown}")
    print(f"records and metrics: {folder}")
    return 0


# ---------------------------------------------------------------- compare


def compare_main(a: Path, b: Path) -> int:
    """Print each common metric's delta B - A with a paired significance test."""
    from posttrain.errors import UserError, problem
    from posttrain.evals.results import compare_results, format_comparison, load_results

    run_a, run_b = load_results(a, "--compare A"), load_results(b, "--compare B")
    rows = compare_results(run_a, run_b)
    if not rows:
        raise UserError(problem("--compare", f"{a} and {b} have no metric in common",
                                "evaluate both checkpoints on the same tasks"))
    print(format_comparison(rows, str(run_a.folder), str(run_b.folder)))
    return 0


# ---------------------------------------------------------------- contamination


def _eval_set(spec: str) -> tuple[str, list[Any]]:
    """An ``--against`` argument: a data file, or an eval task name (its data, as the task reads it)."""
    from posttrain.config.components import EvalTaskConfig
    from posttrain.data.contamination import row_from_dict
    from posttrain.data.formats import read_file
    from posttrain.errors import UserError, problem
    from posttrain.evals.base import EVAL_TASKS, task_spec
    from posttrain.evals.contamination import eval_rows

    path = Path(spec).expanduser()
    if path.exists():
        return str(path), [row_from_dict(row, source) for row, source in read_file(path, where=f"--against {spec}")]
    if task_spec(spec).data is not None and spec in EVAL_TASKS:
        sets, skipped = eval_rows([EvalTaskConfig(task=spec)], where=f"--against {spec}")
        if skipped:
            raise UserError(problem(f"--against {spec}", skipped[0], "pass the eval file's path instead"))
        return spec, next(iter(sets.values()))
    raise UserError(problem(f"--against {spec}", "no such file, and not an eval task with default data",
                            "pass an eval data file (JSONL, CSV, ...) or a task name such as gsm8k"))


def contamination_main(train: Path, against: Sequence[str], *, ngram: int = 13, near: float = 0.8,
                       on_contamination: str = "report", report: Path | None = None, out: Path | None = None) -> int:
    """Scan ``train`` against each eval set; print the overlaps; apply the policy."""
    from posttrain.data.contamination import ScanSettings, apply_policy, row_from_dict, scan
    from posttrain.data.formats import read_file
    from posttrain.errors import UserError, problem

    if not 1 <= ngram <= 100:
        raise UserError(problem("--ngram", "must be between 1 and 100", "e.g. --ngram 13", value=ngram))
    if not 0 < near <= 1:
        raise UserError(problem("--near", "must be in (0, 1]", "e.g. --near 0.8", value=near))
    if on_contamination == "drop" and out is None:
        raise UserError(problem("--out", "--on-contamination drop needs --out for the cleaned file",
                                "add --out clean.jsonl"))
    if out is not None and on_contamination != "drop":
        raise UserError(problem("--out", "--out is only written with --on-contamination drop",
                                "remove --out or add --on-contamination drop"))
    raw = read_file(Path(train), where="TRAIN")
    sets = dict(_eval_set(spec) for spec in against)
    result = scan([row_from_dict(row, source) for row, source in raw], sets, ScanSettings(ngram=ngram, near_threshold=near))
    print(result.summary())
    if report is not None:
        result.write_jsonl(report)
        print(f"report: {report}")
    if on_contamination == "fail" and result.overlaps:
        print(f"error: {len(result.contaminated_train())} training rows overlap the eval sets "
              "(--on-contamination fail)", file=sys.stderr)
        return 1
    if on_contamination == "drop" and out is not None:
        kept = apply_policy(result, raw, [source for _, source in raw], "drop", where="TRAIN")
        _write_kept(Path(train), kept, out)
        print(f"kept {len(kept)} of {len(raw)} rows: {out}")
    return 0


def _write_kept(train: Path, kept: list[tuple[dict[str, Any], Any]], out: Path) -> None:
    """JSONL keeps the original lines byte for byte; other formats are written as JSONL rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if train.suffix == ".jsonl":
        lines = train.read_bytes().splitlines(keepends=True)
        out.write_bytes(b"".join(lines[source.line - 1] for _, source in kept))
    else:
        out.write_text("".join(json.dumps(row, default=str) + "\n" for row, _ in kept), encoding="utf-8")
