"""``calibration``: is the model's confidence in its answer as high as its accuracy?

Each row offers candidate answers: its ``choices`` (a list of strings; ``answer`` is the right
one's index, letter or text), or, for rows with a numeric ``answer`` and no choices, the answer
and distractors at ``options.distractors`` offsets (default -10, -1, +1, +10). The model's
probability of each candidate is the softmax over candidates of the summed log-probability of the
candidate as the reply to the prompt (no sampling; one forward pass per candidate). The prediction
is the most probable candidate and its probability the confidence.

Metrics: ``calibration_ece`` (expected calibration error, ``options.bins`` equal-width bins, Guo
et al. 2017), ``calibration_accuracy``, ``calibration_confidence`` (mean), ``calibration_brier``
(multi-class Brier score), ``calibration_n``. Default data: the demo world's held-out problems.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field

from posttrain.config.components import DataConfig, EvalTaskConfig
from posttrain.errors import UserError, problem
from posttrain.evals.base import EvalContext, EvalResult, register_task, task_options
from posttrain.evals.common import (
    DataDefault,
    PromptStyle,
    TemplateOptions,
    build_prompt,
    load_examples,
    mean,
    record_id,
    score_sequences,
    use_chat,
)
from posttrain.evals.stats import expected_calibration_error
from posttrain.types import PromptExample

DEFAULT = DataDefault(builtin=DataConfig(builtin="demo.prompts", split="test"))
STYLE = PromptStyle(chat="{prompt}", plain="Question: {prompt}\nAnswer:")


class CalibrationOptions(TemplateOptions):
    distractors: list[int] = Field(default_factory=lambda: [-10, -1, 1, 10],
                                   description="offsets of wrong answers for numeric rows without choices")
    bins: int = Field(10, ge=1, description="confidence bins of the ECE")


def candidates(example: PromptExample, offsets: list[int]) -> tuple[list[str], int]:
    """The row's candidate answers and the index of the right one."""
    choices, answer = example.extra.get("choices"), example.answer
    if isinstance(choices, list) and choices:
        texts = [str(c) for c in choices]
        if answer is not None and answer.strip().isdigit() and int(answer) < len(texts):
            return texts, int(answer)
        if answer is not None and len(answer.strip()) == 1 and answer.strip().isalpha():
            return texts, ord(answer.strip().upper()) - ord("A")
        if answer in texts:
            return texts, texts.index(answer)
    elif answer is not None and answer.strip().lstrip("-").isdigit():
        gold = int(answer)
        return [str(gold), *(str(gold + d) for d in offsets)], 0
    raise UserError(problem(str(example.source), "no candidate answers: need 'choices' with 'answer' (index, "
                            "letter or text) or a whole-number 'answer'", "add choices, or use numeric answers"))


def calibration(ctx: EvalContext, cfg: EvalTaskConfig) -> EvalResult:
    where = "eval(calibration)"
    opts: CalibrationOptions = task_options(cfg, where)
    examples: list[PromptExample] = load_examples(ctx, cfg, DEFAULT, where)  # type: ignore[assignment]
    chat = use_chat(ctx.tokenizer, opts)
    sequences, spans, shown, golds = [], [], [], []
    for example in examples:
        texts, gold = candidates(example, opts.distractors)
        prompt = build_prompt(ctx.tokenizer, example, opts, STYLE)
        start = len(sequences)
        for text in texts:
            # A chat reply starts right after the generation prompt; plain text after "Answer:".
            reply = ctx.tokenizer(text if chat or isinstance(example.prompt, list) else " " + text,
                                  add_special_tokens=False)["input_ids"]
            sequences.append((prompt.ids + reply, [0] * len(prompt.ids) + [1] * len(reply)))
        spans.append((start, len(sequences), texts))
        shown.append(prompt.shown)
        golds.append(gold)
    scored = score_sequences(ctx.model, sequences, batch_size=cfg.batch_size,
                             pad_id=ctx.tokenizer.pad_token_id or 0)
    return _summarise(examples, spans, shown, golds, scored, opts.bins)


def _summarise(examples, spans, shown, golds, scored, bins) -> EvalResult:
    confidences, correct, brier, records = [], [], [], []
    for example, (start, end, texts), prompt, gold in zip(examples, spans, shown, golds):
        logps = [scored[i][0] for i in range(start, end)]
        top = max(logps)
        weights = [math.exp(lp - top) for lp in logps]
        probs = [w / sum(weights) for w in weights]
        pick = max(range(len(probs)), key=probs.__getitem__)
        confidences.append(probs[pick])
        correct.append(pick == gold)
        brier.append(sum((p - float(j == gold)) ** 2 for j, p in enumerate(probs)))
        record: dict[str, Any] = {"id": record_id(example), "prompt": prompt, "candidates": texts, "gold": gold,
                                  "probabilities": probs, "predicted": pick,
                                  "scores": {"calibration_accuracy": float(pick == gold),
                                             "calibration_brier": brier[-1]}}
        records.append(record)
    metrics = {"calibration_ece": expected_calibration_error(confidences, correct, bins),
               "calibration_accuracy": mean([float(c) for c in correct]),
               "calibration_confidence": mean(confidences), "calibration_brier": mean(brier),
               "calibration_n": float(len(examples))}
    return EvalResult(metrics, records)


register_task("calibration", calibration, options=CalibrationOptions, uses=("data", "limit", "batch_size"),
              data=DEFAULT)
