"""Structured verifiers (JSON schema, regex, exact, choice, format, length, overlong) and the
verifier registry."""

from __future__ import annotations

import subprocess
import sys

import pytest

from posttrain.errors import UserError
from posttrain.rewards.verifiers import PLUGIN_MODULES, get_verifier, verifier_names, verify
from posttrain.rewards.verifiers.structured import (
    extract_choice,
    extract_json,
    length_penalty,
    overlong_penalty,
    verify_choice,
    verify_exact,
    verify_format,
    verify_json,
    verify_regex,
)

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}

# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def test_json_valid_against_schema() -> None:
    result = verify_json('{"name": "Ada", "age": 36}', SCHEMA)
    assert result.score == 1.0
    assert result.components == {"parses": 1.0, "valid": 1.0}
    assert result.meta == {"source": "whole", "validated": True}


def test_json_invalid_against_schema_lists_errors() -> None:
    result = verify_json('{"name": "Ada", "age": -1, "x": 1}', SCHEMA)
    assert result.score == 0.0
    assert result.components == {"parses": 1.0, "valid": 0.0}
    assert result.meta["validated"] is True
    assert any(e.startswith("age:") and "minimum" in e for e in result.meta["errors"])
    assert any("Additional properties" in e for e in result.meta["errors"])


def test_json_unparseable_never_pays() -> None:
    result = verify_json('{"name": "Ada", "age": ', SCHEMA)
    assert result.score == 0.0
    assert result.components == {"parses": 0.0, "valid": 0.0}
    assert result.meta["source"] is None and "no JSON" in result.meta["reason"]


def test_json_sources() -> None:
    fenced = 'Here:\n```json\n{"name": "Ada", "age": 3}\n```\nDone.'
    assert extract_json(fenced).source == "fenced"
    assert extract_json('```\n[1, 2]\n```').value == [1, 2]
    # an unlabelled fence that is not JSON is skipped for the labelled one
    both = '```python\nx = 1\n```\n```json\n{"a": 1}\n```'
    assert extract_json(both).value == {"a": 1}
    embedded = extract_json('Sure! {"a": {"b": [1, 2]}} hope that helps {"c": 2}')
    assert (embedded.value, embedded.source) == ({"a": {"b": [1, 2]}}, "embedded")
    assert extract_json("no json at all, not even {this}") is None
    assert verify_json("[1, 2, 3]").score == 1.0  # no schema: parsing is enough


def test_invalid_schema_is_a_user_error() -> None:
    with pytest.raises(UserError, match="not a valid JSON Schema"):
        verify_json("{}", {"type": "no-such-type"})


# --------------------------------------------------------------------------------------------
# Regex, exact, choice
# --------------------------------------------------------------------------------------------


def test_regex_full_match_only() -> None:
    assert verify_regex("555-1234\n", r"\d{3}-\d{4}").score == 1.0  # surrounding whitespace stripped
    partial = verify_regex("call 555-1234 now", r"\d{3}-\d{4}")
    assert partial.score == 0.0
    assert partial.meta["partial"] is True and partial.meta["full_match"] is False
    assert verify_regex("555-1234\n", r"\d{3}-\d{4}", strip=False).score == 0.0


def test_invalid_regex_is_a_clear_user_error() -> None:
    with pytest.raises(UserError, match=r"invalid regular expression: .* at position 0"):
        verify_regex("x", "(unclosed")
    with pytest.raises(UserError, match=r"invalid regular expression"):
        verify("regex", "x", {"pattern": "[a-"})


def test_exact_match() -> None:
    assert verify_exact("  Paris\n", "Paris").score == 1.0
    assert verify_exact("paris", "Paris").score == 0.0
    assert verify_exact("paris", "Paris", ignore_case=True).score == 1.0
    assert verify_exact("New   York", "New York", collapse_whitespace=True).score == 1.0


CHOICES = [
    ("(B)", "B", "whole"),
    ("b", "B", "whole"),
    ("Answer: B", "B", "marker"),
    ("The answer is b.", "B", "marker"),
    ("the correct answer is (c) because ...", "C", "marker"),
    ("**Answer:** D", "D", "marker"),
    ("The answer is option E", "E", "marker"),
    ("so $\\boxed{\\text{(A)}}$", "A", "boxed"),
    ("B) Paris is the capital", "B", "leading"),
    ("Between (A) and (C), I pick (C).", "C", "last_paren"),
]


@pytest.mark.parametrize(("text", "letter", "rule"), CHOICES)
def test_choice_extraction(text: str, letter: str, rule: str) -> None:
    assert extract_choice(text) == (letter, rule)


def test_choice_is_not_fooled_by_words() -> None:
    assert extract_choice("The answer is a prime number.")[0] is None  # "a" is an article
    assert extract_choice("The answer is Bob.")[0] is None
    assert extract_choice("I think (C) is right", strict=True) == (None, None)
    assert extract_choice("The answer is F") == (None, None)  # outside A-E


def test_choice_verifier() -> None:
    assert verify_choice("the answer is b", "(B)").score == 1.0
    wrong = verify_choice("Answer: C", "B")
    assert wrong.score == 0.0 and wrong.meta["reason"] == "wrong choice"
    missing = verify_choice("no idea", "B")
    assert missing.score == 0.0 and missing.meta["reason"] == "no choice letter found"
    with pytest.raises(UserError, match="not a choice letter"):
        verify_choice("A", "Paris")


# --------------------------------------------------------------------------------------------
# Format, length, overlong
# --------------------------------------------------------------------------------------------


def test_format_reward_components() -> None:
    good = verify_format("<think>2+2</think>\n<answer>4</answer>\n")
    assert good.score == 1.0
    assert good.components == {"think": 1.0, "answer": 1.0, "order": 1.0, "only_tags": 1.0}
    chatty = verify_format("Sure! <think>2+2</think><answer>4</answer>")
    assert chatty.score == 0.0 and chatty.components["only_tags"] == 0.0
    assert verify_format("Sure! <think>2+2</think><answer>4</answer>", partial=True).score == 0.75
    swapped = verify_format("<answer>4</answer><think>2+2</think>")
    assert swapped.components == {"think": 1.0, "answer": 1.0, "order": 0.0, "only_tags": 0.0}
    repeated = verify_format("<think>a</think><think>b</think><answer>4</answer>", partial=True)
    assert repeated.components["think"] == 0.0 and repeated.score == 0.25
    unclosed = verify_format("<think>a<answer>4</answer>")
    assert unclosed.components["think"] == 0.0 and unclosed.components["answer"] == 1.0


def test_format_reward_custom_tags() -> None:
    text = "<reasoning>r</reasoning><code>print(1)</code>"
    assert verify_format(text, tags=("reasoning", "code")).score == 1.0
    assert verify("format", text, {"tags": ["reasoning", "code"]}).score == 1.0
    assert verify_format(text).score == 0.0


def test_length_penalty() -> None:
    """target 100, scale 100: 80 -> 0; 150 -> -(50/100) = -0.5; 400 -> floored at -1."""
    assert length_penalty(80, target=100).score == 0.0
    assert length_penalty(150, target=100).score == -0.5
    assert length_penalty(400, target=100).score == -1.0
    assert length_penalty(110, target=100, scale=20).score == -0.5


def test_overlong_penalty_dapo_eq13() -> None:
    """DAPO eq. 13 with L_max = 20480, L_cache = 4096, so L_max - L_cache = 16384:

    - |y| = 16000 <= 16384                  -> 0
    - |y| = 16384 (edge of the buffer)      -> 0
    - |y| = 18432: (16384 - 18432) / 4096   = -2048 / 4096 = -0.5
    - |y| = 20480 (= L_max, still inside)   : (16384 - 20480) / 4096 = -1
    - |y| = 17408: (16384 - 17408) / 4096   = -0.25
    - |y| = 20481 > L_max                   -> -1
    """
    def penalty(length: int) -> float | None:
        return overlong_penalty(length, max_length=20480, cache_length=4096).score

    assert penalty(16000) == 0.0
    assert penalty(16384) == 0.0
    assert penalty(18432) == -0.5
    assert penalty(17408) == -0.25
    assert penalty(20480) == -1.0
    assert penalty(20481) == -1.0
    with pytest.raises(UserError):
        overlong_penalty(10, max_length=100, cache_length=0)
    row = {"max_length": 10, "cache_length": 4, "num_tokens": 8}
    result = verify("overlong", "ignored text", row)
    assert result.score == -(8 - 6) / 4 and result.meta["unit"] == "tokens"
    assert verify("overlong", "x" * 8, {"max_length": 10, "cache_length": 4}).meta["unit"] == "chars"


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_registry_names_and_aliases() -> None:
    names = verifier_names()
    for kind in ("math", "json", "regex", "exact", "choice", "format", "length", "overlong"):
        assert kind in names
    assert get_verifier("multiple_choice") is get_verifier("choice")
    assert verify("math", "\\boxed{42}", {"answer": "42"}).score == 1.0
    assert verify("json", '{"name": "A", "age": 1}', {"schema": SCHEMA}).score == 1.0
    assert verify("json", "[1]", {"schema": None}).score == 1.0
    assert verify("exact", "Paris", {"answer": "Paris"}).score == 1.0
    assert verify("choice", "Answer: (A)", {"answer": "A"}).score == 1.0


def test_unknown_kind_lists_valid_names() -> None:
    with pytest.raises(UserError, match="did you mean 'math'.*valid names: .*regex"):
        get_verifier("maths")


@pytest.mark.parametrize(("kind", "field"), [
    ("math", "answer"), ("json", "schema"), ("regex", "pattern"), ("exact", "answer"),
    ("choice", "answer"), ("length", "target_length"), ("overlong", "max_length"),
])
def test_missing_row_field_names_the_field_and_fix(kind: str, field: str) -> None:
    with pytest.raises(UserError) as caught:
        verify(kind, "text", {"completion": "text"})
    message = str(caught.value)
    assert f"'{field}'" in message and "fix:" in message


def test_plugins_are_not_imported_with_the_package() -> None:
    code = ("import sys, posttrain.rewards.verifiers as v; "
            "print(any(m in sys.modules for m in v.PLUGIN_MODULES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert "posttrain.rewards.verifiers.code" in PLUGIN_MODULES


def test_a_broken_plugin_is_reported_on_a_miss(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import posttrain.rewards.verifiers as verifiers

    (tmp_path / "posttrain_broken_plugin.py").write_text("raise ImportError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(verifiers, "PLUGIN_MODULES", ("posttrain_broken_plugin", "posttrain_absent_plugin"))
    monkeypatch.setattr(verifiers, "_plugins_loaded", False)
    monkeypatch.setattr(verifiers, "_plugin_failures", {})
    with pytest.raises(UserError, match="posttrain_broken_plugin failed to import .*boom"):
        get_verifier("code_that_is_not_there")
    assert verify("math", "\\boxed{1}", {"answer": "1"}).score == 1.0  # built-ins unaffected
