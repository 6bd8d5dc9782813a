"""The embedded tiny world: two-digit addition and subtraction with carries and borrows.

Everything is generated deterministically from a seed; train and test problems are disjoint
(split by a hash of the problem). The world provides:

- ``demo.pretrain``: raw arithmetic text ("47 + 85 = 132" lines), for the base model;
- ``demo.sft``: chat conversations (a question, then the worked equation as the answer);
- ``demo.prompts``: questions with their answers, for sampling, RL and evaluation
  (``split: test`` gives the held-out problems);
- ``builtin:demo``: a byte-level BPE tokenizer trained on the world's text;
- ``check_answer`` / the ``demo`` verifier: the whole worked solution must be exactly right (the
  problem restated, every step, the result). Checking only the final number is exploitable: a
  model that copies the operands wrong can still land on the right number by luck, and training on
  such samples teaches it to copy wrong (see docs/log.md).
"""

from __future__ import annotations

import hashlib
import random
import re
from functools import lru_cache
from typing import Any

from posttrain.data.formats import BUILTIN_DATASETS
from posttrain.errors import UserError
from posttrain.errors import problem as make_problem
from posttrain.models.load import BUILTIN_TOKENIZERS
from posttrain.models.tiny import train_bpe_tokenizer
from posttrain.types import RewardResult

TEST_SHARE = 0.2
LOW, HIGH = 10, 99
QUESTION_TEMPLATES = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}.",
                      "{a} {op} {b} = ?", "Please work out {a} {op} {b}.")
_LAST_INT = re.compile(r"-?\d+")


def _split_of(a: int, op: str, b: int) -> str:
    digest = hashlib.sha256(f"{a}{op}{b}".encode()).digest()
    return "test" if digest[0] / 256 < TEST_SHARE else "train"


@lru_cache(maxsize=4)
def problems(split: str) -> tuple[tuple[int, str, int, int], ...]:
    """Every (a, op, b, answer) of a split; subtraction keeps answers non-negative."""
    out = []
    for a in range(LOW, HIGH + 1):
        for b in range(LOW, HIGH + 1):
            out.append((a, "+", b, a + b))
            if a >= b:
                out.append((a, "-", b, a - b))
    return tuple(p for p in out if _split_of(p[0], p[1], p[2]) == split)


def equation(a: int, op: str, b: int, answer: int) -> str:
    return f"{a} {op} {b} = {answer}"


def worked(a: int, op: str, b: int, answer: int) -> str:
    """The problem, then a column-by-column solution: units step, tens step (with the carry or
    borrow), result.

    "47 + 85" -> "47 + 85: 7 + 5 = 12. 4 + 8 + 1 = 13. 47 + 85 = 132."
    "92 - 47" -> "92 - 47: 12 - 7 = 5. 9 - 4 - 1 = 4. 92 - 47 = 45."
    Every step is a one-digit fact or a copy, which a tiny model learns in minutes.
    """
    a1, a0, b1, b0 = a // 10, a % 10, b // 10, b % 10
    if op == "+":
        units = a0 + b0
        carry = units // 10
        steps = [f"{a0} + {b0} = {units}", f"{a1} + {b1} + {carry} = {a1 + b1 + carry}"]
    else:
        borrow = int(a0 < b0)
        top = a0 + 10 * borrow
        steps = [f"{top} - {b0} = {top - b0}", f"{a1} - {b1} - {borrow} = {a1 - b1 - borrow}"]
    return f"{a} {op} {b}: " + ". ".join([*steps, equation(a, op, b, answer)]) + "."


def question(a: int, op: str, b: int, rng: random.Random) -> str:
    return rng.choice(QUESTION_TEMPLATES).format(a=a, op=op, b=b)


def check_answer(completion: str, answer: str | int, problem: str | None = None) -> bool:
    """With ``problem`` ("47 + 85"): the completion is exactly its worked solution (whitespace
    aside). Without: the last integer equals the answer (for text outside the demo world)."""
    if problem is not None:
        a, op, b = problem.split()
        return " ".join(completion.split()) == worked(int(a), op, int(b), int(answer))
    found = _LAST_INT.findall(completion)
    return bool(found) and int(found[-1]) == int(answer)


def verify_demo(completion: str, row: dict[str, Any]) -> RewardResult:
    """The ``demo`` verifier: 1.0 for an exactly right worked solution of ``row['problem']``."""
    if "problem" not in row or "answer" not in row:
        raise UserError(make_problem("demo verifier", "rows need 'problem' and 'answer'",
                                "use the demo.prompts dataset (or add the fields)"))
    ok = check_answer(completion, row["answer"], row["problem"])
    found = _LAST_INT.findall(completion)
    return RewardResult(float(ok), {"correct": float(ok)},
                        {"final_number_right": bool(found) and int(found[-1]) == int(row["answer"])})


def _sample(split: str, n: int, seed: int) -> list[tuple[int, str, int, int]]:
    pool = problems(split)
    rng = random.Random(seed)
    return [pool[rng.randrange(len(pool))] for _ in range(n)]


def pretrain_rows(split: str, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Documents of worked problems; about half are preceded by a question in plain text (no chat
    markup), so the base model learns to answer questions but not the chat format."""
    docs, per_doc, seed = int(args.get("docs", 3000)), int(args.get("per_doc", 8)), int(args.get("seed", 0))
    flat = _sample(split, docs * per_doc, seed)
    rng = random.Random(seed + 5)
    lines = [(question(a, op, b, rng) + " " if rng.random() < 0.5 else "") + worked(a, op, b, c)
             for a, op, b, c in flat]
    return [{"text": "\n".join(lines[i * per_doc : (i + 1) * per_doc])} for i in range(docs)]


def sft_rows(split: str, args: dict[str, Any]) -> list[dict[str, Any]]:
    n, seed = int(args.get("n", 2000)), int(args.get("seed", 1))
    rng = random.Random(seed + 7)
    rows = []
    for a, op, b, c in _sample(split, n, seed):
        rows.append({"messages": [{"role": "user", "content": question(a, op, b, rng)},
                                  {"role": "assistant", "content": worked(a, op, b, c)}]})
    return rows


def prompt_rows(split: str, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Questions with answers. ``n`` = all of the split when absent (held-out evaluation), in a
    seeded random order, so that the first N rows (an eval's ``limit``) are a random sample."""
    seed = int(args.get("seed", 2))
    rng = random.Random(seed + 11)
    if "n" in args:
        chosen = _sample(split, int(args["n"]), seed)
    else:
        chosen = list(problems(split))
        random.Random(seed).shuffle(chosen)
    return [{"prompt": [{"role": "user", "content": question(a, op, b, rng)}], "answer": str(c),
             "problem": f"{a} {op} {b}"} for a, op, b, c in chosen]


def corrupt(a: int, op: str, b: int, answer: int, rng: random.Random) -> str:
    """The worked solution with a wrong final result (off by 1, 2 or 10)."""
    wrong = answer + rng.choice([-10, -2, -1, 1, 2, 10])
    wrong = wrong if wrong >= 0 else answer + 1
    head, _, _ = worked(a, op, b, answer).rpartition(f"= {answer}.")
    return f"{head}= {wrong}."


def pair_rows(split: str, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Preference pairs: a question, the correct worked solution, and a corrupted one."""
    n, seed = int(args.get("n", 500)), int(args.get("seed", 3))
    rng = random.Random(seed + 13)
    rows = []
    for a, op, b, c in _sample(split, n, seed):
        rows.append({"prompt": [{"role": "user", "content": question(a, op, b, rng)}],
                     "chosen": worked(a, op, b, c), "rejected": corrupt(a, op, b, c, rng)})
    return rows


def kto_rows(split: str, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Unpaired rows: correct worked solutions (desirable) and corrupted ones (undesirable)."""
    rows = []
    for i, pair in enumerate(pair_rows(split, args)):
        good = i % 2 == 0
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"] if good else pair["rejected"],
                     "label": good})
    return rows


STEP_SEPARATOR = ". "  # a worked solution's steps: units (after the restated problem), tens, result


def corrupt_step(a: int, op: str, b: int, answer: int, step: int, rng: random.Random) -> str:
    """The worked solution with step ``step`` wrong (0 units, 1 tens, 2 result) and the error
    carried forward: every later step is right *given* the earlier ones, so the result is wrong
    and the first wrong step is exactly ``step`` (process reward models must find it).

    "47 + 85", step 0 -> "47 + 85: 7 + 5 = 13. 4 + 8 + 1 = 13. 47 + 85 = 133."
    """
    a1, a0, b1, b0 = a // 10, a % 10, b // 10, b % 10
    if op == "+":
        units = a0 + b0 + (rng.choice([-1, 1]) if step == 0 else 0)
        units = units if units >= 0 else 1
        carry = units // 10
        tens = a1 + b1 + carry + (rng.choice([-1, 1]) if step == 1 else 0)
        steps = [f"{a0} + {b0} = {units}", f"{a1} + {b1} + {carry} = {tens}"]
    else:
        borrow = int(a0 < b0)
        top = a0 + 10 * borrow
        units = top - b0
        if step == 0:
            units = units + 1 if units < 9 else units - 1
        tens = a1 - b1 - borrow
        if step == 1:
            tens = tens + 1 if tens == 0 else tens + rng.choice([-1, 1])
        steps = [f"{top} - {b0} = {units}", f"{a1} - {b1} - {borrow} = {tens}"]
    result = tens * 10 + units % 10
    if step == 2:
        result = answer + rng.choice([-10, -2, -1, 1, 2, 10])
        result = result if result >= 0 else answer + 1
    return f"{a} {op} {b}: " + STEP_SEPARATOR.join([*steps, equation(a, op, b, result)]) + "."


def prm_rows(split: str, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Worked solutions for process reward models: ``corrupt_share`` of them (default half) have
    one wrong step, uniformly units / tens / result, carried forward. Fields: prompt, completion,
    answer, problem, and ``first_wrong_step`` (0-based index of the step split at ". "; None when
    the solution is right). ``paired: true``: each problem twice in a row, right then with one
    wrong step (``n`` rows, n / 2 problems), so a batch holds both of a problem's solutions."""
    n, seed = int(args.get("n", 500)), int(args.get("seed", 4))
    share = float(args.get("corrupt_share", 0.5))
    paired = bool(args.get("paired", False))
    rng = random.Random(seed + 17)
    rows = []
    for a, op, b, c in _sample(split, n // 2 if paired else n, seed):
        kinds = [None, rng.randrange(3)] if paired else [rng.randrange(3) if rng.random() < share else None]
        completions = [worked(a, op, b, c) if wrong is None else corrupt_step(a, op, b, c, wrong, rng)
                       for wrong in kinds]
        prompt = [{"role": "user", "content": question(a, op, b, rng)}]
        rows += [{"prompt": prompt, "completion": completion, "answer": str(c), "problem": f"{a} {op} {b}",
                  "first_wrong_step": wrong} for wrong, completion in zip(kinds, completions)]
    return rows


def corpus() -> list[str]:
    """Text the builtin tokenizer is trained on: equations and every question template."""
    rng = random.Random(0)
    sample = _sample("train", 4000, 3)
    roles = ["<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_start|>system\n"] * 200
    return [worked(*p) for p in sample] + [question(a, op, b, rng) for a, op, b, _ in sample] + roles


@lru_cache(maxsize=1)
def _tokenizer_files() -> dict[str, Any]:
    return {"tokenizer": train_bpe_tokenizer(corpus(), vocab_size=320)}


def demo_tokenizer():
    """The builtin tokenizer (trained once per process, deterministic)."""
    import copy

    return copy.deepcopy(_tokenizer_files()["tokenizer"])


BUILTIN_DATASETS.add("demo.pretrain", pretrain_rows)
BUILTIN_DATASETS.add("demo.sft", sft_rows)
BUILTIN_DATASETS.add("demo.prompts", prompt_rows)
BUILTIN_DATASETS.add("demo.pairs", pair_rows)
BUILTIN_DATASETS.add("demo.kto", kto_rows)
BUILTIN_DATASETS.add("demo.prm", prm_rows)
BUILTIN_TOKENIZERS["demo"] = demo_tokenizer


def register(registry) -> None:
    """Verifier plugin hook (listed in ``posttrain.rewards.verifiers.PLUGIN_MODULES``)."""
    registry.add("demo", verify_demo)
