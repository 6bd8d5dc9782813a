"""Examples -> ``(input_ids, loss_mask)``: the one place where text becomes training tokens.

Conversations go through the tokenizer's chat template. The template is checked, not assumed:
each assistant turn must be a span of the full rendering (the rendering of the conversation up to
that turn is a prefix of the whole), must end with an end-of-turn token the model is trained to
produce, and roles must come in a sensible order. Text is tokenized piece by piece at turn
boundaries, so the prompt tokens seen in training are exactly the tokens a sampler sees after
``add_generation_prompt``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from posttrain.errors import UserError, problem
from posttrain.types import (
    ChatExample,
    Example,
    KTOExample,
    Message,
    PromptCompletionExample,
    PromptExample,
    RowSource,
    Text,
    TextExample,
    TokenizedExample,
)

# Tokens that end a turn in common templates; the tokenizer's EOS is always one of them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>")


@dataclass
class RenderReport:
    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    targets: int = 0
    longest: int = 0
    examples_dropped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {"rows": self.rows, "truncated": self.truncated, "dropped": self.dropped,
                "tokens": self.tokens, "targets": self.targets, "longest": self.longest}


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return ids


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"] if text else []


def _require_template(tokenizer: PreTrainedTokenizerBase, source: RowSource | None) -> None:
    if not tokenizer.chat_template:
        raise UserError(problem(str(source or "data"), "conversational data, but the tokenizer has no chat template",
                                "set model.chat_template: chatml (or a path to a .jinja template)"))


def check_roles(messages: list[Message], source: RowSource | None, *, needs_assistant: bool) -> None:
    """System first if at all; user and assistant alternate (tool results follow an assistant)."""
    where = str(source or "conversation")
    previous = None
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system" and i != 0:
            raise UserError(problem(f"{where} messages[{i}]", "a system message after the first turn",
                                    "move the system message to the front"))
        if role in ("user", "assistant") and role == previous:
            raise UserError(problem(f"{where} messages[{i}]", f"two {role} turns in a row",
                                    "merge them into one turn"))
        if role == "assistant" and previous in (None, "system"):
            raise UserError(problem(f"{where} messages[{i}]", "an assistant turn before any user turn",
                                    "start the conversation with a user turn"))
        if role == "tool" and previous not in ("assistant", "tool"):
            raise UserError(problem(f"{where} messages[{i}]", "a tool result that follows no assistant turn",
                                    "put tool results after the assistant turn that called the tool"))
        previous = role
    if needs_assistant and not any(m["role"] == "assistant" for m in messages):
        raise UserError(problem(where, "the conversation has no assistant turn, so no token would be "
                                "trained on (the loss mask is all zero)", "add an assistant turn or drop the row"))


def _apply(tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[Message], supervised: set[int],
                source: RowSource | None = None) -> TokenizedExample:
    """Render a conversation; tokens of the assistant turns in ``supervised`` become targets."""
    _require_template(tokenizer, source)
    full = _apply(tokenizer, messages, False)
    cuts: list[tuple[int, int]] = []
    for i in sorted(supervised):
        start = _apply(tokenizer, messages[:i], True) if i else ""
        upto = _apply(tokenizer, messages[: i + 1], False)
        if not (full.startswith(start) and full.startswith(upto) and len(upto) > len(start)):
            raise UserError(problem(str(source or "chat template"),
                                    f"the chat template does not render turn {i} as a span of the whole "
                                    "conversation (it rewrites earlier turns)",
                                    "use loss_on: last_assistant, or a template whose renderings of "
                                    "prefixes are prefixes of the whole"))
        cuts.append((len(start), len(upto.rstrip())))
    ids: list[int] = []
    mask: list[int] = []
    position = 0
    for begin, end in cuts:
        piece = _encode(tokenizer, full[position:begin])
        ids += piece
        mask += [0] * len(piece)
        piece = _encode(tokenizer, full[begin:end])
        if not piece or piece[-1] not in end_of_turn_ids(tokenizer):
            raise UserError(problem(str(source or "chat template"),
                                    "an assistant turn does not end with an end-of-turn token, so the "
                                    "model would never learn to stop",
                                    "use a template that closes assistant turns with the EOS token "
                                    "(e.g. model.chat_template: chatml)"))
        ids += piece
        mask += [1] * len(piece)
        position = end
    tail = _encode(tokenizer, full[position:])
    return TokenizedExample(ids + tail, mask + [0] * len(tail), source)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Text, source: RowSource | None = None) -> list[int]:
    """Token ids a sampler continues from (with the generation prompt for conversations)."""
    if isinstance(prompt, list):
        _require_template(tokenizer, source)
        return _encode(tokenizer, _apply(tokenizer, prompt, True))
    return _with_bos(tokenizer, _encode(tokenizer, prompt, special=True))


def _with_bos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        return [bos, *ids]
    return ids


def render_prompt_completion(tokenizer: PreTrainedTokenizerBase, prompt: Text, completion: Text,
                             loss_on: str, source: RowSource | None = None) -> TokenizedExample:
    """Prompt + completion; the completion (with its end-of-turn token) is the target."""
    if isinstance(prompt, list) != isinstance(completion, list):
        if isinstance(prompt, list):
            completion = [Message(role="assistant", content=completion)]  # type: ignore[list-item]
        else:
            raise UserError(problem(str(source), "plain prompt with a conversational completion",
                                    "make the prompt a message list too"))
    if isinstance(prompt, list):
        messages = [*prompt, *completion]  # type: ignore[misc]
        check_roles(messages, source, needs_assistant=True)
        first = len(prompt)
        turns = {i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first}
        if loss_on == "last_assistant":
            turns = {max(turns)}
        example = render_chat(tokenizer, messages, turns, source)
    else:
        prompt_ids = _with_bos(tokenizer, _encode(tokenizer, prompt, special=True))
        completion_ids = _encode(tokenizer, completion) + [tokenizer.eos_token_id]
        example = TokenizedExample(prompt_ids + completion_ids,
                                   [0] * len(prompt_ids) + [1] * len(completion_ids), source)
    return _all_targets(example) if loss_on == "all" else example


def _all_targets(example: TokenizedExample) -> TokenizedExample:
    return TokenizedExample(example.input_ids, [0] + [1] * (len(example) - 1), example.source)


def render_example(tokenizer: PreTrainedTokenizerBase, example: Example, loss_on: str) -> TokenizedExample:
    """One training sequence for pretraining or SFT, with its loss mask checked."""
    if isinstance(example, TextExample):
        ids = _with_bos(tokenizer, _encode(tokenizer, example.text)) + [tokenizer.eos_token_id]
        rendered = TokenizedExample(ids, [0] + [1] * (len(ids) - 1), example.source)
    elif isinstance(example, ChatExample):
        check_roles(example.messages, example.source, needs_assistant=loss_on != "all")
        turns = {i for i, m in enumerate(example.messages) if m["role"] == "assistant"}
        if loss_on == "last_assistant":
            turns = {max(turns)}
        rendered = render_chat(tokenizer, example.messages, turns, example.source)
        if loss_on == "all":
            rendered = _all_targets(rendered)
    elif isinstance(example, PromptCompletionExample | KTOExample):
        rendered = render_prompt_completion(tokenizer, example.prompt, example.completion, loss_on, example.source)
    elif isinstance(example, PromptExample):
        raise UserError(problem(str(example.source), "prompt-only rows have nothing to learn",
                                "use prompt+completion rows for this stage"))
    else:
        raise UserError(problem(str(example.source), f"{type(example).__name__} rows cannot be rendered "
                                "for this stage", "use text, messages or prompt+completion rows"))
    if rendered.n_targets == 0:
        raise UserError(problem(str(example.source), "no token of this row is a training target "
                                "(the loss mask is all zero)", "check loss_on and the row's roles"))
    return rendered


def fit_length(example: TokenizedExample, max_length: int, on_overlong: str) -> TokenizedExample | None:
    """Cut or drop a row longer than ``max_length``. None = dropped."""
    if len(example) <= max_length:
        return example
    if on_overlong == "error":
        raise UserError(problem(str(example.source), f"{len(example)} tokens, more than max_length {max_length}",
                                "raise train.max_length, or set train.on_overlong: truncate or drop"))
    if on_overlong == "drop":
        return None
    cut = TokenizedExample(example.input_ids[:max_length], example.loss_mask[:max_length], example.source,
                           truncated=True)
    return cut if cut.n_targets else None


def render_dataset(tokenizer: PreTrainedTokenizerBase, examples: list[Example], *, loss_on: str,
                   max_length: int, on_overlong: str, max_truncated_share: float, where: str = "train"
                   ) -> tuple[list[TokenizedExample], RenderReport]:
    """Render every example; counts truncation and fails above ``max_truncated_share``."""
    report = RenderReport(rows=len(examples))
    rendered: list[TokenizedExample] = []
    for example in examples:
        full = render_example(tokenizer, example, loss_on)
        report.longest = max(report.longest, len(full))
        fitted = fit_length(full, max_length, on_overlong)
        if fitted is None:
            report.dropped += 1
            if len(report.examples_dropped) < 5:
                report.examples_dropped.append(str(example.source))
            continue
        report.truncated += int(fitted.truncated)
        report.tokens += len(fitted)
        report.targets += fitted.n_targets
        rendered.append(fitted)
    lost = report.truncated + report.dropped
    if examples and lost / len(examples) > max_truncated_share:
        raise UserError(problem(f"{where}.max_length", f"{lost} of {len(examples)} rows "
                                f"({lost / len(examples):.0%}) are longer than max_length {max_length} "
                                f"(longest {report.longest} tokens)",
                                "raise train.max_length, or raise train.max_truncated_share to accept it"))
    if not rendered:
        raise UserError(problem(f"{where}.max_length", "no rows are left after length filtering",
                                "raise max_length"))
    return rendered, report
