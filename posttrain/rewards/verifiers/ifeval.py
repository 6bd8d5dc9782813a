"""IFEval: verifiable instruction following (Zhou et al. 2023, arXiv:2311.07911).

Each prompt carries instructions such as ``punctuation:no_comma`` or
``length_constraints:number_words`` with their arguments; each instruction is checked by a rule
(``ifeval_checkers.py``). Two modes, as in the paper (section 3):

- strict: the response as given must pass;
- loose: the response passes if any of 8 variants passes: the response, with its first line
  removed, its last line removed, both removed, and each of these four with every ``*`` deleted.
  This forgives a chatty first line ("Sure, here it is:"), a sign-off, or markdown bold.

The reward is the share of a row's instructions followed (the paper's instruction-level
accuracy for one prompt); ``components["all_followed"]`` is its prompt-level accuracy.

Row format (IFEval's ``input_data.jsonl``, or the Hugging Face ``google/IFEval`` rows):
``{"prompt": str, "instruction_id_list": [str, ...], "kwargs": [dict, ...]}``, one kwargs dict per
instruction. Keys whose value is None are ignored (HF rows list every key of every instruction).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from posttrain.errors import UserError, problem
from posttrain.rewards.verifiers.ifeval_checkers import CHECKERS
from posttrain.types import RewardResult

SUPPORTED_INSTRUCTIONS: tuple[str, ...] = tuple(sorted(CHECKERS))


def check_instruction(
    instruction_id: str, kwargs: Mapping[str, Any], prompt: str, response: str, *, loose: bool = False
) -> bool:
    """Whether ``response`` follows one instruction; ``kwargs`` are the instruction's arguments.

    ``prompt`` is accepted for parity with the reference harness; no supported instruction reads
    it (``combination:repeat_prompt`` takes the text to repeat as ``prompt_to_repeat``).
    Raises UserError for an unknown instruction id or missing/unexpected arguments.
    """
    del prompt  # see docstring
    check = _bind(instruction_id, kwargs)
    candidates = loose_variants(response) if loose else [response]
    return any(_passes(check, candidate) for candidate in candidates)


def loose_variants(response: str) -> list[str]:
    """The 8 texts tried in loose mode, the response itself first."""
    lines = response.split("\n")
    trimmed = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return trimmed + [text.replace("*", "") for text in trimmed]


def verify_ifeval(completion: str, row: Mapping[str, Any], *, loose: bool = False) -> RewardResult:
    """Score = share of the row's instructions followed (strict, or loose with ``loose=True``).

    components: ``all_followed`` (1.0 if every instruction is followed, else 0.0) and
    ``share_followed`` (= score). meta: ``mode``, ``instruction_ids``, ``followed`` (the verdicts of
    the chosen mode) and both ``followed_strict`` and ``followed_loose`` (loose costs little more).
    """
    instructions = _instructions(row)
    prompt = str(row.get("prompt", ""))
    strict_verdicts, loose_verdicts = [], []
    for instruction_id, kwargs in instructions:
        strict = check_instruction(instruction_id, kwargs, prompt, completion)
        # Loose tries the response itself first, so a strict pass is a loose pass.
        strict_verdicts.append(strict)
        loose_verdicts.append(strict or check_instruction(instruction_id, kwargs, prompt, completion, loose=True))
    verdicts = loose_verdicts if loose else strict_verdicts
    share = sum(verdicts) / len(verdicts)
    return RewardResult(
        score=share,
        components={"all_followed": float(all(verdicts)), "share_followed": share},
        meta={
            "mode": "loose" if loose else "strict",
            "instruction_ids": [instruction_id for instruction_id, _ in instructions],
            "followed": verdicts,
            "followed_strict": strict_verdicts,
            "followed_loose": loose_verdicts,
        },
    )


def verify_ifeval_strict(completion: str, row: Mapping[str, Any]) -> RewardResult:
    """The ``ifeval`` verifier: strict mode."""
    return verify_ifeval(completion, row, loose=False)


def verify_ifeval_loose(completion: str, row: Mapping[str, Any]) -> RewardResult:
    """The ``ifeval_loose`` verifier: loose mode."""
    return verify_ifeval(completion, row, loose=True)


def register(registry: Any) -> None:
    """Add ``ifeval`` (strict) and ``ifeval_loose`` to a verifier ``posttrain.registry.Registry``."""
    registry.add("ifeval", verify_ifeval_strict)
    registry.add("ifeval_loose", verify_ifeval_loose)


def _passes(check: Callable[[str], bool], response: str) -> bool:
    # The reference never credits an empty (or whitespace-only) response with anything.
    return bool(response.strip()) and check(response)


def _instructions(row: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    ids = row.get("instruction_id_list")
    if not isinstance(ids, list) or not ids:
        raise UserError(
            problem("ifeval row", "'instruction_id_list' must be a non-empty list of instruction ids",
                    "use IFEval's row format: prompt, instruction_id_list, kwargs", value=ids)
        )
    all_kwargs = row.get("kwargs")
    if all_kwargs is None:
        all_kwargs = [{} for _ in ids]
    if not isinstance(all_kwargs, list) or len(all_kwargs) != len(ids):
        raise UserError(
            problem("ifeval row", f"'kwargs' must be a list of {len(ids)} dicts, one per instruction",
                    "give one kwargs dict per entry of instruction_id_list", value=all_kwargs)
        )
    return [(str(instruction_id), kwargs or {}) for instruction_id, kwargs in zip(ids, all_kwargs)]


def _bind(instruction_id: str, kwargs: Mapping[str, Any]) -> Callable[[str], bool]:
    """The instruction's checker with its arguments bound, after validating them."""
    checker = CHECKERS.get(instruction_id)
    if checker is None:
        raise UserError(
            problem("ifeval instruction_id_list", f"unknown IFEval instruction id {instruction_id!r}",
                    "supported ids: " + ", ".join(SUPPORTED_INSTRUCTIONS))
        )
    expected = _PARAMETERS[instruction_id]
    given = {name: value for name, value in kwargs.items() if value is not None}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise UserError(
            problem(f"ifeval kwargs of {instruction_id}",
                    f"missing arguments {missing}, unexpected arguments {unexpected}",
                    f"{instruction_id} takes exactly {sorted(expected) or 'no arguments'}")
        )
    bound = {name: _coerce(instruction_id, name, given[name], kind) for name, kind in expected.items()}
    return lambda response: checker(response, **bound)


def _keyword_parameters(checker: Callable[..., bool]) -> dict[str, str]:
    """Keyword-only parameter name -> annotation string (``int``, ``str``, ``list[str]``)."""
    signature = inspect.signature(checker)
    return {
        name: str(parameter.annotation)
        for name, parameter in signature.parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }


_PARAMETERS = {instruction_id: _keyword_parameters(check) for instruction_id, check in CHECKERS.items()}


def _coerce(instruction_id: str, name: str, value: Any, kind: str) -> Any:
    # Rows read from CSV or YAML may carry numbers as strings; anything else is the user's to fix.
    try:
        if kind == "int" and not isinstance(value, bool):
            return int(value)
        if kind == "str" and isinstance(value, str):
            return value
        if kind == "list[str]" and isinstance(value, list | tuple):
            return [str(item) for item in value]
    except (TypeError, ValueError):
        pass
    raise UserError(
        problem(f"ifeval kwargs of {instruction_id}", f"argument {name!r} must be {kind}", value=value)
    )
