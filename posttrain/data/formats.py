"""Reading datasets into typed examples.

Sources: local JSONL / JSON / parquet / CSV / TXT, Hugging Face datasets by name, and builtin
generated sets. Row formats: plain text; prompt/completion; conversational ``messages``;
preference (prompt, chosen, rejected); unpaired binary (prompt, completion, label); prompt-only
with ground truth (prompt, answer, other fields kept for rewards). Every error names
``file:line`` and the field, and says how to fix it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.config.components import DataConfig
from posttrain.data.hh_rlhf import is_dialogue, to_messages
from posttrain.errors import UserError, problem
from posttrain.registry import Registry
from posttrain.types import (
    ChatExample,
    Example,
    KTOExample,
    Message,
    PreferencePair,
    PromptCompletionExample,
    PromptExample,
    RankedExample,
    RowSource,
    TextExample,
)

ROLES = ("system", "user", "assistant", "tool")
MAX_PROBLEMS_SHOWN = 20

# name -> fn(split, args) -> list of row dicts. Builtin sets generate deterministically.
BUILTIN_DATASETS: Registry[Callable[[str, dict[str, Any]], list[dict[str, Any]]]] = Registry("builtin dataset")
_BUILTIN_PROVIDERS = ("posttrain.demo.world",)


@dataclass
class LoadReport:
    """What happened while loading: counts users see in the run summary."""

    source: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


@dataclass
class Dataset:
    examples: list[Example]
    format: str
    report: LoadReport
    fingerprint: str  # content hash of the source (file bytes, or builtin name + args)


DATASET_FILE = "data.jsonl"  # what a data stage writes into its artifact folder


def load_dataset(cfg: DataConfig, *, where: str, base_dir: Path | None = None, expect: tuple[str, ...] = (),
                 artifacts: Mapping[str, Path] | None = None) -> Dataset:
    """Read ``cfg`` into typed examples; ``expect`` lists the formats the stage accepts.
    ``artifacts`` maps stage names to their artifact folders (for ``stage:`` sources)."""
    rows, label, fingerprint = _read_source(cfg, where, base_dir, artifacts or {})
    report = LoadReport(source=label, rows_read=len(rows))
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    if not rows:
        raise UserError(problem(label, "the dataset is empty", "point at a file with at least one row"))
    first = _rename(rows[0][0], cfg.fields)
    fmt = cfg.format if cfg.format != "auto" else detect_format(first, rows[0][1], where)
    if expect and fmt not in expect:
        raise UserError(problem(f"{where}.format", f"{label} holds {fmt!r} rows, this stage needs "
                                f"{' or '.join(expect)}", "use a dataset in the right format, or set "
                                "data.fields to rename columns"))
    examples, problems, formats = [], [], set()
    for row, source in rows:
        try:
            row = _rename(row, cfg.fields)
            row_fmt = _row_format(row, source, fmt, cfg, expect, where)
            examples.append(to_example(row, row_fmt, source))
            formats.add(row_fmt)
        except UserError as err:
            if cfg.on_bad_row == "drop":
                report.drop(err.problems[0].message.split(":")[0])
            else:
                problems.extend(err.problems)
                if len(problems) >= MAX_PROBLEMS_SHOWN:
                    break
    if problems:
        raise UserError(problems, title=f"{label}: bad rows (set data.on_bad_row: drop to skip them)")
    if not examples:
        raise UserError(problem(label, "every row was dropped as malformed", "fix the data"))
    report.rows_kept = len(examples)
    return Dataset(examples, fmt if len(formats) <= 1 else "mixed", report, fingerprint)


def _row_format(row: dict[str, Any], source: RowSource, first: str, cfg: DataConfig, expect: tuple[str, ...],
                where: str) -> str:
    """Rows are read in the first row's format, except that with ``format: auto`` a row in
    another format the stage also accepts (messages among prompt/completion rows, say) is read in
    its own. A row that looks like nothing the stage accepts is read in the first row's format,
    so its error says which field is missing."""
    if cfg.format != "auto" or len(expect) < 2:
        return first
    try:
        detected = detect_format(row, source, where)
    except UserError:
        return first
    return detected if detected in expect else first


def read_rows(cfg: DataConfig, *, where: str, base_dir: Path | None = None,
              artifacts: Mapping[str, Path] | None = None) -> tuple[list[tuple[dict[str, Any], RowSource]], str]:
    """Raw rows (renamed, limited) with their sources, for stages that keep every field."""
    rows, label, fingerprint = _read_source(cfg, where, base_dir, artifacts or {})
    rows = [(_rename(r, cfg.fields), src) for r, src in rows[: cfg.limit]]
    if not rows:
        raise UserError(problem(label, "the dataset is empty", "point at a file with at least one row"))
    return rows, fingerprint


def _rename(row: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    if not fields:
        return row
    row = dict(row)
    for ours, theirs in fields.items():
        if theirs in row:
            row[ours] = row.pop(theirs)
    return row


# ---------------------------------------------------------------- sources


def _read_source(cfg: DataConfig, where: str, base_dir: Path | None, artifacts: Mapping[str, Path]
                 ) -> tuple[list[tuple[dict[str, Any], RowSource]], str, str]:
    if cfg.stage:
        folder = artifacts.get(cfg.stage)
        if folder is None or not (folder / DATASET_FILE).exists():
            raise UserError(problem(f"{where}.stage", f"stage {cfg.stage!r} has not produced its data yet",
                                    "run the pipeline from that stage"))
        return read_file(folder / DATASET_FILE, where=f"{where}.stage"), f"stage:{cfg.stage}", folder.name
    if cfg.builtin:
        return _read_builtin(cfg, where)
    if cfg.hf:
        return _read_hf(cfg, where)
    assert cfg.path is not None
    path = Path(cfg.path).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    rows = read_file(path, where=f"{where}.path")
    return rows, str(path), file_fingerprint(path)


def _read_builtin(cfg: DataConfig, where: str):
    name = cfg.builtin or ""
    if name not in BUILTIN_DATASETS:
        for module in _BUILTIN_PROVIDERS:
            __import__(module)
    make = BUILTIN_DATASETS.get(name, where=f"{where}.builtin")
    split = cfg.split or "train"
    rows = make(split, dict(cfg.args))
    label = f"builtin:{name}[{split}]"
    fingerprint = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    return [(r, RowSource(label, i + 1)) for i, r in enumerate(rows)], label, fingerprint


def _read_hf(cfg: DataConfig, where: str):
    import datasets

    split = cfg.split or "train"
    try:
        ds = datasets.load_dataset(cfg.hf, split=split)
    except Exception as err:  # datasets raises many kinds; all mean "could not get it"
        raise UserError(problem(f"{where}.hf", f"cannot load Hugging Face dataset {cfg.hf!r} "
                                f"split {split!r}: {str(err).splitlines()[0] if str(err) else err!r}",
                                "check the name and split, and that you have network or a local cache")) from err
    label = f"hf:{cfg.hf}[{split}]"
    return [(dict(r), RowSource(label, i + 1)) for i, r in enumerate(ds)], label, ds._fingerprint


def file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_file(path: Path, *, where: str) -> list[tuple[dict[str, Any], RowSource]]:
    """Rows of a local file, each with its ``file:line``. Raises UserError naming the problem."""
    if not path.exists():
        raise UserError(problem(where, f"data file {str(path)!r} does not exist",
                                "check the path (relative paths start at the recipe's folder)"))
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    readers = {".jsonl": _read_jsonl, ".jsonl.gz": _read_jsonl, ".json": _read_json,
               ".csv": _read_csv, ".txt": _read_txt, ".parquet": _read_parquet}
    reader = readers.get(suffix.lower())
    if reader is None:
        raise UserError(problem(where, f"unsupported file type {suffix!r} ({path})",
                                "use .jsonl, .json, .parquet, .csv or .txt"))
    try:
        return reader(path)
    except PermissionError as err:
        raise UserError(problem(str(path), "cannot read the file (permission denied)",
                                "fix the file's permissions")) from err
    except IsADirectoryError as err:
        raise UserError(problem(str(path), "is a directory, not a data file", "point at a file")) from err


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    if path.suffix == ".gz":
        import gzip

        handle = gzip.open(path, "rb")
    else:
        handle = open(path, "rb")
    with handle as f:
        yield from enumerate(f, start=1)


def _decode(raw: bytes, path: Path, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(problem(f"{path}:{number}", f"not valid UTF-8 (byte {err.start}: "
                                f"{raw[err.start:err.start + 1]!r})", "re-encode the file as UTF-8")) from err


def _read_jsonl(path: Path):
    rows = []
    for number, raw in _lines(path):
        text = _decode(raw, path, number).strip()
        if not text:
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(problem(f"{path}:{number}", f"malformed JSON: {err.msg} at column {err.colno}",
                                    "fix the line (each line must be one JSON object)")) from err
        if not isinstance(row, dict):
            raise UserError(problem(f"{path}:{number}", f"expected a JSON object, got {type(row).__name__}",
                                    "write one object per line"))
        rows.append((row, RowSource(str(path), number)))
    return rows


def _read_json(path: Path):
    text = _decode(path.read_bytes(), path, 1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(problem(f"{path}:{err.lineno}", f"malformed JSON: {err.msg}",
                                "fix the file (a JSON array of objects)")) from err
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list)), None) if len(data) == 1 else None
    if not isinstance(data, list):
        raise UserError(problem(str(path), "expected a JSON array of objects",
                                "write [ {...}, {...} ] or use JSONL"))
    rows = []
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(problem(f"{path}:#{i + 1}", "expected an object", "every item must be an object"))
        rows.append((row, RowSource(str(path), i + 1)))
    return rows


def _read_csv(path: Path):
    text = _decode(path.read_bytes(), path, 1)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    for row in reader:
        rows.append((dict(row), RowSource(str(path), reader.line_num)))
    return rows


def _read_txt(path: Path):
    """Plain text: one document per blank-line-separated paragraph."""
    text = _decode(path.read_bytes(), path, 1)
    rows, start, buffer = [], 1, []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            if not buffer:
                start = number
            buffer.append(line)
        elif buffer:
            rows.append(({"text": "\n".join(buffer)}, RowSource(str(path), start)))
            buffer = []
    if buffer:
        rows.append(({"text": "\n".join(buffer)}, RowSource(str(path), start)))
    return rows


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid and friends
        raise UserError(problem(str(path), f"cannot read parquet: {err}", "check the file")) from err
    return [(row, RowSource(str(path), i + 1)) for i, row in enumerate(table.to_pylist())]


# ---------------------------------------------------------------- formats


def detect_format(row: dict[str, Any], source: RowSource, where: str) -> str:
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "responses", "scores"} <= keys:
        return "ranked"
    if "messages" in keys:
        return "messages"
    if {"prompt", "completion", "label"} <= keys:
        return "kto"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    if "prompt" in keys:
        return "prompt"
    raise UserError(problem(str(source), f"cannot tell the row format from its fields {sorted(keys)}",
                            "rows need text | messages | prompt+completion | prompt+chosen+rejected | "
                            "prompt+completion+label | prompt(+answer); rename columns with data.fields "
                            f"or set {where}.format"))


def to_example(row: dict[str, Any], fmt: str, source: RowSource) -> Example:
    """One typed example; raises UserError naming ``file:line`` and the field."""
    get = _FieldReader(row, source)
    if fmt == "text":
        return TextExample(get.string("text"), source)
    if fmt == "messages":
        messages = get.messages("messages")
        return ChatExample(messages, source)
    if fmt == "prompt_completion":
        return PromptCompletionExample(get.text("prompt", allow_empty=True), get.text("completion"), source)
    if fmt == "preference":
        return _preference(row, get, source)
    if fmt == "ranked":
        return _ranked(row, get, source)
    if fmt == "kto":
        return KTOExample(get.text("prompt", allow_empty=True), get.text("completion"), get.boolean("label"),
                          source)
    if fmt == "prompt":
        answer = row.get("answer")
        extra = {k: v for k, v in row.items() if k not in ("prompt", "answer")}
        return PromptExample(get.text("prompt"), source, None if answer is None else str(answer), extra)
    raise UserError(problem(str(source), f"unknown format {fmt!r}", "set a valid data.format"))


def _preference(row: dict[str, Any], get: _FieldReader, source: RowSource) -> PreferencePair:
    # Empty responses are the preference stage's call (on_bad_pair: error or drop and count).
    chosen, rejected = get.text("chosen", allow_empty=True), get.text("rejected", allow_empty=True)
    if "prompt" not in row and is_dialogue(chosen) and is_dialogue(rejected):
        # HH-RLHF: each side is one dialogue string; its turns make the conversations below.
        chosen, rejected = to_messages(chosen, source, "chosen"), to_messages(rejected, source, "rejected")
    if "prompt" in row:
        prompt = get.text("prompt", allow_empty=True)
    elif "conversations" in row:
        # LLaMA-Factory / ShareGPT pairs: the conversation so far is the prompt.
        prompt = get.messages("conversations")
    elif isinstance(chosen, list) and isinstance(rejected, list):
        # Implicit prompt: the shared leading turns of the two conversations.
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        raise UserError(problem(f"{source} field 'prompt'", "missing, and chosen/rejected are not "
                                "conversations with a shared prefix", "add a prompt field"))
    if isinstance(prompt, list):
        # A conversational prompt with plain-text responses: the responses are assistant turns.
        chosen, rejected = _as_turns(chosen), _as_turns(rejected)
    elif isinstance(chosen, list) or isinstance(rejected, list):
        raise UserError(problem(str(source), "the row mixes plain text and conversational fields (a plain "
                                "prompt with conversational responses)",
                                "make the prompt a message list too, or the responses strings"))
    extra = {k: v for k, v in row.items() if k not in ("prompt", "conversations", "chosen", "rejected")}
    return PreferencePair(prompt, chosen, rejected, source, extra)


def _ranked(row: dict[str, Any], get: _FieldReader, source: RowSource) -> RankedExample:
    responses, scores = row.get("responses"), row.get("scores")
    if not isinstance(responses, list) or not isinstance(scores, list) or len(responses) != len(scores):
        raise UserError(problem(f"{source} field 'responses'", "responses and scores must be lists of equal length",
                                "write responses: [...] and scores: [...] with one score per response"))
    if len(responses) < 2:
        raise UserError(problem(f"{source} field 'responses'", "fewer than two responses: no pair to make",
                                "drop the row"))
    try:
        numbers = [float(s) for s in scores]
    except (TypeError, ValueError) as err:
        raise UserError(problem(f"{source} field 'scores'", "scores must be numbers", "fix the scores")) from err
    texts = [get.text(f"responses[{i}]", value=r) for i, r in enumerate(responses)]
    return RankedExample(get.text("prompt", allow_empty=True), texts, numbers, source)


def _as_turns(response: str | list[Message]) -> list[Message]:
    return response if isinstance(response, list) else [Message(role="assistant", content=response)]


class _FieldReader:
    """Typed access to a row's fields with errors that name file:line and the field."""

    def __init__(self, row: dict[str, Any], source: RowSource) -> None:
        self.row, self.source = row, source

    def _where(self, name: str) -> str:
        return f"{self.source} field {name!r}"

    def _need(self, name: str) -> Any:
        if name not in self.row or self.row[name] is None:
            raise UserError(problem(self._where(name), "missing",
                                    f"add {name!r} to every row, or rename a column with data.fields"))
        return self.row[name]

    def string(self, name: str, allow_empty: bool = False) -> str:
        value = self._need(name)
        if not isinstance(value, str):
            raise UserError(problem(self._where(name), f"must be a string, got {type(value).__name__}",
                                    "write a string", value=value))
        if not allow_empty and not value.strip():
            raise UserError(problem(self._where(name), "empty", "remove the row or fill the field"))
        return value

    def text(self, name: str, allow_empty: bool = False, value: Any = None) -> str | list[Message]:
        value = self._need(name) if value is None else value
        if isinstance(value, list):
            return self.messages(name, value)
        if isinstance(value, dict) and ("content" in value or {"from", "value"} <= set(value)):
            return self.messages(name, [value])
        if not isinstance(value, str):
            raise UserError(problem(self._where(name), f"must be a string or a list of messages, got "
                                    f"{type(value).__name__}", "write a string", value=value))
        if not allow_empty and not value.strip():
            raise UserError(problem(self._where(name), "empty", "remove the row or fill the field"))
        return value

    def boolean(self, name: str) -> bool:
        value = self._need(name)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise UserError(problem(self._where(name), f"must be true or false, got {type(value).__name__}",
                                "write true or false", value=value))

    def messages(self, name: str, value: Any = None) -> list[Message]:
        value = self._need(name) if value is None else value
        if not isinstance(value, list) or not value:
            raise UserError(problem(self._where(name), "must be a non-empty list of {role, content}",
                                    "write [{\"role\": \"user\", \"content\": \"...\"}, ...]"))
        out: list[Message] = []
        for i, message in enumerate(value):
            out.append(self._message(f"{name}[{i}]", message))
        return out

    def _message(self, where: str, message: Any) -> Message:
        if isinstance(message, dict) and "from" in message and "value" in message:
            # ShareGPT style {from: human/gpt, value}
            role = {"human": "user", "gpt": "assistant"}.get(message["from"], message["from"])
            message = {"role": role, "content": message["value"]}
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(
            message.get("content"), str
        ):
            raise UserError(problem(self._where(where), "must be an object with string 'role' and 'content'",
                                    'write each message as {"role": "user", "content": "..."}', value=message))
        if message["role"] not in ROLES:
            raise UserError(problem(self._where(where), f"unknown role {message['role']!r}",
                                    "use one of " + ", ".join(ROLES)))
        return Message(role=message["role"], content=message["content"])
