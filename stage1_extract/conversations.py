"""Reading conversation data and normalising it to chat messages.

Accepted inputs (a list of paths; records are concatenated in order):

* ShareGPT JSONL: one object a line with `conversations: [{from, value}, ...]`
  (`from` in human/user, gpt/assistant/chatgpt/model, system; `role`/`content`
  keys inside the turns are accepted too);
* a ShareGPT JSON array file (`[ {...}, {...} ]`), e.g. FastChat's dummy_conversation.json;
* OpenAI-style JSONL: `messages: [{role, content}, ...]`;
* prompt-only JSONL: `{"prompt": "..."}` (one user turn) -- for answer regeneration;
* local Hugging Face dataset directories (`datasets.save_to_disk`) and `.parquet`
  files, read with `datasets` (`num_proc` processes).

Every record becomes a `Conversation` whose `messages` use the roles
system/user/assistant. A bad record raises `DataError` with a message
"FILE:LINE: field: problem" (for tables "FILE:row N: ..."), or, with
`on_error="skip"`, is counted in `DataStats.skipped` under its reason.
`sample_index` is the record's position in the concatenated input, counting
skipped records too, so it is the same whatever the error policy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

ROLE_MAP = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "model": "assistant",
}

# How many skip messages DataStats keeps verbatim (the counts are always complete).
MAX_KEPT_ERRORS = 1000


class DataError(ValueError):
    """Bad conversation data; the message names the file, line (or row) and field."""


@dataclass
class Conversation:
    source: str
    line: int
    sample_index: int
    id: Optional[str]
    messages: list[dict]


@dataclass
class DataStats:
    """What happened to the input: read, kept, skipped by reason, and token figures."""

    samples_read: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    lengths: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)        # first MAX_KEPT_ERRORS skip messages
    skipped_index: dict[int, str] = field(default_factory=dict)  # sample_index -> reason

    def skip(self, reason: str, message: str, sample_index: Optional[int] = None) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(message)
        if sample_index is not None:
            self.skipped_index[sample_index] = f"{reason} ({message})"

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def percentiles(self, qs=(50, 90, 99)) -> dict[str, int]:
        import numpy as np

        if not self.lengths:
            return {**{f"p{q}": 0 for q in qs}, "max": 0}
        a = np.asarray(self.lengths)
        res = {f"p{q}": int(np.percentile(a, q, method="nearest")) for q in qs}
        res["max"] = int(a.max())
        return res

    def to_dict(self) -> dict:
        return {
            "samples_read": self.samples_read,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "truncated": self.truncated,
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
            "length_percentiles": self.percentiles(),
        }


class _Bad(Exception):
    """A bad record: reason (the stats key), field, problem."""

    def __init__(self, reason: str, fieldname: str, problem: str):
        super().__init__(problem)
        self.reason, self.field, self.problem = reason, fieldname, problem


# --------------------------------------------------------------------------- normalisation


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def normalize_record(rec: Any, *, require_assistant: bool = True) -> tuple[Optional[str], list[dict]]:
    """(id, messages) of one record, or raises _Bad."""
    if not isinstance(rec, dict):
        raise _Bad("not an object", "record", f"expected a JSON object, got {_type_name(rec)}")
    rid = rec.get("id")
    rid = None if rid is None else str(rid)
    if rec.get("conversations") is not None:
        key, turns = "conversations", rec["conversations"]
    elif rec.get("messages") is not None:
        key, turns = "messages", rec["messages"]
    elif isinstance(rec.get("prompt"), str):
        key, turns = "prompt", [{"role": "user", "content": rec["prompt"]}]
    else:
        have = ", ".join(sorted(map(str, rec))) or "none"
        raise _Bad("missing conversations/messages", "conversations",
                   f"missing (expected 'conversations' (ShareGPT) or 'messages' (OpenAI); record keys: {have})")
    if not isinstance(turns, (list, tuple)):
        raise _Bad("not a list", key, f"must be a list of turns, got {_type_name(turns)}")
    msgs: list[dict] = []
    sys_prompt = rec.get("system")
    if isinstance(sys_prompt, str) and sys_prompt.strip() and key == "conversations":
        msgs.append({"role": "system", "content": sys_prompt})  # ShareGPT variants carry it beside the turns
    for j, t in enumerate(turns):
        where = f"{key}[{j}]"
        if not isinstance(t, dict):
            raise _Bad("not an object", where, f"expected an object, got {_type_name(t)}")
        rkey = "from" if "from" in t else "role"
        if t.get(rkey) is None:
            raise _Bad("missing role", f"{where}.from" if key == "conversations" else f"{where}.role",
                       "missing (each turn needs 'from' or 'role')")
        raw_role = t[rkey]
        role = ROLE_MAP.get(str(raw_role).strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise _Bad("unknown role", f"{where}.{rkey}",
                       f"unknown role {raw_role!r} (expected one of {', '.join(ROLE_MAP)})")
        ckey = "value" if "value" in t else "content"
        if ckey not in t:
            raise _Bad("missing content", f"{where}.value" if key == "conversations" else f"{where}.content",
                       "missing (each turn needs 'value' or 'content')")
        content = t[ckey]
        if not isinstance(content, str):
            raise _Bad("non-string content", f"{where}.{ckey}",
                       f"content must be a string, got {_type_name(content)}")
        msgs.append({"role": role, "content": content})
    if not msgs:
        raise _Bad("empty conversation", key, "empty conversation (no turns)")
    has_assistant = any(m["role"] == "assistant" for m in msgs)
    if require_assistant and not has_assistant:
        raise _Bad("no assistant turn", key, "no assistant turn (nothing to train on)")
    # Prompt-only records (no answers yet) may hold several user turns in a row:
    # answer regeneration answers each of them.
    prompt_only = not has_assistant
    offset = len(msgs) - len(turns)  # a prepended top-level system prompt
    for j in range(1, len(msgs)):
        a, b = msgs[j - 1]["role"], msgs[j]["role"]
        if a == b and not (prompt_only and a == "user"):
            tj = j - offset
            rkey = "from" if key == "conversations" else "role"
            raise _Bad("consecutive same-role turns", f"{key}[{tj}].{rkey}",
                       f"two consecutive '{a}' turns ({key}[{tj - 1}] and {key}[{tj}])")
    return rid, msgs


# --------------------------------------------------------------------------- readers
# Each reader yields (location, record_or_exception); location is "FILE:LINE" or "FILE:row N".


def _iter_jsonl(path: Path, text: str) -> Iterator[tuple[int, str, Any]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines are not records
        try:
            yield lineno, f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, f"{path}:{lineno}", _Bad("broken JSON", "record", f"broken JSON ({e.msg} at column {e.colno})")


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[int, str, Any]]:
    """Elements of a top-level JSON array, each with the line it starts on."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)

    def skip_ws(k: int) -> int:
        while k < n and text[k] in " \t\r\n":
            k += 1
        return k

    i = skip_ws(i)
    if i < n and text[i] == "]":
        return
    while True:
        i = skip_ws(i)
        lineno = text.count("\n", 0, i) + 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            # The array is broken from here on: no way to resynchronise on the next element.
            raise DataError(f"{path}:{e.lineno}: record: broken JSON ({e.msg} at column {e.colno})") from None
        yield lineno, f"{path}:{lineno}", obj
        i = skip_ws(i)
        if i < n and text[i] == ",":
            i += 1
            continue
        if i < n and text[i] == "]":
            return
        ln = text.count("\n", 0, i) + 1
        raise DataError(f"{path}:{ln}: record: broken JSON (expected ',' or ']' between array elements)")


def _load_table(path: Path, num_proc: int):
    import datasets

    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - datasets raises several types here
            raise DataError(f"{path}: not a Hugging Face dataset directory (datasets.load_from_disk: {e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" in ds:
                ds = ds["train"]
            elif len(ds) == 1:
                ds = next(iter(ds.values()))
            else:
                raise DataError(f"{path}: dataset has splits {list(ds)} and none is 'train'; point at one split")
        return ds
    try:
        return datasets.load_dataset("parquet", data_files=str(path), split="train",
                                     num_proc=num_proc if num_proc > 1 else None)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot read parquet file ({e})") from None


def _iter_table(path: Path, num_proc: int) -> Iterator[tuple[int, str, Any]]:
    ds = _load_table(path, num_proc)
    for r, row in enumerate(ds, start=1):
        yield r, f"{path}:row {r}", row


def _read_utf8(path: Path) -> str:
    """The file as text; a byte that is not UTF-8 is reported by line and column, not byte offset."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)  # offsets count after the BOM
        line = raw.count(b"\n", 0, start) + 1
        col = start - (raw.rfind(b"\n", 0, start) + 1) + 1  # in bytes: the line is not text
        bad = raw[start:start + (e.end - e.start)].hex(" ")
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{bad} at column {col}; "
                        f"re-encode the file as UTF-8)") from None


def _iter_source(path: Path, num_proc: int) -> Iterator[tuple[int, str, Any]]:
    if path.is_dir() or path.suffix == ".parquet":
        yield from _iter_table(path, num_proc)
        return
    text = _read_utf8(path)
    first = text.lstrip()[:1]
    if first == "[":
        yield from _iter_json_array(path, text)
    else:
        yield from _iter_jsonl(path, text)


def check_sources(paths: list[str]) -> list[Path]:
    """Fail early (before any model loads) on a missing or empty input."""
    if not paths:
        raise DataError("no data files given (set data.train, e.g. data.train=[data.jsonl])")
    out = []
    for p in paths:
        q = Path(p).expanduser()
        if not q.exists():
            raise DataError(f"{p}: data file not found")
        if q.is_file() and q.stat().st_size == 0:
            raise DataError(f"{p}: data file is empty")
        if q.is_file() and q.suffix not in (".jsonl", ".json", ".parquet"):
            raise DataError(f"{p}: unsupported data file type '{q.suffix}' (use .jsonl, .json, .parquet "
                            "or a Hugging Face dataset directory)")
        out.append(q)
    return out


def load_conversations(paths: list[str], *, on_error: str = "raise", max_samples: Optional[int] = None,
                       num_proc: int = 1, require_assistant: bool = True,
                       stats: Optional[DataStats] = None) -> tuple[list[Conversation], DataStats]:
    """Read and validate every record of `paths` (in order); see the module docstring."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    files = check_sources(list(paths))
    stats = stats or DataStats()
    convs: list[Conversation] = []
    index = 0
    for path in files:
        n_in_file = 0
        for lineno, loc, rec in _iter_source(path, num_proc):
            if max_samples is not None and index >= max_samples:
                break
            n_in_file += 1
            stats.samples_read += 1
            try:
                if isinstance(rec, _Bad):
                    raise rec
                rid, msgs = normalize_record(rec, require_assistant=require_assistant)
            except _Bad as b:
                msg = f"{loc}: {b.field}: {b.problem}"
                if on_error == "raise":
                    raise DataError(msg) from None
                stats.skip(b.reason, msg, index)
            else:
                convs.append(Conversation(str(path), lineno, index, rid, msgs))
                stats.kept += 1
            index += 1
        if n_in_file == 0 and not (max_samples is not None and index >= max_samples):
            raise DataError(f"{path}: no records (empty file or dataset)")
        if max_samples is not None and index >= max_samples:
            break
    if not convs:
        raise DataError(f"no usable conversations in {', '.join(map(str, paths))} "
                        f"({stats.samples_read} read, skipped: {stats.skipped})")
    return convs, stats
