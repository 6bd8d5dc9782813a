"""The HTML run report: one self-contained page (inline SVG, no JavaScript, no dependencies).

It shows the pipeline as a table (status, gates, eval metrics, alarms, head), a bar chart of each
eval metric across stages, and each training stage's curves (loss, reward, KL, lengths, ...)
from its metrics.jsonl. ``posttrain report WORKDIR`` writes ``WORKDIR/report.html``; every
``posttrain run`` refreshes it.
"""

from __future__ import annotations

import html
import math
from typing import Any

CURVE_KEYS = ("loss", "reward_mean", "rewards/accuracy", "rewards/margin", "kl", "entropy", "completion_length",
              "logps_per_token/chosen", "logps_per_token/rejected", "grad_norm", "lr", "tokens_per_s")
STATUS_COLOURS = {"passed": "#1a7f37", "gate failed": "#cf222e", "failed": "#cf222e", "blocked": "#9a6700",
                  "incomplete": "#9a6700", "not run": "#6e7781"}


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else _esc(value)


def line_chart(title: str, steps: list[float], values: list[float], width: int = 320, height: int = 140) -> str:
    """An SVG polyline of ``values`` over ``steps`` with min/max labels (non-finite points skipped)."""
    points = [(s, v) for s, v in zip(steps, values) if isinstance(v, int | float) and math.isfinite(v)]
    if len(points) < 2:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    span_x, span_y = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    pad = 28

    def at(x: float, y: float) -> str:
        return f"{pad + (x - x0) / span_x * (width - 2 * pad):.1f},{height - pad - (y - y0) / span_y * (height - 2 * pad):.1f}"

    path = " ".join(at(x, y) for x, y in points)
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="{_esc(title)}">'
            f'<text x="4" y="14" font-size="12">{_esc(title)}</text>'
            f'<polyline fill="none" stroke="#0969da" stroke-width="1.5" points="{path}"/>'
            f'<text x="4" y="{pad + 4}" font-size="10" fill="#57606a">{y1:.4g}</text>'
            f'<text x="4" y="{height - pad}" font-size="10" fill="#57606a">{y0:.4g}</text>'
            f'<text x="{pad}" y="{height - 6}" font-size="10" fill="#57606a">step {x0:g}</text>'
            f'<text x="{width - pad - 40}" y="{height - 6}" font-size="10" fill="#57606a">step {x1:g}</text></svg>')


def bar_chart(title: str, items: list[tuple[str, float]], width: int = 420) -> str:
    """Horizontal bars (one per stage) for one eval metric."""
    if not items:
        return ""
    top = max(abs(v) for _, v in items) or 1.0
    row = 20
    height = 24 + row * len(items)
    bars = []
    for i, (label, value) in enumerate(items):
        y = 20 + i * row
        length = abs(value) / top * (width - 170)
        bars.append(f'<text x="4" y="{y + 13}" font-size="11">{_esc(label)}</text>'
                    f'<rect x="110" y="{y + 2}" width="{length:.1f}" height="{row - 6}" fill="#54aeff"/>'
                    f'<text x="{115 + length:.1f}" y="{y + 13}" font-size="11">{value:.4g}</text>')
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="{_esc(title)}">'
            f'<text x="4" y="13" font-size="12">{_esc(title)}</text>{"".join(bars)}</svg>')


def render(title: str, rows: list[dict[str, Any]], curves: dict[str, list[dict[str, Any]]],
           head: dict[str, Any] | None) -> str:
    """The page. ``rows``: one dict per stage (stage, kind, status, key, parents, metrics, gates,
    alarms, head); ``curves``: stage -> its metrics.jsonl records."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{_esc(title)}</title>",
             "<style>body{font-family:system-ui,sans-serif;margin:24px;color:#1f2328}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #d0d7de;padding:4px 8px;"
             "vertical-align:top}th{background:#f6f8fa}.charts{display:flex;flex-wrap:wrap;gap:12px}</style>",
             f"<h1>{_esc(title)}</h1>",
             f"<p>Head (promoted model): <b>{_esc(head['stage'])}</b> {_esc(head['key'])} ({_esc(head['reason'])}, "
             f"{_esc(head['time'])})</p>" if head else "<p>No promoted model yet.</p>",
             _stage_table(rows), "<h2>Evaluations across stages</h2>", _eval_charts(rows),
             "<h2>Training curves</h2>"]
    for row in rows:
        charts = _stage_curves(curves.get(row["stage"], []))
        if charts:
            parts.append(f"<h3>{_esc(row['stage'])} ({_esc(row['kind'])})</h3><div class='charts'>{charts}</div>")
    return "\n".join(parts)


def _stage_table(rows: list[dict[str, Any]]) -> str:
    out = ["<table><tr><th>stage</th><th>from</th><th>kind</th><th>status</th><th>key</th><th>metrics</th>"
           "<th>gates</th><th>alarms</th></tr>"]
    for r in rows:
        colour = STATUS_COLOURS.get(r["status"], "#1f2328")
        metrics = "<br>".join(f"{_esc(k)} {_fmt(v)}" for k, v in sorted(r["metrics"].items())
                              if isinstance(v, int | float) and not k.endswith(("_s", "seconds")))
        gates = "<br>".join(f"{'✔' if g['passed'] else '✘'} {_esc(g['gate'])} ({_fmt(g['value'])})"
                            for g in r["gates"])
        alarms = "<br>".join(_esc(a.get("message", ""))[:200] for a in r["alarms"][:5])
        name = f"<b>{_esc(r['stage'])}</b>{' ★' if r.get('head') else ''}"
        out.append(f"<tr><td>{name}</td><td>{_esc(', '.join(r['parents']))}</td><td>{_esc(r['kind'])}</td>"
                   f"<td style='color:{colour}'>{_esc(r['status'])}</td><td><code>{_esc(r['key'][:10])}</code></td>"
                   f"<td>{metrics}</td><td>{gates}</td><td>{alarms}</td></tr>")
    out.append("</table>")
    return "".join(out)


def _eval_charts(rows: list[dict[str, Any]]) -> str:
    names = sorted({k for r in rows for k, v in r["metrics"].items() if isinstance(v, int | float)
                    and k in r.get("eval_metrics", [])})
    charts = [bar_chart(name, [(r["stage"], r["metrics"][name]) for r in rows if name in r["metrics"]])
              for name in names]
    return f"<div class='charts'>{''.join(charts)}</div>" if charts else "<p>No evals.</p>"


def _stage_curves(records: list[dict[str, Any]]) -> str:
    steps = [r for r in records if "alarm" not in r]
    charts = []
    for key in CURVE_KEYS:
        values = [r.get(key) for r in steps]
        if sum(v is not None for v in values) >= 2:
            charts.append(line_chart(key, [r["step"] for r in steps if r.get(key) is not None],
                                     [v for v in values if v is not None]))
    return "".join(charts)
