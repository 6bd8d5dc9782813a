"""IFEval instruction checkers: hand-made cases per instruction, loose mode, the verifier record,
and agreement with the reference checker's verdicts on the GPT-4 responses released with IFEval."""

from __future__ import annotations

import json
import random
import re
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.errors import UserError
from posttrain.registry import Registry
from posttrain.rewards.verifiers.ifeval import (
    SUPPORTED_INSTRUCTIONS,
    check_instruction,
    loose_variants,
    register,
    verify_ifeval,
)
from posttrain.rewards.verifiers.ifeval_checkers import (
    _count_placeholders,
    number_bullet_lists,
    postscript,
    title,
)
from posttrain.rewards.verifiers.ifeval_text import count_capital_words, count_sentences, count_words

GERMAN = "Das ist ein kurzer Satz auf Deutsch, und er handelt vom Wetter."
ENGLISH = "The weather is sunny today and we will go to the park."

# (instruction id, kwargs, response, expected): the expected verdict is read off the text.
CASES = [
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "The NASA and ESA teams met.", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "The Nasa team met.", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "Only ONE shouted word.", True),
    ("change_case:english_capital", {}, "THIS IS A LOUD SENTENCE IN ENGLISH ABOUT THE WEATHER.", True),
    ("change_case:english_capital", {}, "This is not all capitals.", False),
    ("change_case:english_capital", {}, "ЭТО КОРОТКИЙ РУССКИЙ ТЕКСТ О ПОГОДЕ СЕГОДНЯ.", False),
    ("change_case:english_lowercase", {}, "this sentence is written entirely in lowercase english.", True),
    ("change_case:english_lowercase", {}, "This one starts with a capital letter.", False),
    ("change_case:english_lowercase", {},
     "c'est une phrase écrite en français sur le temps qu'il fait aujourd'hui.", False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about cats."},
     "write a poem about cats. Whiskers in the sun...", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about cats."},
     "Here is a poem about cats.", False),
    ("combination:two_responses", {}, "Answer one.\n******\nAnswer two.", True),
    ("combination:two_responses", {}, "Same answer.\n******\nSame answer.", False),
    ("combination:two_responses", {}, "Only one answer.", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], see you at [place].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], see you.", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\nP.S. See you soon.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello. See you soon.", False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.P.S. Bring snacks.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.S. Bring snacks.", False),
    ("detectable_format:constrained_response", {}, "My answer is yes.", True),
    ("detectable_format:constrained_response", {}, "Yes, definitely.", False),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', True),
    ("detectable_format:json_format", {}, "a: 1", False),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nIntro.\nSECTION 2\nBody.", True),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nIntro only.", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* apples\n* pears", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* apples\n* pears\n- plums", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*first* and **second**", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*only one* and **", False),
    ("detectable_format:title", {}, "<<A Song of Joy>>\nLa la la.", True),
    ("detectable_format:title", {}, "A Song of Joy\nLa la la.", False),
    ("detectable_format:title", {}, "<<   >>\nLa la la.", False),
    ("keywords:existence", {"keywords": ["apple", "pear"]}, "An apple and a pear.", True),
    ("keywords:existence", {"keywords": ["apple", "pear"]}, "An apple only.", False),
    ("keywords:forbidden_words", {"forbidden_words": ["rock"]}, "Rockets and jazz.", True),
    ("keywords:forbidden_words", {"forbidden_words": ["rock"]}, "I love ROCK music.", False),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"},
     "A cat and another Cat.", True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "One cat.", False),
    ("keywords:letter_frequency", {"letter": "q", "let_frequency": 2, "let_relation": "less than"},
     "quiet", True),
    ("keywords:letter_frequency", {"letter": "q", "let_frequency": 2, "let_relation": "less than"},
     "Quick quiz", False),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": "at least"},
     "#one #two", True),
    ("language:response_language", {"language": "de"}, GERMAN, True),
    ("language:response_language", {"language": "de"}, ENGLISH, False),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First part.\n\nThen, the second part.", True),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First part.\n\nAfter that, the end.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One.\n***\nTwo.", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One.\n***\n***\nTwo.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One. Two.", False),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "One. Two.", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "One. Two. Three.", False),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "one two three", True),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "one two", False),
    ("punctuation:no_comma", {}, "No commas here.", True),
    ("punctuation:no_comma", {}, "Yes, one comma.", False),
    ("startend:end_checker", {"end_phrase": "Any questions?"}, "That is all. Any questions?", True),
    ("startend:end_checker", {"end_phrase": "Any questions?"}, "Any questions? That is all.", False),
    ("startend:quotation", {}, '"Wrapped in quotes."', True),
    ("startend:quotation", {}, "Not wrapped.", False),
]


@pytest.mark.parametrize("instruction_id, kwargs, response, expected", CASES)
def test_hand_made_case(instruction_id: str, kwargs: dict, response: str, expected: bool) -> None:
    assert check_instruction(instruction_id, kwargs, "", response) is expected


def test_hand_made_cases_cover_every_instruction_both_ways() -> None:
    passing = {case[0] for case in CASES if case[3]}
    failing = {case[0] for case in CASES if not case[3]}
    assert passing == failing == set(SUPPORTED_INSTRUCTIONS)


# --- loose mode ------------------------------------------------------------------------------


@pytest.mark.parametrize("instruction_id, kwargs, response", [
    ("startend:quotation", {}, 'Sure, here you go:\n"Quoted."'),  # chatty first line
    ("startend:end_checker", {"end_phrase": "Bye now."}, "Text.\nBye now.\nLet me know!"),  # sign-off
    ("punctuation:no_comma", {}, "Sure, here it is:\nNo commas in the answer"),
    ("startend:quotation", {}, '**"Quoted in bold."**'),  # markdown stars
])
def test_loose_forgives_first_line_last_line_and_stars(instruction_id: str, kwargs: dict, response: str) -> None:
    assert check_instruction(instruction_id, kwargs, "", response) is False
    assert check_instruction(instruction_id, kwargs, "", response, loose=True) is True


def test_loose_variants_are_the_eight_of_the_paper() -> None:
    variants = loose_variants("*a*\nb\n*c*")
    assert variants == ["*a*\nb\n*c*", "b\n*c*", "*a*\nb", "b", "a\nb\nc", "b\nc", "a\nb", "b"]


def test_empty_response_follows_nothing() -> None:
    for mode in (False, True):
        assert check_instruction("punctuation:no_comma", {}, "", "  \n ", loose=mode) is False


# --- tokenizers --------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("", 0),
    ("Mr. Smith arrived. He sat down.", 2),
    ("Is it? Yes! Fine.", 3),
    ("line one\nline two\nline three", 1),  # a newline alone never ends a sentence
    ("1. Apples are red.\n2. Pears are green.", 4),  # Punkt splits a list number off its item
    ("J. K. Rowling wrote it. The end.", 2),
    ("Plan B. The rest failed.", 2),
    ('He said "Stop." Then he left.', 2),
])
def test_count_sentences(text: str, expected: int) -> None:
    assert count_sentences(text) == expected


def test_sentence_count_is_linear_on_text_without_spaces() -> None:
    # A degenerate completion must not stall the reward (a greedy regex would be quadratic here).
    start = time.perf_counter()
    assert count_sentences("a." * 50_000 + "x" * 100_000) == 1
    assert time.perf_counter() - start < 2.0


def test_word_and_capital_counts() -> None:
    assert count_words("It's a dog-friendly place.") == 6  # It s a dog friendly place
    # Contractions split off as in nltk.word_tokenize: NASA 's ... I 'M HERE
    assert count_capital_words("NASA's rover and I'M HERE") == 4


# --- linear rewrites of the reference's quadratic regexes give the same verdicts ------------------
# The reference patterns, written out as the specification.
_SMALL_TEXT = st.text(alphabet="*-[]<>\n \tapPsS.", max_size=40)


@settings(max_examples=300, deadline=None)
@given(_SMALL_TEXT)
def test_linear_rewrites_match_the_reference_patterns(text: str) -> None:
    assert _count_placeholders(text) == len(re.findall(r"\[.*?\]", text))
    spans = re.findall(r"<<[^\n]+>>", text)
    assert title(text) == any(span.lstrip("<").rstrip(">").strip() for span in spans)
    bullets = len(re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE))
    bullets += len(re.findall(r"^\s*-.*$", text, flags=re.MULTILINE))
    assert number_bullet_lists(text, num_bullets=bullets)
    found = re.findall(r"\s*p\.\s?s\..*$", text.lower(), flags=re.MULTILINE)
    assert postscript(text, postscript_marker="P.S.") == bool(found)


def test_degenerate_completions_are_checked_quickly() -> None:
    texts = ["\n" * 30_000, "[" * 30_000, "<<" * 30_000, "[" * 30_000 + "x", "* \n" * 30_000]
    start = time.perf_counter()
    for text in texts:
        for instruction_id in ("detectable_content:number_placeholders", "detectable_format:title",
                               "detectable_format:number_bullet_lists", "detectable_format:json_format"):
            kwargs = {"detectable_content:number_placeholders": {"num_placeholders": 1},
                      "detectable_format:number_bullet_lists": {"num_bullets": 1}}.get(instruction_id, {})
            check_instruction(instruction_id, kwargs, "", text)
    assert time.perf_counter() - start < 3.0


# --- the verifier ------------------------------------------------------------------------------

ROW = {
    "prompt": "Answer without commas, in at least 3 words.",
    "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
    "kwargs": [{}, {"relation": "at least", "num_words": 3}],
}


def test_verify_ifeval_scores_the_share_followed() -> None:
    result = verify_ifeval("Yes, indeed.", ROW)  # has a comma, only 2 words
    assert result.score == 0.0 and result.components == {"all_followed": 0.0, "share_followed": 0.0}
    result = verify_ifeval("Yes indeed.", ROW)  # no comma, 2 words
    assert result.score == 0.5 and result.components["all_followed"] == 0.0
    assert result.meta["followed"] == [True, False]
    result = verify_ifeval("Yes indeed friend.", ROW)
    assert result.score == 1.0 and result.components["all_followed"] == 1.0


def test_verify_ifeval_reports_both_modes() -> None:
    completion = "Sure, here it is:\nNo commas in this answer"
    strict, loose = verify_ifeval(completion, ROW), verify_ifeval(completion, ROW, loose=True)
    assert strict.score == 0.5 and loose.score == 1.0
    assert strict.meta["followed_loose"] == loose.meta["followed"] == [True, True]
    assert loose.meta["followed_strict"] == strict.meta["followed"] == [False, True]


def test_unknown_instruction_names_it_and_lists_the_supported() -> None:
    row = {"prompt": "", "instruction_id_list": ["punctuation:no_semicolon"], "kwargs": [{}]}
    with pytest.raises(UserError) as err:
        verify_ifeval("text", row)
    assert "punctuation:no_semicolon" in str(err.value) and "punctuation:no_comma" in str(err.value)


def test_bad_kwargs_are_user_errors() -> None:
    with pytest.raises(UserError, match="num_words"):
        check_instruction("length_constraints:number_words", {"relation": "at least"}, "", "text")
    with pytest.raises(UserError, match="relation"):
        check_instruction("length_constraints:number_words", {"relation": "about", "num_words": 2}, "", "a")
    with pytest.raises(UserError, match="one per instruction"):
        verify_ifeval("text", {**ROW, "kwargs": [{}]})


def test_keyword_that_is_not_a_regex_is_matched_literally() -> None:
    assert check_instruction("keywords:existence", {"keywords": ["C++"]}, "", "I like C++.") is True
    kwargs = {"keyword": "C++", "frequency": 2, "relation": "at least"}
    assert check_instruction("keywords:frequency", kwargs, "", "C++ and C++") is True


def test_none_kwargs_are_ignored_as_in_hugging_face_rows() -> None:
    kwargs = {"relation": "at least", "num_words": 2, "keyword": None, "num_sentences": None}
    assert check_instruction("length_constraints:number_words", kwargs, "", "two words") is True


def test_register_adds_strict_and_loose() -> None:
    registry: Registry = Registry("verifier")
    register(registry)
    assert registry.names() == ["ifeval", "ifeval_loose"]
    completion = "Sure, here it is:\nNo commas in this answer"
    assert registry.get("ifeval")(completion, ROW).score == 0.5
    assert registry.get("ifeval_loose")(completion, ROW).score == 1.0


def test_language_checks_are_deterministic_and_leave_the_global_rng_alone() -> None:
    state = random.getstate()
    verdicts = {check_instruction("language:response_language", {"language": "de"}, "", GERMAN)
                for _ in range(5)}
    assert verdicts == {True} and random.getstate() == state


def test_missing_langdetect_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "langdetect.lang_detect_exception", None)  # import fails
    with pytest.raises(UserError, match="pip install langdetect"):
        check_instruction("language:response_language", {"language": "de"}, "", GERMAN)


# --- real data: every instruction supported, agreement with the reference checker ---------------


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_every_instruction_in_the_data_is_supported(shared_data: Path) -> None:
    rows = _jsonl(shared_data / "ifeval" / "input_data.jsonl")
    ids = {instruction_id for row in rows for instruction_id in row["instruction_id_list"]}
    assert len(ids) >= 25 and ids <= set(SUPPORTED_INSTRUCTIONS)
    for row in rows:  # and every row's kwargs bind
        verify_ifeval("x", row)


@pytest.fixture(scope="module")
def reference_rows(shared_data: Path) -> list[tuple[dict, dict, dict]]:
    """(input row, strict result, loose result), joined on the prompt.

    The reference results have 540 rows, input_data 541: key 2785 is missing from them because
    the third-party copy they were made from had an older prompt text (see their SOURCE.txt).
    """
    inputs = {row["prompt"]: row for row in _jsonl(shared_data / "ifeval" / "input_data.jsonl")}
    folder = shared_data / "graders" / "ifeval_gpt4_reference_results"
    strict = _jsonl(folder / "eval_results_strict.jsonl")
    loose = {row["prompt"]: row for row in _jsonl(folder / "eval_results_loose.jsonl")}
    responses = _jsonl(shared_data / "ifeval" / "input_response_data_gpt4_20231107_145030.jsonl")
    released = {row["prompt"]: row["response"] for row in responses}
    assert len(strict) == len(loose) == 540
    assert {row["key"] for prompt, row in inputs.items() if prompt not in loose} == {2785}
    joined = []
    for result in strict:
        row = inputs[result["prompt"]]
        assert result["instruction_id_list"] == row["instruction_id_list"]
        assert result["response"] == released[result["prompt"]]
        joined.append((row, result, loose[result["prompt"]]))
    return joined


@pytest.mark.parametrize("mode", ["strict", "loose"])
def test_agreement_with_reference_checker(reference_rows: list, mode: str) -> None:
    total, disagreements = 0, []
    for row, strict, loose in reference_rows:
        reference = (strict if mode == "strict" else loose)["follow_instruction_list"]
        ours = verify_ifeval(strict["response"], row, loose=mode == "loose").meta["followed"]
        total += len(ours)
        disagreements += [(row["key"], instruction_id, theirs)
                          for instruction_id, mine, theirs in zip(row["instruction_id_list"], ours, reference)
                          if mine != theirs]
    assert total == 832
    # Known: keys 1122 and 1129 (strict) ask for "#" and "!" counts, which the reference replaces
    # by a random letter; we count the character asked for.
    assert 1 - len(disagreements) / total >= 0.99, disagreements
