"""Reading a workdir back: ``posttrain status`` (the DAG with status, keys, metrics, gates, alarms)
and ``posttrain lineage`` (an artifact's parents back to the base model and the raw data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posttrain.config.gates import produced_by
from posttrain.errors import UserError, problem
from posttrain.pipeline.artifacts import artifact_for
from posttrain.pipeline.head import read_head


def _snapshot(workdir: Path) -> dict[str, Any]:
    path = workdir / "recipe.json"
    if not path.exists():
        raise UserError(problem(str(workdir), "no posttrain run recorded here (no recipe.json)",
                                "point at a workdir that 'posttrain run' used"))
    return json.loads(path.read_text())


def _ledger(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def stage_rows(workdir: Path) -> list[dict[str, Any]]:
    """One row per stage of the last run: status, key, metrics, gate verdicts, alarms."""
    snapshot, ledger = _snapshot(workdir), _ledger(workdir)
    head = read_head(workdir) or {}
    last_event = {}
    for event in ledger:
        if event.get("stage") and event.get("key") == snapshot["keys"].get(event["stage"]):
            last_event[event["stage"]] = event
    rows = []
    for name in snapshot["order"]:
        key = snapshot["keys"][name]
        artifact = artifact_for(workdir, name, key)
        manifest = artifact.manifest() if artifact.complete else {}
        event = last_event.get(name, {}).get("event")
        if artifact.complete:
            status = "passed" if manifest.get("passed", True) else "gate failed"
        elif event == "blocked":
            status = "blocked"
        elif artifact.folder.exists():
            status = "failed" if event == "failed" else "incomplete"
        else:
            status = "not run"
        tasks = [t["task"] for t in snapshot["stages"][name].get("eval", [])]
        metrics = manifest.get("metrics", {})
        rows.append({"stage": name, "kind": snapshot["stages"][name]["kind"], "key": key, "status": status,
                     "parents": snapshot["parents"][name], "metrics": metrics,
                     "eval_metrics": [k for k in metrics if produced_by(k, tasks) and not k.endswith("_n")],
                     "gates": manifest.get("gates", []), "alarms": manifest.get("alarms", []),
                     "head": head.get("stage") == name and head.get("key") == key})
    return rows


def write_report(workdir: Path) -> Path:
    """``WORKDIR/report.html``: the DAG, eval charts across stages, training curves."""
    from posttrain.monitoring.report import render
    from posttrain.monitoring.sinks import read_metrics

    rows = stage_rows(workdir)
    curves = {r["stage"]: read_metrics(artifact_for(workdir, r["stage"], r["key"]).folder / "metrics.jsonl")
              for r in rows}
    page = render(f"posttrain: {workdir}", rows, curves, read_head(workdir))
    path = workdir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def print_status(workdir: Path) -> None:
    from rich.table import Table

    from posttrain.monitoring.progress import console

    rows = stage_rows(workdir)
    table = Table(title=f"{workdir}")
    for column in ("stage", "from", "kind", "status", "key", "metrics", "gates", "alarms"):
        table.add_column(column)
    colours = {"passed": "green", "gate failed": "red", "failed": "red", "blocked": "yellow"}
    for r in rows:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in r["metrics"].items()
                            if isinstance(v, int | float) and not k.startswith("train_") and not k.endswith("_n"))
        gates = "; ".join(f"{'ok' if g['passed'] else 'FAIL'} {g['gate']}" for g in r["gates"])
        colour = colours.get(r["status"], "white")
        name = f"{r['stage']} *" if r["head"] else r["stage"]
        table.add_row(name, ", ".join(r["parents"]), r["kind"], f"[{colour}]{r['status']}[/]", r["key"][:10],
                      metrics, gates, str(len(r["alarms"])) if r["alarms"] else "")
    console().print(table)
    head = read_head(workdir)
    console().print(f"head (*): {head['stage']} {head['key']} ({head['reason']}, {head['time']})" if head
                    else "head: none yet")


def _find(workdir: Path, spec: str) -> tuple[str, str]:
    """An artifact named by stage, key (or prefix) or folder path -> (stage, key)."""
    snapshot = _snapshot(workdir)
    keys = snapshot["keys"]
    if spec in keys:
        return spec, keys[spec]
    path = Path(spec)
    if path.is_dir() and (path / "manifest.json").exists():
        manifest = json.loads((path / "manifest.json").read_text())
        return manifest["stage"], manifest["key"]
    for stage_dir in (workdir / "stages").iterdir() if (workdir / "stages").exists() else []:
        for folder in stage_dir.iterdir():
            if folder.name.startswith(spec) and (folder / "manifest.json").exists():
                return stage_dir.name, folder.name
    raise UserError(problem(spec, "no artifact with that stage name, key or path", "see posttrain status WORKDIR"))


def lineage(workdir: Path, spec: str) -> dict[str, Any]:
    """The artifact and its parents, recursively, with data fingerprints and model sources."""
    stage, key = _find(workdir, spec)
    return _node(workdir, stage, key, set())


def _node(workdir: Path, stage: str, key: str, seen: set[tuple[str, str]]) -> dict[str, Any]:
    artifact = artifact_for(workdir, stage, key)
    if not artifact.complete:
        return {"stage": stage, "key": key, "missing": True}
    manifest = artifact.manifest()
    node = {"stage": stage, "key": key, "kind": manifest.get("kind"), "stage_kind": manifest.get("stage_kind"),
            "created": manifest.get("created"), "code_version": manifest.get("code_version"),
            "source_hash": manifest.get("source_hash"), "tokenizer": manifest.get("tokenizer"),
            "data": _data_sources(manifest), "parents": []}
    model = manifest.get("config", {}).get("model") or {}
    if model.get("path") or model.get("tiny"):
        node["base_model"] = {"path": model.get("path"), "tiny": model.get("tiny"), "tokenizer": model.get("tokenizer")}
    if (stage, key) in seen:
        return node
    seen.add((stage, key))
    for parent, parent_key in manifest.get("parents", {}).items():
        node["parents"].append(_node(workdir, parent, parent_key, seen))
    return node


def _data_sources(manifest: dict[str, Any]) -> list[dict[str, str]]:
    config = manifest.get("config", {})
    out = []
    for where, fingerprint in manifest.get("data", {}).items():
        block: Any = config
        for part in where.split("."):
            block = block.get(part, {}) if isinstance(block, dict) else (
                block[int(part)] if isinstance(block, list) and part.isdigit() else {})
        source = {k: block[k] for k in ("path", "hf", "builtin", "stage", "split", "args") if block.get(k)}
        out.append({"field": where, **source, "sha256" if source.get("path") else "fingerprint": fingerprint})
    return out


def print_lineage(node: dict[str, Any], indent: int = 0) -> None:
    pad = "  " * indent
    head = f"{pad}{node['stage']} [{node.get('stage_kind', '?')}] {node['key']}"
    print(head + (" (missing)" if node.get("missing") else ""))
    if node.get("base_model"):
        base = node["base_model"]
        print(f"{pad}  base model: {base['path'] or 'tiny ' + json.dumps(base['tiny'])} tokenizer {base['tokenizer']}")
    for source in node.get("data", []):
        detail = ", ".join(f"{k}={v}" for k, v in source.items() if k != "field")
        print(f"{pad}  data {source['field']}: {detail}")
    for parent in node.get("parents", []):
        print_lineage(parent, indent + 1)
