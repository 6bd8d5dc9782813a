"""Rendering to (input_ids, loss_mask): which tokens are targets, and the checks that fail loudly."""

from __future__ import annotations

import copy

import pytest

from posttrain.data.render import fit_length, render_dataset, render_example, render_prompt
from posttrain.errors import UserError
from posttrain.types import ChatExample, PromptCompletionExample, RowSource, TextExample, TokenizedExample

SRC = RowSource("rows.jsonl", 7)


def _chat(*turns: tuple[str, str]) -> ChatExample:
    return ChatExample([{"role": r, "content": c} for r, c in turns], SRC)


def _targets(tokenizer, rendered) -> list[str]:
    """Decoded runs of consecutive target tokens."""
    runs, current = [], []
    for token, on in zip(rendered.input_ids, rendered.loss_mask):
        if on:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_assistant_turns_and_their_end_of_turn_token_are_the_only_targets(demo_tokenizer):
    example = _chat(("system", "Be brief."), ("user", "What is 2 + 3?"), ("assistant", "2 + 3 = 5"),
                    ("user", "And 4 + 4?"), ("assistant", "4 + 4 = 8"))
    rendered = render_example(demo_tokenizer, example, "assistant")
    assert _targets(demo_tokenizer, rendered) == ["2 + 3 = 5<|im_end|>", "4 + 4 = 8<|im_end|>"]
    # The rendering is exactly the chat template's output: nothing added or lost.
    full = demo_tokenizer.apply_chat_template(example.messages, tokenize=False)
    assert demo_tokenizer.decode(rendered.input_ids) == full
    last = render_example(demo_tokenizer, example, "last_assistant")
    assert _targets(demo_tokenizer, last) == ["4 + 4 = 8<|im_end|>"]
    everything = render_example(demo_tokenizer, example, "all")
    assert everything.loss_mask == [0] + [1] * (len(everything) - 1)


def test_prompt_tokens_equal_what_a_sampler_sees(demo_tokenizer):
    """Training prompt tokens == render_prompt tokens (generation prompt included): no mismatch
    between what the policy was trained on and what it is sampled from."""
    messages = [{"role": "user", "content": "What is 12 + 30?"}]
    rendered = render_example(demo_tokenizer, ChatExample([*messages, {"role": "assistant", "content": "42"}], SRC),
                              "assistant")
    prompt = render_prompt(demo_tokenizer, messages)
    assert rendered.input_ids[: len(prompt)] == prompt
    assert rendered.loss_mask[: len(prompt)] == [0] * len(prompt)
    assert rendered.loss_mask[len(prompt)] == 1


def test_plain_prompt_completion_supervises_completion_and_eos(demo_tokenizer):
    example = PromptCompletionExample("12 + 30 =", " 42", SRC)
    rendered = render_example(demo_tokenizer, example, "assistant")
    assert _targets(demo_tokenizer, rendered) == [" 42<|im_end|>"]
    assert rendered.input_ids[0] == demo_tokenizer.bos_token_id
    assert rendered.input_ids[-1] == demo_tokenizer.eos_token_id


def test_conversational_prompt_with_plain_completion(demo_tokenizer):
    example = PromptCompletionExample([{"role": "user", "content": "What is 1 + 1?"}], "1 + 1 = 2", SRC)
    assert _targets(demo_tokenizer, render_example(demo_tokenizer, example, "assistant")) == ["1 + 1 = 2<|im_end|>"]


def test_text_rows_target_every_token_but_the_first(demo_tokenizer):
    rendered = render_example(demo_tokenizer, TextExample("12 + 30 = 42", SRC), "all")
    assert rendered.input_ids[0] == demo_tokenizer.bos_token_id and rendered.loss_mask[0] == 0
    assert all(rendered.loss_mask[1:]) and rendered.input_ids[-1] == demo_tokenizer.eos_token_id


@pytest.mark.parametrize(("turns", "message"), [
    ((("user", "a"), ("user", "b"), ("assistant", "c")), "two user turns in a row"),
    ((("assistant", "a"), ("user", "b")), "an assistant turn before any user turn"),
    ((("user", "a"), ("assistant", "b"), ("system", "c")), "a system message after the first turn"),
    ((("user", "a"),), "the loss mask is all zero"),
])
def test_role_order_errors_name_the_row(demo_tokenizer, turns, message):
    with pytest.raises(UserError) as info:
        render_example(demo_tokenizer, _chat(*turns), "assistant")
    assert message in info.value.render() and "rows.jsonl:7" in info.value.render()


def test_tokenizer_without_chat_template_is_an_error(demo_tokenizer):
    bare = copy.deepcopy(demo_tokenizer)
    bare.chat_template = None
    with pytest.raises(UserError) as info:
        render_example(bare, _chat(("user", "a"), ("assistant", "b")), "assistant")
    assert "no chat template" in info.value.render() and "model.chat_template: chatml" in info.value.render()


def test_template_that_never_emits_eos_is_an_error(demo_tokenizer):
    """An assistant turn that does not end with the end-of-turn token would teach the model never
    to stop; this is the classic silent SFT bug."""
    broken = copy.deepcopy(demo_tokenizer)
    broken.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(UserError) as info:
        render_example(broken, _chat(("user", "a"), ("assistant", "b")), "assistant")
    assert "does not end with an end-of-turn token" in info.value.render()


def test_template_that_rewrites_earlier_turns_is_detected(demo_tokenizer):
    """Templates that drop earlier assistant turns' content (e.g. reasoning) break the span check."""
    rewriting = copy.deepcopy(demo_tokenizer)
    rewriting.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\\n<|im_end|>\\n' }}{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    example = _chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    with pytest.raises(UserError) as info:
        render_example(rewriting, example, "assistant")
    assert "rewrites earlier turns" in info.value.render()
    assert _targets(rewriting, render_example(rewriting, example, "last_assistant")) == ["d<|im_end|>"]


def test_truncation_keeps_the_prompt_counts_and_fails_above_the_share(demo_tokenizer):
    rows = [_chat(("user", "What is 10 + 20?"), ("assistant", "10 + 20 = 30 " * n)) for n in (1, 1, 1, 8)]
    rendered, report = render_dataset(demo_tokenizer, rows, loss_on="assistant", max_length=40,
                                      on_overlong="truncate", max_truncated_share=0.3)
    assert report.truncated == 1 and len(rendered) == 4 and max(len(r) for r in rendered) == 40
    with pytest.raises(UserError) as info:
        render_dataset(demo_tokenizer, rows, loss_on="assistant", max_length=40, on_overlong="truncate",
                       max_truncated_share=0.2)
    assert "longer than max_length 40" in info.value.render()
    _, dropped = render_dataset(demo_tokenizer, rows, loss_on="assistant", max_length=40, on_overlong="drop",
                                max_truncated_share=0.3)
    assert dropped.dropped == 1 and dropped.truncated == 0


def test_overlong_row_with_truncation_off_names_the_row(demo_tokenizer):
    long = TokenizedExample(list(range(50)), [0] + [1] * 49, SRC)
    with pytest.raises(UserError) as info:
        fit_length(long, 20, "error")
    assert "rows.jsonl:7" in info.value.render() and "50 tokens" in info.value.render()


def test_row_truncated_to_no_targets_is_dropped_not_trained_on(demo_tokenizer):
    prompt_only = TokenizedExample(list(range(30)), [0] * 25 + [1] * 5, SRC)
    assert fit_length(prompt_only, 20, "truncate") is None
