"""Evaluation prompts: MT-bench, ShareGPT / messages JSONL, plain prompts, GSM8K.

Each row becomes an `EvalPrompt` with one or more user turns:
* MT-bench `question.jsonl` (`turns`): every turn, in order; turn 2 is asked after
  the model's own answer to turn 1 (the evaluator feeds that answer back);
* ShareGPT (`conversations`, from human/user) or `messages` (role user): the first
  user turn;
* `{"prompt": ...}`, `{"question": ...}` (GSM8K), `{"instruction": ..., "input": ...}`.
A `.json` file holding an array of such rows works too. Prompts are rendered with
the target's own chat template.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


class PromptError(ValueError):
    """Bad prompt file; the message is 'FILE:LINE: field: problem'."""


@dataclass
class EvalPrompt:
    id: str
    source: str
    line: int
    turns: list[str]


def _text(v, where: str, field: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise PromptError(f"{where}: {field}: must be a non-empty string, got {type(v).__name__}")
    return v


def _row_to_prompt(row, where: str, src: str, line: int, index: int) -> EvalPrompt:
    if not isinstance(row, dict):
        raise PromptError(f"{where}: row must be a JSON object, got {type(row).__name__}")
    pid = str(row.get("question_id", row.get("id", index)))
    if "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns:
            raise PromptError(f"{where}: turns: must be a non-empty list of strings")
        return EvalPrompt(pid, src, line, [_text(t, where, f"turns[{i}]") for i, t in enumerate(turns)])
    if "conversations" in row or "messages" in row:
        key = "conversations" if "conversations" in row else "messages"
        conv = row[key]
        if not isinstance(conv, list):
            raise PromptError(f"{where}: {key}: must be a list of turns")
        for i, m in enumerate(conv):
            if not isinstance(m, dict):
                raise PromptError(f"{where}: {key}[{i}]: must be an object")
            role = m.get("from", m.get("role"))
            if role in ("human", "user"):
                return EvalPrompt(pid, src, line, [_text(m.get("value", m.get("content")), where, f"{key}[{i}]")])
        raise PromptError(f"{where}: {key}: no user turn (from 'human' or role 'user')")
    for key in ("prompt", "question"):
        if key in row:
            return EvalPrompt(pid, src, line, [_text(row[key], where, key)])
    if "instruction" in row:
        text = _text(row["instruction"], where, "instruction")
        if isinstance(row.get("input"), str) and row["input"].strip():
            text = text + "\n\n" + row["input"]
        return EvalPrompt(pid, src, line, [text])
    raise PromptError(f"{where}: no prompt field (expected one of turns, conversations, messages, prompt, "
                      f"question, instruction; got keys {sorted(row)})")


def load_prompts(paths: list[str], *, max_prompts: Optional[int] = None,
                 max_turns: Optional[int] = None) -> list[EvalPrompt]:
    """Prompts from all files in order, at most `max_prompts` in all, `max_turns` turns each."""
    out: list[EvalPrompt] = []
    if not paths:
        raise PromptError("eval.prompts is empty: give at least one prompt file")
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise PromptError(f"{p}: prompt file not found")
        if p.suffix == ".json":
            try:
                rows = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise PromptError(f"{p}:{e.lineno}: not valid JSON: {e.msg}") from None
            if not isinstance(rows, list):
                raise PromptError(f"{p}:1: a .json prompt file must hold an array of rows")
            items = [(i + 1, r, f"{p}[{i}]") for i, r in enumerate(rows)]
        else:
            items = []
            with p.open() as f:
                for ln, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    try:
                        items.append((ln, json.loads(raw), f"{p}:{ln}"))
                    except json.JSONDecodeError as e:
                        raise PromptError(f"{p}:{ln}: not valid JSON: {e.msg}") from None
        for ln, row, where in items:
            if max_prompts is not None and len(out) >= max_prompts:
                return out
            ep = _row_to_prompt(row, where, str(p), ln, len(out))
            if max_turns is not None:
                ep.turns = ep.turns[:max_turns]
            out.append(ep)
    return out


def render(tok, messages: list[dict]) -> list[int]:
    """Token ids of `messages` + the assistant generation prompt, in the target's template."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template already writes any BOS it wants; do not add another.
    return list(tok(text, add_special_tokens=False)["input_ids"])
