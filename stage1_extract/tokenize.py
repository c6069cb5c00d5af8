"""Chat-template rendering and the assistant-only loss mask, for any chat template.

No separator strings are hard-coded. For each assistant turn i the conversation is
rendered three ways with the tokenizer's own template:

    P_i  = render(messages[:i], add_generation_prompt=True)   what precedes the answer
    Q_i  = render(messages[:i+1])                              ... plus the answer turn
    FULL = render(messages)

P_i must be a prefix of Q_i and Q_i a prefix of FULL; a template that rewrites
earlier turns when more follow (e.g. drops the reasoning of past assistant turns)
breaks that, and we raise TemplateError instead of guessing. Inside Q_i[len(P_i):]
the assistant content is located (first occurrence not inside a special token),
and the span is extended to the end of the first special token the template emits
after it (the end-of-turn token: <|im_end|>, <|eot_id|>, <end_of_turn>, </s>,
<|end|>, ...); text after that token (a newline) is not part of the span.

Character spans become token masks through the fast tokenizer's offset mapping:
a token is masked iff its character range overlaps a span. So a BPE token that
straddles a boundary (e.g. " Paris" covering the template's space and the first
content character, or a merged "\\n\\n" covering the last content character) is
masked: the model has to produce that token to produce the content.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from stage1_extract.conversations import DataError, DataStats, load_conversations


class TemplateError(ValueError):
    """The chat template cannot give a trustworthy loss mask for this conversation."""


class TemplateRenderError(TemplateError):
    """The template itself refused this conversation (e.g. raise_exception for role order)."""


@dataclass
class TokenizedSample:
    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool
    full_length: int = 0  # tokens before truncation


@dataclass
class Sample:
    sample_index: int
    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # uint8 [T]


def _render(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja raise_exception, TemplateError, ValueError, ...
        raise TemplateRenderError(f"the chat template refused the conversation: {type(e).__name__}: {e}") from None


def _special_strings(tok) -> list[str]:
    """Texts of the tokenizer's special tokens (end-of-turn candidates), longest first."""
    found = set()
    for t in getattr(tok, "added_tokens_decoder", {}).values():
        if getattr(t, "special", False) and t.content:
            found.add(t.content)
    for t in getattr(tok, "all_special_tokens", []) or []:
        if t:
            found.add(t)
    return sorted(found, key=len, reverse=True)


def _special_pattern(specials: list[str]):
    import re

    return re.compile("|".join(re.escape(x) for x in specials)) if specials else None


def _special_ranges(text: str, specials: list[str], lo: int = 0) -> list[tuple[int, int]]:
    """Non-overlapping occurrences of special-token strings in text[lo:], leftmost-longest."""
    pat = _special_pattern(specials)
    return [] if pat is None else [m.span() for m in pat.finditer(text, lo)]


def _first_special_at_or_after(text: str, start: int, specials: list[str]) -> Optional[tuple[int, int]]:
    pat = _special_pattern(specials)
    m = pat.search(text, start) if pat is not None else None
    return m.span() if m else None


def _find_content(q: str, lo: int, content: str, specials: list[str]) -> Optional[tuple[int, int]]:
    """Where the assistant content lies in q[lo:].

    Candidates are occurrences that do not overlap a special token. A template
    renders the content last in its turn, followed only by end-of-turn text
    (special tokens and whitespace), so the candidate whose tail is such text wins
    (this ignores a copy of the content inside a header, e.g. content "A" in
    "### Assistant: A"); failing that, the first candidate.
    """
    pat = _special_pattern(specials)
    region_specials = _special_ranges(q, specials, lo)

    def tail_is_end_of_turn(e: int) -> bool:
        rest = q[e:]
        return not (pat.sub("", rest) if pat is not None else rest).strip()

    for c in (content, content.strip()):
        if not c:
            continue
        cands = []
        k = q.find(c, lo)
        while k != -1:
            e = k + len(c)
            if not any(a < e and b > k for a, b in region_specials):
                cands.append((k, e))
            k = q.find(c, k + 1)
        if cands:
            good = [x for x in cands if tail_is_end_of_turn(x[1])]
            return good[-1] if good else cands[0]
    return None


def assistant_char_spans(tok, messages: list[dict], *, full: Optional[str] = None,
                         stop_at: Optional[int] = None) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, [(start, end) char span of each assistant turn incl. its end-of-turn token]).

    Each assistant turn renders the conversation up to it (the template is a black box),
    so the cost grows with the square of the number of turns. `stop_at` (a character
    position of the rendered text, e.g. where truncation cuts) ends the scan at the first
    assistant turn whose prefix reaches it: turns after the cut cost nothing.
    """
    full = _render(tok, messages, False) if full is None else full
    specials = _special_strings(tok)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if stop_at is not None and spans and spans[-1][1] >= stop_at:
            break
        q = _render(tok, messages[: i + 1], False)
        if not full.startswith(q):
            raise TemplateError(
                f"the chat template renders the conversation up to assistant turn {i} differently when later "
                f"turns follow (it rewrites history, e.g. drops the reasoning of earlier assistant turns), so the "
                f"assistant spans cannot be located reliably; use a chat template that renders earlier turns "
                f"unchanged (or train on single-turn data)")
        if i == 0:
            p = ""
            try:
                p = _render(tok, [], True)
            except TemplateError:
                pass
            if not q.startswith(p):
                p = ""
        else:
            p = _render(tok, messages[:i], True)
            if not q.startswith(p):
                # Some templates emit a generation prompt that the rendered turn does not begin with.
                p = _render(tok, messages[:i], False)
        if not q.startswith(p):
            raise TemplateError(
                f"the chat template does not render the conversation before assistant turn {i} as a prefix of "
                f"the conversation including that turn (it rewrites history), so the assistant span cannot be "
                f"located reliably")
        if spans and len(p) < spans[-1][1]:
            raise TemplateError(f"assistant turn {i}: rendered prefix ends inside the previous assistant turn")
        content = m["content"]
        found = _find_content(q, len(p), content, specials) if content.strip() else None
        if found is None:
            # Empty answer, or the template transformed the content: the whole rendered turn
            # after the generation prompt is what the model produces, up to its last special token.
            start = len(p)
            tail_ok = [r for r in _special_ranges(q, specials, start) if not q[r[1]:].strip()]
            end = tail_ok[-1][1] if tail_ok else start + len(q[start:].rstrip())
        else:
            start, cend = found
            eot = _first_special_at_or_after(q, cend, specials)
            # No special token after the content: the template has no end-of-turn marker
            # in text (the model stops with eos); the span is the content alone.
            end = eot[1] if eot is not None else cend
        if end > start:
            spans.append((start, end))
        if stop_at is not None and len(p) >= stop_at:
            break  # this turn starts after the cut: no later turn can reach the kept tokens
    return full, spans


def spans_to_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for every token whose [start, end) overlaps a span; zero-width tokens are never masked."""
    mask = [0] * len(offsets)
    j = 0
    for t, (s, e) in enumerate(offsets):
        if e <= s:
            continue
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        k = j
        while k < len(spans) and spans[k][0] < e:
            if spans[k][1] > s:
                mask[t] = 1
                break
            k += 1
    return mask


def tokenize_conversation(tok, messages: list[dict], *, max_length: int,
                          truncation: str = "drop_tail") -> TokenizedSample:
    """Token ids and the assistant-only loss mask of one conversation.

    truncation="drop_tail" keeps the first max_length tokens; "skip" returns the
    sample uncut with truncated=True (the caller drops it).
    """
    if truncation not in ("drop_tail", "skip"):
        raise ValueError(f"truncation must be 'drop_tail' or 'skip', got {truncation!r}")
    if not getattr(tok, "is_fast", False):
        raise TemplateError("the loss mask needs a fast tokenizer (offset mapping)")
    # Render and tokenize the whole conversation once (linear), then locate assistant spans only
    # up to where truncation cuts: a long conversation costs its length, not its length squared.
    text = _render(tok, messages, False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    n = len(ids)
    cut = max(offsets[max_length - 1][1], 1) if n > max_length else None
    text, spans = assistant_char_spans(tok, messages, full=text, stop_at=cut)
    if ids and spans and all(e == 0 for _, e in offsets):
        raise TemplateError("the tokenizer returns no character offsets; cannot map the template's spans to tokens")
    # beyond the cut the mask is not computed (drop_tail drops those tokens; skip drops the sample)
    mask = spans_to_mask(offsets, spans)
    if n > max_length:
        if truncation == "drop_tail":
            return TokenizedSample(ids[:max_length], mask[:max_length], True, n)
        return TokenizedSample(ids, mask, True, n)
    return TokenizedSample(ids, mask, False, n)


def build_samples(cfg, tok, paths: Optional[list[str]] = None, *, progress: bool = False,
                  require_assistant: bool = True) -> tuple[list[Sample], DataStats]:
    """Load, validate, render and mask every conversation of `paths` (default data.train).

    Samples are ordered by sample_index. Skips (bad records with on_error=skip,
    samples too long with truncation=skip, samples whose loss tokens were all cut
    off, conversations the template refuses with on_error=skip) are counted in the
    returned stats.
    """
    d = cfg.data
    paths = list(d.train if paths is None else paths)
    convs, stats = load_conversations(paths, on_error=d.on_error, max_samples=d.max_samples,
                                      num_proc=d.num_proc, require_assistant=require_assistant)
    it = convs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(convs, desc="tokenize", unit="conv")
    samples: list[Sample] = []
    for c in it:
        where = f"{c.source}:{c.line}"
        try:
            ts = tokenize_conversation(tok, c.messages, max_length=d.max_length, truncation=d.truncation)
        except TemplateRenderError as e:
            if d.on_error == "raise":
                raise TemplateRenderError(f"{where}: {e}") from None
            stats.kept -= 1
            stats.skip("chat template refused", f"{where}: {e}", c.sample_index)
            continue
        except TemplateError as e:  # systematic (history rewriting): never skipped silently
            raise TemplateError(f"{where}: {e}") from None
        if ts.truncated:
            if d.truncation == "skip":
                stats.kept -= 1
                stats.skip("too long", f"{where}: {ts.full_length} tokens > data.max_length {d.max_length}",
                           c.sample_index)
                continue
            stats.truncated += 1
        if require_assistant and sum(ts.loss_mask) == 0:
            stats.kept -= 1
            stats.skip("no loss tokens after truncation",
                       f"{where}: every assistant token lies beyond data.max_length {d.max_length}", c.sample_index)
            continue
        samples.append(Sample(c.sample_index, np.asarray(ts.input_ids, dtype=np.int32),
                              np.asarray(ts.loss_mask, dtype=np.uint8)))
        stats.tokens += len(ts.input_ids)
        stats.loss_tokens += int(sum(ts.loss_mask))
        stats.lengths.append(len(ts.input_ids))
    if not samples:
        raise DataError(f"no usable samples in {', '.join(paths)} ({stats.samples_read} read, "
                        f"skipped: {stats.skipped})")
    return samples, stats


__all__ = ["TemplateError", "TemplateRenderError", "TokenizedSample", "Sample", "assistant_char_spans",
           "spans_to_mask", "tokenize_conversation", "build_samples", "DataError", "DataStats"]
