"""What generation-based tasks share: finding their data, building prompts, sampling, records.

Data. A task reads ``eval.N.data`` when given (a local file, ``hf:`` name or ``builtin:`` set),
else its default: the file at the task's usual layout under ``$POSTTRAIN_EVAL_DATA`` (e.g.
``$POSTTRAIN_EVAL_DATA/gsm8k/test.jsonl``). Files are read unchanged (JSONL, gzip, CSV); the task
renames its set's columns (GSM8K's ``question`` is the prompt) and keeps every other field for its
verifier.

Prompts. ``options.template`` is the prompt text with ``{prompt}`` and the row's own fields
(``{tests}``, ...) filled in; other braces are left alone, so ``\\boxed{}`` needs no escaping.
With a chat template (``options.chat``, default: when the tokenizer has one) the text is the user
turn, after ``options.system`` if set; otherwise it is plain text continued by the model. A row
whose prompt is already a conversation is used as it is. Each task has a chat and a plain
default template and plain-mode stop strings (a base model does not stop by itself).

Sampling. ``n`` samples per prompt at ``temperature`` (0 = greedy, deterministic), seeded by
``options.seed`` (default: the run's seed); generation goes through `HFSampler` (batched, a
progress bar when the context asks for one).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from posttrain.config.base import StrictModel
from posttrain.config.components import DataConfig, EvalTaskConfig
from posttrain.data.formats import load_dataset
from posttrain.data.render import render_prompt
from posttrain.errors import UserError, problem
from posttrain.evals.base import EvalContext
from posttrain.rollout.hf import HFSampler, SamplingParams
from posttrain.types import (
    ChatExample,
    Example,
    KTOExample,
    Message,
    PreferencePair,
    PromptCompletionExample,
    PromptExample,
    Rollout,
    Text,
)

EVAL_DATA_ENV = "POSTTRAIN_EVAL_DATA"
_ID_FIELDS = ("task_id", "id", "key", "unique_id", "idx")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


# ---------------------------------------------------------------- options


class TemplateOptions(StrictModel):
    template: str | None = Field(None, description="prompt text with {prompt} and row fields; default: the task's")
    chat: bool | None = Field(None, description="use the chat template; default: when the tokenizer has one")
    system: str | None = Field(None, description="a system message before the prompt (chat only)")

    @model_validator(mode="after")
    def _system_needs_chat(self) -> TemplateOptions:
        if self.system is not None and self.chat is False:
            raise ValueError("'system' has no effect with chat: false; fix: remove 'system' or set chat: true")
        return self


class PromptOptions(TemplateOptions):
    stop: list[str] | None = Field(None, description="stop strings; default: the task's (plain prompts only)")


class SamplingOptions(PromptOptions):
    n: int = Field(1, ge=1, description="samples per prompt")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, description="sampling seed; default: the run's seed")

    @model_validator(mode="after")
    def _sampling_consistent(self) -> SamplingOptions:
        if self.n > 1 and self.temperature == 0:
            raise ValueError(f"n: {self.n} greedy samples are all identical; fix: set temperature > 0 "
                             "(e.g. 0.8) or n: 1")
        if self.top_p < 1 and self.temperature == 0:
            raise ValueError("'top_p' has no effect with greedy decoding; fix: remove it or set temperature > 0")
        return self


class PassAtKOptions(SamplingOptions):
    k: list[int] = Field(default_factory=lambda: [1], description="pass@k values to report, each <= n")

    @model_validator(mode="after")
    def _k_fits_n(self) -> PassAtKOptions:
        bad = [k for k in self.k if not 1 <= k <= self.n]
        if bad or not self.k:
            raise ValueError(f"k values {bad or self.k} need 1 <= k <= n (n = {self.n}); fix: raise n "
                             "(with temperature > 0) or lower k")
        return self


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class DataDefault:
    """A task's default data and how its columns map onto ours."""

    layout: str | None = None  # the usual file under $POSTTRAIN_EVAL_DATA, e.g. "gsm8k/test.jsonl"
    hf: str | None = None  # the usual Hugging Face name, shown in the error when no data is found
    builtin: DataConfig | None = None  # a generated set used when no data is given
    fields: dict[str, str] = field(default_factory=dict)  # {our name: the set's name}


def resolve_data(cfg: EvalTaskConfig, default: DataDefault | None, where: str) -> DataConfig:
    """The data the task reads: ``cfg.data``, else the default; a UserError says how to give it."""
    if cfg.data is not None:
        data = cfg.data
    elif default is not None and default.builtin is not None:
        data = default.builtin
    elif default is not None and default.layout and os.environ.get(EVAL_DATA_ENV):
        data = DataConfig(path=str(Path(os.environ[EVAL_DATA_ENV]).expanduser() / default.layout))
    else:
        hints = []
        if default is not None and default.layout:
            hints.append(f"data: {{path: .../{default.layout}}}")
        if default is not None and default.hf:
            hints.append(f"data: {{hf: {default.hf}, split: test}}")
        if default is not None and default.layout:
            hints.append(f"{EVAL_DATA_ENV}=<folder holding {default.layout}>")
        raise UserError(problem(f"{where}.data", f"task {cfg.task!r} has no data",
                                "set " + (" or ".join(hints) if hints else "data: {path: ...}")))
    if default is not None and default.fields:
        # The set's own column names are mapped unless the user mapped them differently.
        data = data.model_copy(update={"fields": {**default.fields, **data.fields}})
    return data


def load_examples(ctx: EvalContext, cfg: EvalTaskConfig, default: DataDefault | None, where: str, *,
                  force_prompt: bool = True, select: Callable[[list[Example]], list[Example]] | None = None
                  ) -> list[Example]:
    """The task's rows as typed examples: ``select`` (a split filter) first, then ``cfg.limit``.

    ``force_prompt`` reads every row as a prompt with its other fields kept (benchmark files carry
    columns such as ``completion`` that would otherwise look like another format).
    """
    data = resolve_data(cfg, default, where)
    if force_prompt:
        if data.format not in ("auto", "prompt"):
            raise UserError(problem(f"{where}.data.format", f"task {cfg.task!r} reads prompt rows",
                                    "remove data.format (or set it to prompt)", value=data.format))
        data = data.model_copy(update={"format": "prompt"})
    dataset = load_dataset(data, where=f"{where}.data", base_dir=ctx.base_dir)
    examples = select(dataset.examples) if select is not None else dataset.examples
    return examples[: cfg.limit] if cfg.limit else examples


def prompt_of(example: Example) -> Text:
    """The prompt of any row format: the turns before the last assistant turn of a conversation."""
    if isinstance(example, PromptExample | PromptCompletionExample | PreferencePair | KTOExample):
        return example.prompt
    if isinstance(example, ChatExample):
        last = max((i for i, m in enumerate(example.messages) if m["role"] == "assistant"), default=None)
        return example.messages[:last] if last else example.messages
    raise UserError(problem(str(getattr(example, "source", "data")), f"{type(example).__name__} rows have no "
                            "prompt", "use prompt, prompt+completion, messages or preference rows"))


def record_id(example: Example) -> str:
    """A sample's stable id across runs: the set's own id field, else its line."""
    extra = getattr(example, "extra", {}) or {}
    for name in _ID_FIELDS:
        if extra.get(name) is not None:
            return str(extra[name])
    return f"line:{example.source.line}"


# ---------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptStyle:
    """A task's default prompt: a template for chat models, one for plain continuation."""

    chat: str = "{prompt}"
    plain: str = "{prompt}"
    plain_stop: tuple[str, ...] = ()


def fill(template: str, values: dict[str, Any]) -> str:
    """Replace ``{name}`` for the names in ``values``; leave every other brace alone."""
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template)


def use_chat(tokenizer: PreTrainedTokenizerBase, opts: TemplateOptions) -> bool:
    return bool(tokenizer.chat_template) if opts.chat is None else opts.chat


@dataclass
class BuiltPrompt:
    ids: list[int]
    shown: Text  # what the model was asked (for the records)
    stop: list[str]


def build_prompt(tokenizer: PreTrainedTokenizerBase, example: Example, opts: TemplateOptions, style: PromptStyle,
                 values: dict[str, Any] | None = None) -> BuiltPrompt:
    """Token ids of one prompt per the options (see the module docstring)."""
    prompt = prompt_of(example)
    chat = use_chat(tokenizer, opts) or isinstance(prompt, list)
    own_stop = getattr(opts, "stop", None)
    stop = list(own_stop) if own_stop is not None else ([] if chat else list(style.plain_stop))
    if isinstance(prompt, list):
        ignored = [k for k in ("template", "system") if getattr(opts, k)] + (["chat"] if opts.chat is False else [])
        if ignored:
            raise UserError(problem(str(example.source), f"the row's prompt is a conversation, which options "
                                    f"{', '.join(ignored)} cannot change", "remove those options, or use text prompts"))
        messages: Text = prompt
    else:
        template = opts.template or (style.chat if chat else style.plain)
        text = fill(template, {**(getattr(example, "extra", {}) or {}), **(values or {}), "prompt": prompt})
        messages = text
        if chat:
            messages = ([Message(role="system", content=opts.system)] if opts.system else []) + [
                Message(role="user", content=text)]
    return BuiltPrompt(render_prompt(tokenizer, messages, example.source), messages, stop)


def trim_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first stop string (the sampler keeps the stop string itself)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


# ---------------------------------------------------------------- generation


def sample(ctx: EvalContext, cfg: EvalTaskConfig, prompts: list[BuiltPrompt], opts: PromptOptions,
           default_max_new_tokens: int) -> list[list[Rollout]]:
    """``n`` rollouts per prompt (one when ``opts`` has no sampling settings), grouped by prompt.

    Prompts with different stop strings are sampled separately so each stops where it should.
    """
    n = getattr(opts, "n", 1)
    params = SamplingParams(n=n, temperature=getattr(opts, "temperature", 0.0), top_p=getattr(opts, "top_p", 1.0),
                            max_new_tokens=cfg.max_new_tokens or default_max_new_tokens,
                            seed=ctx.seed if getattr(opts, "seed", None) is None else opts.seed)
    sampler = HFSampler(ctx.model, ctx.tokenizer, batch_size=cfg.batch_size, show_progress=ctx.show_progress)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(p.stop), []).append(i)
    out: list[list[Rollout]] = [[] for _ in prompts]
    for stop, members in groups.items():
        params.stop = list(stop)
        rollouts = sampler.generate([prompts[i].ids for i in members], params)
        for rollout in rollouts:
            out[members[rollout.prompt_index]].append(rollout)
    return out


def completion_texts(rollouts: list[Rollout], stop: Sequence[str]) -> list[str]:
    return [trim_at_stop(r.text, stop) for r in rollouts]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------- models


def load_model_folder(path: Path, *, where: str, device: str | torch.device | None = None
                      ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A stage artifact folder (``model/`` or ``adapter/`` + manifest) or a save_pretrained folder."""
    from transformers import AutoTokenizer

    from posttrain.models.load import load_pretrained, load_saved

    path = Path(path).expanduser()
    if (path / "model").is_dir() or (path / "adapter").is_dir():
        manifest = path / "manifest.json"
        base = json.loads(manifest.read_text()).get("model_base") if manifest.exists() else None
        model, tokenizer = load_saved(path, base=Path(base) if base else None)
    elif (path / "config.json").is_file():
        model = load_pretrained(str(path), where=where)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:
        raise UserError(problem(where, f"{str(path)!r} is not a model folder",
                                "point at a stage's artifact folder (with model/) or a save_pretrained folder "
                                "(with config.json)"))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked; any id works
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device



@torch.no_grad()
def score_sequences(model: torch.nn.Module, sequences: Sequence[tuple[list[int], list[int]]], *, batch_size: int,
                    pad_id: int = 0) -> list[tuple[float, int]]:
    """Per ``(input_ids, loss_mask)``: the summed log-probability of its target tokens and their
    count, through the trainer's log-prob path (right padding; causal attention ignores it)."""
    from posttrain.models.forward import sequence_logprobs

    was_training = model.training
    model.eval()
    device = model_device(model)
    out: list[tuple[float, int]] = []
    try:
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (row_ids, row_mask) in enumerate(chunk):
                ids[i, : len(row_ids)] = torch.tensor(row_ids)
                mask[i, : len(row_mask)] = torch.tensor(row_mask)
            positions = torch.arange(width)[None].expand_as(ids)
            sums, counts = sequence_logprobs(model, ids.to(device), positions.to(device), mask.to(device))
            out += [(float(s), int(c)) for s, c in zip(sums.tolist(), counts.tolist())]
    finally:
        model.train(was_training)
    return out
