"""``perplexity``: how well the model predicts held-out SFT data.

Rows are rendered exactly as SFT renders them (``render_example``: the chat template and the
checked loss mask), so the tokens scored are the tokens SFT would train on (``options.loss_on``:
assistant turns by default; ``all``; ``last_assistant``). Rows longer than ``options.max_length``
tokens are cut at the end. Data: any SFT rows (text, messages, prompt+completion); no default.

Metrics: ``perplexity`` = exp(total NLL / total target tokens), pooled over rows;
``perplexity_nll`` (the mean NLL per target token, nats; the per-record value is weighted by the
row's target tokens, so ``--compare`` pairs it correctly); ``perplexity_tokens``;
``perplexity_truncated`` (rows cut); ``perplexity_n``.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from posttrain.config.base import StrictModel
from posttrain.config.components import EvalTaskConfig
from posttrain.data.render import fit_length, render_example
from posttrain.evals.base import EvalContext, EvalResult, register_task, task_options
from posttrain.evals.common import load_examples, record_id, score_sequences


class PerplexityOptions(StrictModel):
    loss_on: Literal["assistant", "last_assistant", "all"] = Field("assistant", description="which tokens are scored")
    max_length: int = Field(2048, gt=1, description="tokens per row; longer rows are cut at the end")


def perplexity(ctx: EvalContext, cfg: EvalTaskConfig) -> EvalResult:
    where = "eval(perplexity)"
    opts: PerplexityOptions = task_options(cfg, where)
    examples = load_examples(ctx, cfg, None, where, force_prompt=False)
    rendered = []
    for example in examples:
        full = render_example(ctx.tokenizer, example, opts.loss_on)
        rendered.append(fit_length(full, opts.max_length, "truncate"))
    kept = [(e, r) for e, r in zip(examples, rendered) if r is not None]
    scored = score_sequences(ctx.model, [(r.input_ids, r.loss_mask) for _, r in kept], batch_size=cfg.batch_size,
                             pad_id=ctx.tokenizer.pad_token_id or 0)
    total_nll = -sum(s for s, _ in scored)
    tokens = sum(c for _, c in scored)
    records = [{"id": record_id(e), "tokens": c, "nll": -s, "truncated": r.truncated,
                "scores": {"perplexity_nll": -s / c if c else 0.0}, "weights": {"perplexity_nll": float(c)}}
               for (e, r), (s, c) in zip(kept, scored)]
    nll = total_nll / tokens if tokens else 0.0
    metrics = {"perplexity": math.exp(nll), "perplexity_nll": nll, "perplexity_tokens": float(tokens),
               "perplexity_truncated": float(sum(r.truncated for _, r in kept)), "perplexity_n": float(len(kept))}
    return EvalResult(metrics, records)


register_task("perplexity", perplexity, options=PerplexityOptions, uses=("data", "limit", "batch_size"))
