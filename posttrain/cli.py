"""The ``posttrain`` command.

    posttrain run RECIPE [--set a.b=v ...] [--workdir DIR] [--only S | --from S | --until S]
    posttrain status WORKDIR | rollback WORKDIR STAGE | lineage WORKDIR ARTIFACT | report WORKDIR
    posttrain validate RECIPE [--set ...]
    posttrain plan RECIPE [--set ...] [--workdir DIR]
    posttrain data show RECIPE --stage S [--n 2]
    posttrain demo [--workdir runs/demo]
    posttrain verify KIND --data FILE [--out FILE]
    posttrain eval MODEL --tasks gsm8k,ifeval [...] | posttrain eval --compare A B
    posttrain data contamination TRAIN --against EVAL [...]

A problem the user can fix exits with code 2 and a message naming the file:line or key and the
fix, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from posttrain.errors import EXIT_USER_ERROR, UserError
from posttrain.evals.cli import add_contamination_parser, add_eval_parser  # argparse only; light

DEMO_RECIPE = Path(__file__).parent / "demo" / "recipe.yaml"


def _add_recipe_args(p: argparse.ArgumentParser, workdir: bool = False) -> None:
    p.add_argument("recipe", type=Path, help="a YAML recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. stages.sft.train.lr=1e-4 (repeatable)")
    if workdir:
        p.add_argument("--workdir", type=Path, help="where artifacts go (default: the recipe's workdir)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description="LLM post-training as a pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a recipe (resumes; skips stages whose artifact exists)")
    _add_recipe_args(p, workdir=True)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--only", metavar="STAGE", help="run only this stage (its inputs must exist)")
    p.add_argument("--from", dest="from_", metavar="STAGE", help="run this stage and its descendants")
    p.add_argument("--until", metavar="STAGE", help="run this stage and its ancestors")
    p = sub.add_parser("status", help="the DAG of a workdir: status, keys, metrics, gates, alarms, head")
    p.add_argument("workdir", type=Path)
    p = sub.add_parser("rollback", help="point the pipeline head at an earlier good stage")
    p.add_argument("workdir", type=Path)
    p.add_argument("stage")
    p = sub.add_parser("report", help="write WORKDIR/report.html: the DAG, eval charts, training curves")
    p.add_argument("workdir", type=Path)
    p = sub.add_parser("lineage", help="an artifact's parents back to the base model and raw data, with hashes")
    p.add_argument("workdir", type=Path)
    p.add_argument("artifact", help="a stage name, a key (or its prefix), or an artifact folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of a tree")
    p = sub.add_parser("validate", help="check a recipe; exit 0 or 2 with every problem")
    _add_recipe_args(p)
    p = sub.add_parser("plan", help="print the resolved recipe and derived quantities; runs nothing")
    _add_recipe_args(p, workdir=True)
    p = sub.add_parser("demo", help="the tiny arithmetic world: base -> SFT on CPU in minutes")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    data = sub.add_parser("data", help="inspect data").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("show", help="print rendered samples with the supervised tokens marked")
    _add_recipe_args(p)
    p.add_argument("--stage", required=True)
    p.add_argument("--n", type=int, default=2)
    p = sub.add_parser("verify", help="score a JSONL of completions with a verifier")
    p.add_argument("kind", help="math | code | ifeval | ifeval_loose | json | regex | exact | choice | format")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path)
    add_eval_parser(sub)
    add_contamination_parser(data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as err:
        print(f"error: {err.render()}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "validate":
        return cmd_validate(args)
    if args.command == "plan":
        return cmd_plan(args)
    if args.command == "run":
        from posttrain.pipeline.runner import Selection

        return cmd_run(args.recipe, args.overrides, args.workdir, not args.no_progress,
                       selection=Selection(args.only, args.from_, args.until))
    if args.command in ("status", "rollback", "lineage", "report"):
        return cmd_inspect(args)
    if args.command == "demo":
        return cmd_run(DEMO_RECIPE, args.overrides, args.workdir, not args.no_progress, title="demo")
    if args.command == "data" and args.data_command == "contamination":
        from posttrain.evals.cli import run_contamination_args

        return run_contamination_args(args)
    if args.command == "data":
        return cmd_data_show(args)
    if args.command == "eval":
        from posttrain.evals.cli import run_eval_args

        return run_eval_args(args)
    if args.command == "verify":
        from posttrain.rewards.verifiers.verify_cli import verify_file

        return verify_file(args.kind, args.data, args.out)
    raise AssertionError(args.command)


def _load(recipe: Path, overrides: list[str]):
    from posttrain.config.recipe import load_recipe
    from posttrain.errors import UserError as _UserError
    from posttrain.pipeline.validate import check_inputs

    loaded = load_recipe(recipe, overrides)
    problems = check_inputs(loaded)
    if problems:
        raise _UserError(problems, title=f"{recipe}: {len(problems)} problem(s)")
    return loaded


def cmd_validate(args: argparse.Namespace) -> int:
    recipe = _load(args.recipe, args.overrides)
    print(f"ok: {args.recipe} ({len(recipe.stages)} stages: {', '.join(recipe.stages)})")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from posttrain.loops.distributed import init_distributed
    from posttrain.pipeline.runner import DEFERRED, _context, prepare_all

    recipe = _load(args.recipe, args.overrides)
    workdir = args.workdir or recipe.default_workdir()
    info = init_distributed(prefer_cuda=False)
    keys, prepared = prepare_all(recipe, workdir, info, show_progress=False)
    plan = {"recipe": recipe.raw(), "workdir": str(workdir), "stages": {}}
    for name, key in keys.items():
        entry = {"key": key, "status": "cached" if name not in prepared else "to run"}
        if name in prepared:
            runner, ready = prepared[name]
            if ready is DEFERRED:
                entry["derived"] = "reads the output of an earlier stage: planned when that exists"
            else:
                entry["derived"] = runner.describe(_context(recipe, name, workdir, keys, info, False), ready)
        plan["stages"][name] = entry
    print(yaml.safe_dump(plan, sort_keys=False, width=100))
    return 0


def cmd_run(recipe_path: Path, overrides: list[str], workdir: Path | None, progress: bool, title: str = "",
            selection=None) -> int:
    from posttrain.pipeline.runner import run_recipe

    recipe = _load(recipe_path, overrides)
    workdir = workdir or recipe.default_workdir()
    reports = run_recipe(recipe, workdir, show_progress=progress, selection=selection)
    _print_summary(reports, workdir, title or recipe.name)
    from posttrain.loops.distributed import init_distributed
    from posttrain.pipeline.inspect import write_report

    if init_distributed(prefer_cuda=False).is_main:
        console_path = write_report(workdir)
        print(f"report: {console_path}", file=sys.stderr)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from posttrain.pipeline.head import rollback
    from posttrain.pipeline.inspect import lineage, print_lineage, print_status, write_report

    if args.command == "status":
        print_status(args.workdir)
    elif args.command == "report":
        print(f"wrote {write_report(args.workdir)}")
    elif args.command == "rollback":
        head = rollback(args.workdir, args.stage)
        print(f"head -> {head['stage']} {head['key']} ({head['artifact']})")
    else:
        tree = lineage(args.workdir, args.artifact)
        print(json.dumps(tree, indent=2)) if args.json else print_lineage(tree)
    return 0


def _print_summary(reports, workdir: Path, title: str) -> None:
    from rich.table import Table

    from posttrain.loops.distributed import init_distributed
    from posttrain.monitoring.progress import console

    if not init_distributed(prefer_cuda=False).is_main:
        return
    table = Table(title=f"{title}: {workdir}")
    # Each stage's eval metrics (named after its eval tasks), its training loss, its gates.
    metric_names = sorted({k for r in reports for k in _eval_metrics(r)})
    for column in ["stage", "kind", "status", *metric_names, "train_loss", "gates", "time"]:
        table.add_column(column)
    for r in reports:
        values = [f"{r.metrics[m]:.4g}" if m in _eval_metrics(r) else "" for m in metric_names]
        loss = r.metrics.get("train_loss")
        gates = " ".join("ok" if g["passed"] else "FAIL" for g in r.gates)
        table.add_row(r.name, r.kind, r.status, *values, "" if loss is None else f"{loss:.4g}", gates,
                      f"{r.seconds:.1f}s")
    console().print(table)
    from posttrain.pipeline.head import read_head

    head = read_head(workdir)
    if head:
        console().print(f"head: {head['stage']} ({head['artifact']})")
    for r in reports:
        for alarm in r.alarms:
            console().print(f"[yellow]alarm[/] {r.name} step {alarm.get('step')}: {alarm.get('message')}")


def _eval_metrics(report) -> list[str]:
    """Metric names a stage's eval tasks produced (``<task>`` or ``<task>_<detail>``), without
    the ``_n`` sample counts."""
    from posttrain.config.gates import produced_by

    tasks = [t.task for t in report.config.eval] if getattr(report, "config", None) else []
    return [k for k, v in report.metrics.items() if produced_by(k, tasks) and not k.endswith("_n")
            and isinstance(v, int | float)]


def cmd_data_show(args: argparse.Namespace) -> int:
    from rich.console import Console

    from posttrain.data.render import render_example
    from posttrain.loops.distributed import init_distributed
    from posttrain.pipeline.runner import _context, stage_keys
    from posttrain.stages.common import stage_tokenizer

    recipe = _load(args.recipe, args.overrides)
    if args.stage not in recipe.stages:
        raise UserError(f"--stage: no stage {args.stage!r}; stages: {', '.join(recipe.stages)}")
    stage = recipe.stages[args.stage]
    if not hasattr(stage, "data"):
        raise UserError(f"--stage: stage {args.stage!r} ({stage.kind}) has no data to show")

    workdir = recipe.default_workdir()
    ctx = _context(recipe, args.stage, workdir, stage_keys(recipe), init_distributed(prefer_cuda=False), False)
    tokenizer = stage_tokenizer(ctx)
    data = ctx.load_data(stage.data)
    loss_on = "all" if stage.kind == "pretrain" else getattr(stage, "loss_on", "assistant")
    out = Console() if sys.stdout.isatty() else None
    for example in data.examples[: args.n]:
        rendered = render_example(tokenizer, example, loss_on)
        head = f"{example.source}  {len(rendered)} tokens, {rendered.n_targets} trained on"
        if out is not None:
            out.print(f"[bold]{head}[/] ([green]green[/] = trained on)")
            out.print(_marked(tokenizer, rendered), highlight=False)
        else:
            print(f"{head} (inside [[ ]])")
            print(_bracketed(tokenizer, rendered).replace("\n", "\\n"))
    return 0


def _spans(tokenizer, rendered):
    """Consecutive runs of tokens with the same mask value, decoded."""
    runs, start = [], 0
    for t in range(1, len(rendered) + 1):
        if t == len(rendered) or rendered.loss_mask[t] != rendered.loss_mask[start]:
            runs.append((rendered.loss_mask[start], tokenizer.decode(rendered.input_ids[start:t])))
            start = t
    return runs


def _marked(tokenizer, rendered) -> str:
    from rich.markup import escape

    return "".join(f"[green]{escape(text)}[/green]" if on else f"[dim]{escape(text)}[/dim]"
                   for on, text in _spans(tokenizer, rendered))


def _bracketed(tokenizer, rendered) -> str:
    """Plain-text view for logs and pipes: targets inside [[ ]]."""
    return "".join(f"[[{text}]]" if on else text for on, text in _spans(tokenizer, rendered))


if __name__ == "__main__":
    sys.exit(main())
