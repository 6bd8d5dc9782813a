"""One function per IFEval instruction: ``(response, **kwargs) -> bool``.

Semantics follow the reference checker of Zhou et al. 2023, "Instruction-Following Evaluation for
Large Language Models" (google-research ``instruction_following_eval/instructions.py``), verdict
for verdict, including its quirks (keywords are regular expressions matched anywhere, a "section"
is the splitter followed by a number, ...). Where we deviate it is said at the function.

Keyword arguments are named as in IFEval's ``kwargs`` so a data row can be passed straight in.
``CHECKERS`` maps each instruction id to its function; ``ifeval.py`` validates the kwargs.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable

from posttrain.errors import UserError, problem
from posttrain.rewards.verifiers.ifeval_text import (
    count_capital_words,
    count_sentences,
    count_words,
    detect_language,
)

RELATIONS = ("less than", "at least")


def as_regex(text: str) -> str:
    """IFEval keywords are regular expressions; one that does not compile ("C++") is taken literally.

    The reference would crash on it instead.
    """
    try:
        re.compile(text)
    except re.error:
        return re.escape(text)
    return text


def compare(count: int, relation: str, threshold: int) -> bool:
    """IFEval's two relations: "less than" is ``<``, "at least" is ``>=``."""
    if relation == "less than":
        return count < threshold
    if relation == "at least":
        return count >= threshold
    raise UserError(
        problem("ifeval kwargs", f"unknown relation {relation!r}", f"use one of {list(RELATIONS)}")
    )


# --- change_case -----------------------------------------------------------------------------


def capital_word_frequency(response: str, *, capital_frequency: int, capital_relation: str) -> bool:
    return compare(count_capital_words(response), capital_relation, capital_frequency)


def english_capital(response: str) -> bool:
    # The reference passes the response when langdetect finds nothing to judge.
    return response.isupper() and detect_language(response) in ("en", None)


def english_lowercase(response: str) -> bool:
    return response.islower() and detect_language(response) in ("en", None)


# --- combination -----------------------------------------------------------------------------


def repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


def two_responses(response: str) -> bool:
    """Exactly two non-empty, different parts separated by ``******``.

    An empty part is allowed only at the very start or end (a leading or trailing separator).
    """
    parts = response.split("******")
    kept = []
    for index, part in enumerate(parts):
        if part.strip():
            kept.append(part.strip())
        elif 0 < index < len(parts) - 1:
            return False
    return len(kept) == 2 and kept[0] != kept[1]


# --- detectable_content ----------------------------------------------------------------------


def number_placeholders(response: str, *, num_placeholders: int) -> bool:
    return _count_placeholders(response) >= num_placeholders


def _count_placeholders(text: str) -> int:
    """Matches of the reference's ``\\[.*?\\]``: a "[" to the next "]" on the same line.

    Scanned by hand because that regex retries every unclosed "[" to the end of its line, which
    is quadratic on a degenerate completion ("[[[[...").
    """
    count = 0
    for line in text.split("\n"):
        opening = line.find("[")
        while opening != -1:
            closing = line.find("]", opening + 1)
            if closing == -1:
                break
            count += 1
            opening = line.find("[", closing + 1)
    return count


def postscript(response: str, *, postscript_marker: str) -> bool:
    """The marker anywhere (case-insensitive); "P.S." and "P.P.S" allow a space after dots.

    The reference looks for ``\\s*MARKER.*$`` line by line; that matches exactly where MARKER
    does, and searching for MARKER alone avoids the pattern's quadratic time on long blank runs.
    """
    if postscript_marker == "P.P.S":
        pattern = r"p\.\s?p\.\s?s"
    elif postscript_marker == "P.S.":
        pattern = r"p\.\s?s\."
    else:
        # The reference inserts other markers into the pattern unescaped; so do we.
        pattern = as_regex(postscript_marker.lower())
    return re.search(pattern, response.lower()) is not None


# --- detectable_format -----------------------------------------------------------------------

CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def constrained_response(response: str) -> bool:
    return any(option in response.strip() for option in CONSTRAINED_OPTIONS)


def json_format(response: str) -> bool:
    """The whole response parses as JSON, once a surrounding markdown code fence is removed."""
    text = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nesting too deep for the parser
        return False
    return True


def multiple_sections(response: str, *, section_spliter: str, num_sections: int) -> bool:
    """At least ``num_sections`` occurrences of the splitter followed by a number ("SECTION 2")."""
    # The parameter keeps IFEval's spelling ("spliter") so data rows pass straight in.
    sections = re.split(r"\s?" + as_regex(section_spliter) + r"\s?\d+\s?", response)
    return len(sections) - 1 >= num_sections


# A run of blank lines, from its first newline to its last.
_BLANK_LINES = re.compile(r"\n\s*\n")


def number_bullet_lists(response: str, *, num_bullets: int) -> bool:
    """Exactly ``num_bullets`` lines starting with ``*`` (not ``**``) or ``-``."""
    # The reference's patterns start with ``^\s*``, which rescans a run of n blank lines from each
    # of its n line starts (quadratic). Every one of those starts sees the same first character
    # after the run, so shrinking the run to one blank line keeps the count and makes it linear.
    text = _BLANK_LINES.sub("\n\n", response)
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def number_highlighted_sections(response: str, *, num_highlights: int) -> bool:
    """At least ``num_highlights`` non-empty ``*...*`` or ``**...**`` spans on one line.

    Each counts once: inside ``**bold**`` the single-star pattern only finds the empty ``**``.
    """
    single = re.findall(r"\*[^\n\*]*\*", response)
    double = re.findall(r"\*\*[^\n\*]*\*\*", response)
    count = sum(1 for span in single if span.strip("*").strip())
    count += sum(1 for span in double if span.removeprefix("**").removesuffix("**").strip())
    return count >= num_highlights


def title(response: str) -> bool:
    """A non-empty title in double angular brackets on one line: ``<<poem of joy>>``."""
    return any(_title_on_line(line) for line in response.split("\n"))


def _title_on_line(line: str) -> bool:
    # The reference's ``<<[^\n]+>>`` spans from a line's first "<<" to its last ">>" (at most one
    # match per line); found with find/rfind, as that regex is quadratic on "<<<<<<...".
    opening, closing = line.find("<<"), line.rfind(">>")
    if opening == -1 or closing < opening + 3:
        return False
    return bool(line[opening : closing + 2].lstrip("<").rstrip(">").strip())


# --- keywords --------------------------------------------------------------------------------


def keyword_existence(response: str, *, keywords: list[str]) -> bool:
    # Keywords are regular expressions matched anywhere, case-insensitively ("le" matches "people").
    return all(re.search(as_regex(keyword), response, flags=re.IGNORECASE) for keyword in keywords)


def forbidden_words(response: str, *, forbidden_words: list[str]) -> bool:
    return not any(
        re.search(r"\b" + as_regex(word) + r"\b", response, flags=re.IGNORECASE) for word in forbidden_words
    )


def keyword_frequency(response: str, *, keyword: str, frequency: int, relation: str) -> bool:
    return compare(len(re.findall(as_regex(keyword), response, flags=re.IGNORECASE)), relation, frequency)


def letter_frequency(response: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    """Occurrences of one character, case-insensitive.

    Deviation: the reference replaces a ``letter`` that is not an ASCII letter ("#", "!") by a
    random letter; we count the character given, which is what the prompt asks for.
    """
    count = collections.Counter(response.lower())[letter.strip().lower()]
    return compare(count, let_relation, let_frequency)


# --- language --------------------------------------------------------------------------------


def response_language(response: str, *, language: str) -> bool:
    # The reference passes the response when langdetect finds nothing to judge.
    return detect_language(response) in (language, None)


# --- length_constraints ----------------------------------------------------------------------


def nth_paragraph_first_word(
    response: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str
) -> bool:
    """``num_paragraphs`` paragraphs split by a blank line; the nth starts with ``first_word``.

    Empty paragraphs are not counted, but the nth is still picked from the raw split, as the
    reference does. The first word is compared lowercased, up to its first punctuation mark.
    """
    paragraphs = re.split(r"\n\n", response)
    count = sum(1 for paragraph in paragraphs if paragraph.strip())
    if nth_paragraph > count:
        return False
    paragraph = paragraphs[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    return count == num_paragraphs and _first_word(paragraph) == first_word.lower()


def _first_word(paragraph: str) -> str:
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    return re.split(r"[.,?!'\"]", word, maxsplit=1)[0].lower()


def number_paragraphs(response: str, *, num_paragraphs: int) -> bool:
    """Exactly ``num_paragraphs`` paragraphs separated by the markdown divider ``***``.

    An empty paragraph is tolerated only at the start or end; in the middle it fails.
    """
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    count = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if paragraph.strip():
            continue
        if 0 < index < len(paragraphs) - 1:
            return False
        count -= 1
    return count == num_paragraphs


def number_sentences(response: str, *, num_sentences: int, relation: str) -> bool:
    return compare(count_sentences(response), relation, num_sentences)


def number_words(response: str, *, num_words: int, relation: str) -> bool:
    return compare(count_words(response), relation, num_words)


# --- punctuation and start/end ---------------------------------------------------------------


def no_comma(response: str) -> bool:
    return "," not in response


def end_checker(response: str, *, end_phrase: str) -> bool:
    """The response ends with the phrase (case-insensitive), ignoring surrounding double quotes."""
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def quotation(response: str) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


CHECKERS: dict[str, Callable[..., bool]] = {
    "change_case:capital_word_frequency": capital_word_frequency,
    "change_case:english_capital": english_capital,
    "change_case:english_lowercase": english_lowercase,
    "combination:repeat_prompt": repeat_prompt,
    "combination:two_responses": two_responses,
    "detectable_content:number_placeholders": number_placeholders,
    "detectable_content:postscript": postscript,
    "detectable_format:constrained_response": constrained_response,
    "detectable_format:json_format": json_format,
    "detectable_format:multiple_sections": multiple_sections,
    "detectable_format:number_bullet_lists": number_bullet_lists,
    "detectable_format:number_highlighted_sections": number_highlighted_sections,
    "detectable_format:title": title,
    "keywords:existence": keyword_existence,
    "keywords:forbidden_words": forbidden_words,
    "keywords:frequency": keyword_frequency,
    "keywords:letter_frequency": letter_frequency,
    "language:response_language": response_language,
    "length_constraints:nth_paragraph_first_word": nth_paragraph_first_word,
    "length_constraints:number_paragraphs": number_paragraphs,
    "length_constraints:number_sentences": number_sentences,
    "length_constraints:number_words": number_words,
    "punctuation:no_comma": no_comma,
    "startend:end_checker": end_checker,
    "startend:quotation": quotation,
}
