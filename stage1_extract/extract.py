"""Stage 1: run the target once over the data and write the feature cache (DESIGN.md section 4).

Per shard (consecutive samples of the ordered sample list, at most
`extract.shard_tokens` tokens and `extract.samples_per_shard` samples: `shard_starts`;
worker r of W takes k mod W == r): inside windows of `extract.window_tokens` tokens,
samples are sorted by length and packed into token-budget batches, the target runs
once per batch (no grad; forward hooks keep only the three hidden
states of `extract.layers`, see stage1_extract.capture), and on the device
we keep those three layers and the top-K log-probabilities of
the full-vocab softmax of the target's logits, computed in chunks of
`extract.logits_chunk_tokens` positions. Padding is dropped before anything leaves
the device. The writer thread (stage1_extract.writer) streams the rows into the
shard's files, chunk by chunk, while the next batches run, and commits the shard.

Logits. Materialising [B, T, V] logits (73k vocab x 16k tokens = 4.8 GB in fp32,
plus the same again for log_softmax) is what makes naive extraction run out of
memory. The default path lets the model run its own forward up to the LM head and
captures the head's *input* (so model-specific scaling before the head, such as
MiniCPM's hidden / (hidden_size / dim_model_base), is the model's business), then
applies the head itself chunk by chunk. Scaling *after* the head (logit
soft-capping, logit_scale) would be skipped by that path, so the first batch of a
run is checked against the model's own logits; on a mismatch the run falls back
to the model's full logits (still reduced to top-K chunk by chunk).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from schemas.cache import (
    CACHE_JSON, EMBED_FILE, HIDDEN_DTYPES, LAYER_FILE, LM_HEAD_FILE, SCHEMA_ID, TARGET_DIR, CacheError, build_manifest,
    committed_shards, file_sha256, read_cache_json,
)
from schemas.config import RunConfig, resolve_layers
from schemas.dirkind import ensure_writable, mark
from schemas.fp8 import quantize_packed
from stage1_extract.capture import CaptureError, LayerCapture, compare_with_hidden_states
from stage1_extract.workers import Worker, resolve_worker
from stage1_extract.writer import BatchResult, ShardPlan, ShardWriter


class ExtractError(RuntimeError):
    pass


# --------------------------------------------------------------------------- batching


def make_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Pack sample positions into batches with len(batch) * longest <= max_tokens.

    Longest first (ties by position), so padding is small and the first batch shows
    the peak memory at once. A sample longer than the budget runs alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        L = int(lengths[i])
        if cur and max(longest, L) * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, L)
    if cur:
        batches.append(cur)
    return batches


def split_by_tokens(lengths: Sequence[int], max_tokens: Optional[int], max_count: Optional[int] = None,
                    start: int = 0) -> list[int]:
    """Boundaries [start, ..., len] cutting consecutive samples into runs of at most `max_tokens`
    tokens and `max_count` samples (None: no limit); a sample longer than max_tokens runs alone."""
    n = len(lengths)
    csum = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
    bounds, lo = [start], 0
    while lo < n:
        hi = n if max_tokens is None else int(np.searchsorted(csum, csum[lo] + max_tokens, side="right")) - 1
        hi = max(hi, lo + 1)
        if max_count is not None:
            hi = min(hi, lo + max_count)
        bounds.append(start + hi)
        lo = hi
    return bounds


def shard_starts(lengths: Sequence[int], samples_per_shard: int, shard_tokens: Optional[int]) -> list[int]:
    """Which samples each shard holds (DESIGN.md section 4): shard k is samples [starts[k], starts[k+1]).

    Consecutive samples in input order, a shard closing before the sample that would take
    it past `extract.shard_tokens` tokens or `extract.samples_per_shard` samples (a sample
    longer than shard_tokens gets a shard of its own; shard_tokens None: samples only, the
    layout of caches made before token-sized shards). A function of the tokenized lengths
    alone, so every worker, whatever their number, computes the same shards.
    """
    return split_by_tokens(lengths, shard_tokens, int(samples_per_shard))


def shard_batches(lengths: Sequence[int], max_tokens: int, window_tokens: int) -> list[list[int]]:
    """A shard's batches: windows of consecutive samples of at most `window_tokens` tokens, each
    packed by `make_batches` (longest first); a window covering the shard gives exactly
    `make_batches` over the shard. The writer holds the rows of a chunk until all its samples
    are computed, so a window bounds what it holds; a larger one pads less (samples of similar
    length share a batch)."""
    bounds = split_by_tokens(lengths, window_tokens)
    out: list[list[int]] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out += [[a + j for j in batch] for batch in make_batches(list(lengths[a:b]), max_tokens)]
    return out


CHUNK_ROWS_MIN, CHUNK_ROWS_MAX = 32, 2048


def auto_chunk_rows(lengths: Sequence[int]) -> int:
    """`extract.chunk_rows: auto`: the power of two at or below a quarter of the mean sample length,
    within [32, 2048]. A training rank decodes whole inner chunks; the samples it needs start
    and end at random places inside them, so it decodes about (mean length + chunk rows) rows
    per mean-length sample it trains on: 1.25x at most with a quarter (bench/chunk_rows.py)."""
    mean = float(np.mean(lengths)) if len(lengths) else float(CHUNK_ROWS_MAX)
    rows = 1 << max(0, int(math.floor(math.log2(max(1.0, mean / 4)))))
    return int(min(CHUNK_ROWS_MAX, max(CHUNK_ROWS_MIN, rows)))


WINDOW_BATCHES = 16  # default window: padding ~3% (1-4k tokens) to ~9% (chat lengths) of the forward


def window_tokens(cfg: RunConfig) -> int:
    """extract.window_tokens; default 16 x max_tokens_per_batch."""
    return int(cfg.extract.window_tokens or WINDOW_BATCHES * cfg.extract.max_tokens_per_batch)


def pad_batch(seqs: Sequence[np.ndarray], pad_id: int):
    """Right-padded int64 input_ids and attention_mask (torch, CPU)."""
    import torch

    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
        mask[i, :len(s)] = 1
    return ids, mask


# --------------------------------------------------------------------------- capture


class Extractor:
    """Runs the target on one padded batch and returns trimmed, device-side features.

    __call__(input_ids, attention_mask) -> (hidden bf16 [rows, 3, H], topk_ids int32 [rows, K],
    topk_logprobs fp16 [rows, K]) where rows are the real tokens of the batch, sample
    after sample.
    """

    def __init__(self, model, layers: list[int], topk: int, chunk_tokens: int = 2048, logits_path: str = "auto",
                 capture: str = "auto"):
        if capture not in ("auto", "hooks", "hidden_states"):
            raise ValueError(f"capture must be auto, hooks or hidden_states, not {capture!r}")
        self.capture = capture  # auto -> decided on the first batch: "hooks" or "hidden_states"
        self.capture_check: Optional[dict] = None
        self.model = model
        self.layers = list(layers)
        self.topk = int(topk)
        self.chunk = int(chunk_tokens)
        self.head = model.get_output_embeddings()
        if self.head is None and logits_path != "model":
            logits_path = "model"
        self.logits_path = logits_path  # auto -> decided on the first batch: "head" or "model"
        self.check: Optional[dict] = None
        self.device = _input_device(model)

    # The head's input is captured by swapping the head's forward for one that records
    # it and returns an empty [.., 0] tensor: every op after the head still runs, on nothing.
    def _forward_capture(self, ids, mask, all_hidden: bool = True):
        head, captured = self.head, {}
        had_own = "forward" in head.__dict__
        own = head.__dict__.get("forward")

        def capture(x, *a, **k):
            captured["x"] = x
            return x.new_empty(*x.shape[:-1], 0)

        head.forward = capture
        try:
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=all_hidden, use_cache=False)
        finally:
            if had_own:
                head.forward = own
            else:
                del head.forward
        if "x" not in captured:
            raise ExtractError("the model's forward never called its output embedding (lm_head); "
                               "cannot capture logits in chunks")
        return out, captured["x"]

    def _topk_rows(self, rows_fn, n: int):
        """rows_fn(start, stop) -> fp32 logits [rows, V] on device; top-K of log_softmax, chunked."""
        import torch

        ids = torch.empty((n, self.topk), dtype=torch.int32, device=self.device)
        lps = torch.empty((n, self.topk), dtype=torch.float16, device=self.device)
        for s in range(0, n, self.chunk):
            e = min(n, s + self.chunk)
            logits = rows_fn(s, e).float()
            # log_softmax is monotone: top-K of the logits minus logsumexp, without a second
            # [rows, V] tensor for the full log_softmax
            v, i = logits.topk(self.topk, dim=-1)
            v = v - torch.logsumexp(logits, dim=-1, keepdim=True)
            ids[s:e] = i.to(ids.device, torch.int32)
            lps[s:e] = v.clamp_min(-60000.0).to(lps.device, torch.float16)
            del logits, v, i
        return ids, lps

    def __call__(self, input_ids, attention_mask):
        import contextlib

        import torch

        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device)
        with torch.no_grad():
            if self.logits_path == "auto":
                self._decide(ids, mask)
            if self.capture == "auto":
                self._decide_capture(ids, mask)
            hooks = self.capture == "hooks"
            flat = mask.reshape(-1).bool()
            n = int(flat.sum())
            cap = LayerCapture(self.model, self.layers) if hooks else contextlib.nullcontext()
            with cap:
                if self.logits_path == "head":
                    out, x = self._forward_capture(ids, mask, all_hidden=not hooks)
                else:
                    out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=not hooks,
                                     use_cache=False)
            if self.logits_path == "head":
                xs = x.reshape(-1, x.shape[-1])[flat.to(x.device)]  # trim padding on device
                head = self.head
                topk_ids, topk_lps = self._topk_rows(lambda s, e: head(xs[s:e]), n)
                del x, xs
            else:
                lg = out.logits
                sel = torch.nonzero(flat.to(lg.device)).squeeze(1)
                lg2 = lg.reshape(-1, lg.shape[-1])
                topk_ids, topk_lps = self._topk_rows(lambda s, e: lg2[sel[s:e]], n)
                del lg, lg2
            hidden = self._stack_layers(cap if hooks else None, out, flat)
            del out
        return hidden, topk_ids.to(self.device), topk_lps.to(self.device)

    def _stack_layers(self, cap, out, flat):
        """[rows, 3, H] bf16 of the configured layers, padding dropped (on the input device)."""
        import torch

        if cap is not None:
            get = cap.get
        else:
            hs = out.hidden_states
            if hs is None:
                raise ExtractError("the model returned no hidden_states for output_hidden_states=True")
            if max(self.layers) >= len(hs):
                raise ExtractError(f"extract.layers {self.layers}: the model returned only {len(hs)} hidden states")
            get = hs.__getitem__
        hidden = torch.stack([get(i).to(self.device) for i in self.layers], dim=2)  # [B, T, 3, H]
        hidden = hidden.reshape(-1, 3, hidden.shape[-1])[flat].to(torch.bfloat16)
        if cap is not None:
            cap.captured.clear()
        return hidden

    def _decide_capture(self, ids, mask) -> None:
        """Hooks (only 3 states kept) when they give HF's own hidden states bit for bit on a probe."""
        probe_len = min(int(mask[0].sum()), 64)
        pid, pm = ids[:1, :probe_len], mask[:1, :probe_len]
        why = None
        try:
            with LayerCapture(self.model, self.layers) as cap:
                out = self.model(input_ids=pid, attention_mask=pm, output_hidden_states=True, use_cache=False)
            why = compare_with_hidden_states(cap, out.hidden_states)
        except CaptureError as e:
            why = str(e)
        self.capture = "hooks" if why is None else "hidden_states"
        self.capture_check = {"path": self.capture, "why": why}
        if why is not None:
            print(f"extract: capturing layers with output_hidden_states (all {self.model.config.num_hidden_layers}"
                  f"+1 states per batch): {why}", file=sys.stderr)

    def _decide(self, ids, mask) -> None:
        """Check the chunked-head path against the model's own logits on a short probe."""
        import torch

        probe_len = min(int(mask[0].sum()), 64)
        pid, pm = ids[:1, :probe_len], mask[:1, :probe_len]
        if self.head is None:
            self.logits_path = "model"
            return
        _, x = self._forward_capture(pid, pm)
        mine = torch.log_softmax(self.head(x[0]).float(), -1)
        ref = torch.log_softmax(self.model(input_ids=pid, attention_mask=pm, use_cache=False).logits[0].float(), -1)
        if mine.shape != ref.shape:
            diff = float("inf")
        else:
            diff = float((mine.to(ref.device) - ref).abs().max())
        tol = 1e-3 if ref.dtype == torch.float32 and x.dtype == torch.float32 else 5e-2
        self.logits_path = "head" if diff <= tol else "model"
        self.check = {"max_abs_logprob_diff": diff, "tol": tol, "path": self.logits_path}
        if self.logits_path == "model":
            print(f"extract: the model transforms logits after its lm_head (max |d log p| = {diff:.3g} on a "
                  f"probe); using the model's full logits, reduced chunk by chunk", file=sys.stderr)


def _input_device(model):
    import torch

    emb = model.get_input_embeddings()
    try:
        return next(emb.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# --------------------------------------------------------------------------- non-finite features


def fp8_scales(packed):
    """The fp16 scales [rows, 3] of a quantize_packed tensor (its last two bytes per token per layer)."""
    import torch

    return packed[..., -2:].contiguous().view(torch.float16).squeeze(-1)


class FiniteCheck:
    """Stage 1 stops on the first non-finite hidden state, fp8 scale or top-K log-probability.

    Per batch one min/max reduction on the device (schemas.finite.device_all_finite) gives a
    device bool; it is read when the next batch has been computed (the GPU has finished the
    batch by then: no extra synchronisation) and, for the last batch of a shard, before the
    shard may commit. On a hit the batch is run again to say which sample, token and layer.
    """

    def __init__(self, ext: "Extractor", fp8: bool):
        self.ext, self.fp8 = ext, fp8
        self.pending: Optional[tuple] = None

    def add(self, plan, batch, ids, mask, hidden, tlps) -> None:
        from schemas.finite import device_all_finite

        flag = device_all_finite(fp8_scales(hidden) if self.fp8 else hidden, tlps)
        self.settle()
        self.pending = (plan, batch, ids, mask, flag)

    def settle(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None and not bool(pending[-1]):
            raise ExtractError(self.locate(*pending[:-1]))

    def locate(self, plan, batch, ids, mask) -> str:
        """Where the non-finite value is: the batch again, row by row (slow path, once)."""
        import torch

        hidden, _tids, tlps = self.ext(ids, mask)
        checks = [("hidden state", torch.isfinite(hidden.float()).all(-1), True)]  # [rows, 3]
        if self.fp8:
            checks.append(("fp8 scale (a hidden state beyond the fp16 scale range)",
                           torch.isfinite(fp8_scales(quantize_packed(hidden)).float()), True))
        checks.append(("top-K log-probability", torch.isfinite(tlps.float()).all(-1, keepdim=True), False))
        lengths = np.array([len(plan.input_ids[j]) for j in batch])
        starts = np.concatenate([[0], np.cumsum(lengths)])
        for what, ok, per_layer in checks:
            bad = torch.nonzero(~ok)
            if len(bad):
                row, slot = (int(x) for x in bad[0].tolist())
                j = int(np.searchsorted(starts, row, side="right") - 1)
                layer = f", layer {self.ext.layers[slot]} (HF hidden_states index)" if per_layer else ""
                dtype = _dtype_name(next(self.ext.model.parameters()).dtype)
                hint = ("check the checkpoint: it computes inf/NaN even in float32" if dtype == "float32" else
                        "try target.dtype=float32 (or bfloat16 instead of float16)")
                return (f"extract: non-finite {what} in sample {int(plan.sample_index[batch[j]])} (shard {plan.shard}, "
                        f"token {row - starts[j]} of {lengths[j]}){layer}: the target overflows in {dtype} on this "
                        f"input. Nothing of shard {plan.shard} was written; {hint}")
        samples = ", ".join(str(int(plan.sample_index[j])) for j in batch)
        return (f"extract: non-finite values in the batch of samples {samples} (shard {plan.shard}), not reproduced "
                f"when run again; nothing of shard {plan.shard} was written")


# --------------------------------------------------------------------------- cache identity


def _sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def data_fingerprint(paths: Sequence[str]) -> list[dict]:
    out = []
    for p in paths:
        q = Path(p).expanduser()
        if q.is_file():
            out.append({"path": str(p), "sha256": file_sha256(q)})
        elif q.is_dir():
            h = hashlib.sha256()
            for f in sorted(x for x in q.rglob("*") if x.is_file()):
                h.update(str(f.relative_to(q)).encode() + b"\0" + file_sha256(f).encode())
            out.append({"path": str(p), "sha256": h.hexdigest()})
        else:
            out.append({"path": str(p), "sha256": None})
    return out


def _weight_files(hf_dir: Path) -> list[Path]:
    return [f for f in sorted(hf_dir.iterdir())
            if f.suffix in (".safetensors", ".bin", ".pt", ".gguf") or f.name.endswith(".index.json")]


def weights_fingerprint(hf_dir: Path) -> str:
    """Names and sizes of the weight files (kept for old caches; weights_sampled_sha256 is the identity)."""
    h = hashlib.sha256()
    for f in _weight_files(hf_dir):
        h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return h.hexdigest()


SAMPLED_BLOCKS, SAMPLED_BLOCK_BYTES = 16, 1 << 16
_CONTENT_MEMO: dict[tuple, str] = {}


def weights_sampled_sha256(hf_dir: Path) -> str:
    """The target's content identity: sha256 over each weight file's name and size and 16 blocks of 64 KiB
    at evenly spaced offsets (the first holds a safetensors/GGUF header: names, shapes, dtypes).

    Reads at most 1 MiB per file, so it costs milliseconds for any model; any fine-tune or
    other checkpoint of the same shapes changes every block it reads. Remembered per process
    by (path, size, mtime) of every file."""
    files = _weight_files(hf_dir)
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _CONTENT_MEMO:
        h = hashlib.sha256(f"sampled-{SAMPLED_BLOCKS}x{SAMPLED_BLOCK_BYTES}\n".encode())
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.name}:{size}\n".encode())
            last = max(0, size - SAMPLED_BLOCK_BYTES)
            offsets = sorted({round(i * last / (SAMPLED_BLOCKS - 1)) for i in range(SAMPLED_BLOCKS)})
            with open(f, "rb") as fh:
                for off in offsets:
                    h.update(os.pread(fh.fileno(), SAMPLED_BLOCK_BYTES, off))
        _CONTENT_MEMO[key] = h.hexdigest()
    return _CONTENT_MEMO[key]


def embed_scale(model, probe_ids=None) -> float:
    """The factor between the raw embedding matrix and what the first layer sees.

    MiniCPM multiplies by config.scale_emb, Gemma by sqrt(hidden_size) (rounded to
    its dtype). Read from the embedding module (transformers' scaled embeddings) or
    the config, then confirmed on a probe against hidden_states[0].
    """
    import torch
    import torch.nn.functional as F

    emb = model.get_input_embeddings()
    scale = getattr(emb, "embed_scale", None)
    if scale is None:
        c = model.config
        scale = getattr(c, "scale_emb", None)
        if scale is None and getattr(c, "model_type", "").startswith("gemma"):
            scale = c.hidden_size ** 0.5
    scale = float(scale.item() if torch.is_tensor(scale) else (scale if scale is not None else 1.0))
    if probe_ids is not None:
        with torch.no_grad():
            ids = probe_ids.to(emb.weight.device)
            try:
                out = model(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)
            except TypeError:  # remote code without logits_to_keep
                out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
            hs0 = out.hidden_states[0].float()
            raw = F.embedding(ids, emb.weight).float().to(hs0.device)
            nz = raw.abs() > 1e-6
            measured = float((hs0[nz] / raw[nz]).median()) if nz.any() else scale
        if abs(measured - scale) > 1e-2 * max(1.0, abs(scale)):
            print(f"extract: warning: hidden_states[0] / embed_tokens = {measured:.6g} but the model/config "
                  f"says {scale:.6g}; recording the config's value as embed_scale", file=sys.stderr)
    return scale


def _config_sha(hf_dir: Path) -> str:
    p = hf_dir / "config.json"
    return file_sha256(p) if p.is_file() else ""


def _tokenizer_sha(tok) -> tuple[str, str]:
    backend = getattr(tok, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    specials = json.dumps({k: str(v) for k, v in sorted(tok.special_tokens_map.items())})
    return _sha256_bytes((blob + specials).encode()), _sha256_bytes((tok.chat_template or "").encode())


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def cache_identity(cfg: RunConfig, model, tok, hf_dir: Path, layers: list[int], paths: Sequence[str],
                   num_samples: int, which: str) -> dict:
    import schemas

    c = model.config
    tok_sha, tmpl_sha = _tokenizer_sha(tok)
    head = model.get_output_embeddings()
    V = int(head.weight.shape[0]) if head is not None and hasattr(head, "weight") else int(c.vocab_size)
    S = cfg.extract.samples_per_shard
    return {
        "schema": SCHEMA_ID,
        "tool_version": getattr(schemas, "__version__", "0"),
        "split": which,
        "target": {
            "path": cfg.target.path,
            "hf_dir": str(hf_dir),
            "model_type": c.model_type,
            "architectures": list(getattr(c, "architectures", None) or []),
            "num_hidden_layers": int(c.num_hidden_layers),
            "hidden_size": int(c.hidden_size),
            "vocab_size": int(V),
            "config_sha256": _config_sha(hf_dir),
            "weights_fingerprint": weights_fingerprint(hf_dir),
            "weights_sampled_sha256": weights_sampled_sha256(hf_dir),
            "dtype": _dtype_name(next(model.parameters()).dtype),
            "embed_scale": None,  # filled by prepare_cache
        },
        "tokenizer": {"sha256": tok_sha, "chat_template_sha256": tmpl_sha, "size": len(tok),
                      "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        "layers": list(layers),
        "topk": int(cfg.extract.topk),
        "max_length": int(cfg.data.max_length),
        "truncation": cfg.data.truncation,
        "data": {"sources": data_fingerprint(paths), "num_samples": int(num_samples)},
        "samples_per_shard": int(S),
        "num_shards": int(math.ceil(num_samples / S)) if num_samples else 0,
        "hidden_dtype": HIDDEN_DTYPES[cfg.extract.hidden_dtype],
        **({"hidden_scale": "float16 per token per layer (schemas.fp8)"} if cfg.extract.hidden_dtype == "fp8" else {}),
        "codec": {"compressor": cfg.extract.compressor, "chunk_rows": cfg.extract.chunk_rows},
    }


# dotted key -> words for the refusal message
IDENTITY_KEYS = {
    "target.model_type": "target model type",
    "target.num_hidden_layers": "target (num_hidden_layers)",
    "target.hidden_size": "target (hidden_size)",
    "target.vocab_size": "target (vocab_size)",
    "target.config_sha256": "target (config.json sha256)",
    "target.weights_fingerprint": "target weights (file names/sizes)",
    "target.weights_sampled_sha256": "target weights (content: sha256 of sampled blocks)",
    "target.dtype": "target dtype",
    "tokenizer.sha256": "tokenizer",
    "tokenizer.chat_template_sha256": "chat template",
    "layers": "layers (extract.layers)",
    "topk": "K (extract.topk)",
    "max_length": "max length (data.max_length)",
    "truncation": "truncation (data.truncation)",
    "data.sources": "data (sources / sha256)",
    "data.num_samples": "data (number of samples)",
    "samples_per_shard": "samples per shard (extract.samples_per_shard)",
    "hidden_dtype": "hidden dtype (extract.hidden_dtype)",
}


def _get(d: dict, dotted: str):
    cur: Any = d
    for p in dotted.split("."):
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return cur


# keys that caches written before them lack: not compared there (prepare_cache warns)
NEWER_KEYS = ("target.weights_sampled_sha256",)


def identity_differences(have: dict, want: dict) -> list[str]:
    diffs = []
    for key, words in IDENTITY_KEYS.items():
        a, b = _get(have, key), _get(want, key)
        if key in NEWER_KEYS and a is None:
            continue
        if key == "target.weights_sampled_sha256" and a != b:
            diffs.append(f"{words}: cache has {a[:16]}... (target {_get(have, 'target.path')}), this run has "
                         f"{str(b)[:16]}... (target {_get(want, 'target.path')})")
            continue
        if key == "data.sources":
            a = [(s.get("path"), s.get("sha256")) for s in (a or [])]
            b = [(s.get("path"), s.get("sha256")) for s in (b or [])]
            if [x[1] for x in a] == [x[1] for x in b]:
                continue  # same content at another path is the same data
            a = [f"{p} ({(h or 'missing')[:12]})" for p, h in a]
            b = [f"{p} ({(h or 'missing')[:12]})" for p, h in b]
        if a != b:
            diffs.append(f"{words}: cache has {a!r}, this run has {b!r}")
    return diffs + _layout_differences(have, want)


def _layout_differences(have: dict, want: dict) -> list[str]:
    """Shards are assigned by samples_per_shard and shard_tokens: the cache's own assignment must hold."""
    from schemas.cache_check import shard_layout

    a, b = shard_layout(have), shard_layout(want)
    if a is None or b is None or a == b:
        return []
    hint = (" (it was made before token-sized shards: set extract.shard_tokens=null to extend it)"
            if have.get("shard_starts") is None else "")
    return [f"shard layout (extract.samples_per_shard / extract.shard_tokens): cache has {len(a) - 1} shards "
            f"starting at samples {a[:4]}..., this run makes {len(b) - 1} starting at {b[:4]}...{hint}"]


def prepare_cache(root: Path, identity: dict, model, tok, hf_dir: Path, probe_ids=None) -> dict:
    """Create cache.json + target/ (first worker), or check an existing cache.json matches."""
    cj = root / CACHE_JSON
    if cj.is_file():
        have = read_cache_json(root)
        if _get(have, "target.weights_sampled_sha256") is None:
            print(f"extract: warning: {cj} records no content hash of the target's weights (a cache written before "
                  f"it was recorded): only the weight files' names and sizes are compared, so another checkpoint "
                  f"of the same shapes would not be noticed", file=sys.stderr)
        diffs = identity_differences(have, identity)
        if diffs:
            raise CacheError(f"refusing to extract into {root}: it was made with a different "
                             + "; a different ".join(diffs)
                             + ". Use another extract.cache, or delete the cache to start over.")
        if not (root / TARGET_DIR / EMBED_FILE).is_file():
            _write_target_dir(root, model, tok, hf_dir, have["target"].get("embed_scale") or 1.0,
                              recorded=have.get("target_files"))
        return have
    if committed_shards(root):
        raise CacheError(f"{root} holds committed shards but no {CACHE_JSON}; refusing to add to it")
    identity = json.loads(json.dumps(identity))
    scale = embed_scale(model, probe_ids)
    identity["target"]["embed_scale"] = scale
    identity["embed_scale"] = scale
    mark(root, "cache", "eagle3 extract")  # what this directory is, for every later write or delete
    _write_target_dir(root, model, tok, hf_dir, scale)
    from schemas.cache_check import target_file_checksums

    identity["target_files"] = target_file_checksums(root / TARGET_DIR)  # readers check them on open
    tmp = root / f".{CACHE_JSON}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(identity, indent=1))
    os.replace(tmp, cj)  # concurrent first workers write the same content
    return identity


def _write_target_dir(root: Path, model, tok, hf_dir: Path, scale: float, recorded: Optional[dict] = None) -> None:
    """root/target/: the target's config, tokenizer and embedding, renamed into place when complete.

    An existing target/ without the embedding is replaced only when every file in it is one
    cache.json records (`recorded`); anything else there (e.g. `target.path` pointing into the
    cache directory) is never deleted.
    """
    from safetensors.torch import save_file

    from schemas.dirkind import remove_owned

    final = root / TARGET_DIR
    if (final / EMBED_FILE).is_file():
        return
    if final.exists() or final.is_symlink():  # before any work: refuse foreign files at once
        remove_owned(final, (recorded or {}).keys(), f"the cache's {TARGET_DIR}/ directory")
    tmp = root / f".target.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("config.json", "generation_config.json"):
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, tmp / name)
    tok.save_pretrained(str(tmp))
    w = model.get_input_embeddings().weight.detach().to("cpu").contiguous().clone()
    # the raw matrix; the model multiplies it by embed_scale (also in cache.json)
    save_file({"weight": w}, str(tmp / EMBED_FILE), metadata={"embed_scale": repr(float(scale))})
    head = output_head(model)
    if head is not None:
        save_file(head, str(tmp / LM_HEAD_FILE))
    layer = last_layer(model)
    if layer is not None:
        save_file(layer, str(tmp / LAYER_FILE))
    try:
        os.rename(tmp, final)
    except OSError:  # another worker won the race
        shutil.rmtree(tmp, ignore_errors=True)


def output_head(model) -> Optional[dict]:
    """The target's output head as stage 2 starts its own from it: {"weight": lm_head rows [V, H] with
    the logit scaling folded in (MiniCPM divides the last hidden by hidden_size / dim_model_base),
    "norm": the final norm's effective weight [H]}. The norm is read by applying it to a vector of
    ones, so Llama's RMSNorm (w) and Gemma's (1 + w) both come out as the factor they apply (up to
    1/sqrt(1 + eps)). None when the model has no output embedding or final norm to read."""
    import torch

    out = model.get_output_embeddings()
    decoder = getattr(model, "model", None)
    norm = getattr(decoder, "norm", None)
    if out is None or norm is None or getattr(out, "weight", None) is None:
        return None
    w = out.weight.detach().to("cpu")  # on the host: no fp32 copy of a [V, H] matrix on the GPU
    c = model.config
    scaling = getattr(c, "logits_scaling", None)
    if scaling is None and getattr(c, "dim_model_base", None):
        scaling = c.hidden_size / c.dim_model_base
    nw = norm.weight
    with torch.no_grad():
        eff = norm(torch.ones(1, w.shape[1], dtype=nw.dtype, device=nw.device)).reshape(-1)
    weight = (w.float() / float(scaling)).to(w.dtype) if scaling else w
    return {"weight": weight.contiguous(), "norm": eff.to("cpu", w.dtype).contiguous()}


LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def last_layer(model) -> Optional[dict]:
    """The target's last decoder layer as stage 2 can start its own layer from it: the seven Llama
    projections' weights ("self_attn.q_proj.weight", ...) and the two norms' effective weights (read
    by applying each norm to ones, as output_head does). None when the layer has another layout
    (extra norms around the MLP, as in Gemma 2/3, or different module names): the head then cannot
    take it as it is."""
    import torch

    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return None
    layer = layers[-1]
    names = {n for n, _ in layer.named_modules()}
    if not set(LAYER_LINEARS + LAYER_NORMS) <= names or {"pre_feedforward_layernorm", "post_feedforward_layernorm"} & names:
        return None
    out = {}
    for name in LAYER_LINEARS:
        out[f"{name}.weight"] = layer.get_submodule(name).weight.detach().to("cpu").contiguous().clone()
    for name in LAYER_NORMS:
        norm = layer.get_submodule(name)
        w = getattr(norm, "weight", None)
        if w is None:
            return None
        with torch.no_grad():
            eff = norm(torch.ones(1, w.shape[-1], dtype=w.dtype, device=w.device)).reshape(-1)
        out[f"{name}.weight"] = eff.to("cpu", w.dtype).contiguous()
    return out


# --------------------------------------------------------------------------- the run


@dataclass
class ExtractReport:
    cache: str
    worker: str
    shards_total: int
    shards_mine: int
    shards_skipped: int
    shards_written: int
    samples: int
    tokens: int
    wall_s: float  # forward + capture + writes, without loading the target or tokenizing
    compute_s: float
    writer_wait_s: float
    flush_s: float
    manifest: bool
    logits_path: str
    capture: str = "hooks"  # hooks (only extract.layers kept) or hidden_states (the full tuple, fallback)
    chunk_rows: int = 0  # rows per inner chunk of this cache
    window_tokens: int = 0  # batches are length-sorted inside windows of this many tokens
    peak_held_rows: int = 0  # most rows the writer held in partly filled chunks (< window_tokens + chunk_rows)


def worker_target_config(tcfg, w: Worker, cuda=None):
    """The target config for worker w: its own GPU (cuda:local_rank), made the current device.

    Without `torch.cuda.set_device`, every rank's "current" device stays cuda:0: its
    default stream, its allocator context and any event recorded without a stream.
    """
    if cuda is None:
        import torch

        cuda = torch.cuda
    if w.local_rank is None or tcfg.device_map or not cuda.is_available():
        return tcfg
    if tcfg.device == "auto":
        tcfg = tcfg.model_copy(update={"device": f"cuda:{w.local_rank}"})
    if str(tcfg.device).startswith("cuda"):
        cuda.set_device(tcfg.device if ":" in str(tcfg.device) else f"cuda:{w.local_rank}")
    return tcfg


def start_host_copy(tensors, device, cuda=None):
    """Queue device-to-host copies of `tensors` and an event the writer waits on before reading.

    The copies run on the current stream *of the tensors' device*, and the event is
    recorded on that same stream, so `event.synchronize()` returns only once the
    bytes are on the host; the writer checksums exactly what was copied.
    """
    if cuda is None:
        import torch

        cuda = torch.cuda
    stream = cuda.current_stream(device)
    with cuda.stream(stream):
        host = tuple(t.to("cpu", non_blocking=True) for t in tensors)
        ready = cuda.Event()
        ready.record(stream)
    return host, ready


def _sample_arrays(s) -> tuple[int, np.ndarray, np.ndarray]:
    return int(s.sample_index), np.asarray(s.input_ids, dtype=np.int32), np.asarray(s.loss_mask, dtype=np.uint8)


def _keep_rows(rows: list, starts: Sequence[int], todo: Sequence[int]) -> list:
    """rows with the entries of shards this worker does not write dropped (None)."""
    keep = [None] * len(rows)
    for k in todo:
        keep[starts[k]:starts[k + 1]] = rows[starts[k]:starts[k + 1]]
    return keep


def add_shard_layout(identity: dict, cfg: RunConfig, lengths: np.ndarray) -> None:
    """Record the token-sized shard layout and the inner chunk rows in the cache identity."""
    starts = shard_starts(lengths, cfg.extract.samples_per_shard, cfg.extract.shard_tokens)
    identity["shard_tokens"] = cfg.extract.shard_tokens
    identity["shard_starts"] = [int(x) for x in starts]
    identity["num_shards"] = len(starts) - 1
    rows = cfg.extract.chunk_rows
    identity["codec"]["chunk_rows"] = auto_chunk_rows(lengths) if rows == "auto" else int(rows)


def run_extract(cfg: RunConfig, *, worker: Any = None, which: str = "train", progress: bool = True,
                samples: Optional[list] = None, target: Optional[tuple] = None,
                report: Optional[dict] = None, summary: Optional[bool] = None) -> Path:
    """Extract this worker's shards of data.<which> into the cache; returns the cache dir.

    `samples` / `target` (model, tok, hf_dir) skip tokenizing / loading (benchmarks,
    tests); `report` is filled with an ExtractReport dict; `summary` (default: `progress`)
    prints the final one-line summary on stderr.
    """
    import torch

    from schemas.cache import cache_lock
    from schemas.config import check_topk

    if which not in ("train", "eval"):
        raise ValueError(f"which must be 'train' or 'eval', not {which!r}")
    w: Worker = resolve_worker(worker)
    root = Path(cfg.extract.cache if which == "train" else cfg.eval_cache)
    paths = list(cfg.data.train if which == "train" else cfg.data.eval)
    if samples is None and not paths:
        raise ExtractError(f"data.{which} is empty: nothing to extract into {root}")
    # a model's directory, a file, or a directory of someone else's files is never a cache
    ensure_writable(root, ("missing", "empty", "cache"), "extract.cache" if which == "train" else "the eval cache",
                    hint="Choose a new or empty directory for the cache (or an existing eagle3 cache to resume).")

    if target is None:
        from schemas.target import load_target

        target = load_target(worker_target_config(cfg.target, w))
    model, tok, hf_dir = target
    hf_dir = Path(hf_dir)
    data_stats = None
    if samples is None:
        from stage1_extract.tokenize import build_samples

        samples, data_stats = build_samples(cfg, tok, paths=paths, progress=progress and w.rank == 0)
    if not samples:
        raise ExtractError(f"data.{which}: no usable samples in {paths}")
    rows = [_sample_arrays(s) for s in samples]
    if any(rows[i][0] >= rows[i + 1][0] for i in range(len(rows) - 1)):
        raise ExtractError("samples must be ordered by sample_index (strictly increasing)")
    lengths = np.array([len(r[1]) for r in rows], dtype=np.int64)

    layers = resolve_layers(cfg.extract.layers, int(model.config.num_hidden_layers))
    identity = cache_identity(cfg, model, tok, hf_dir, layers, paths, len(rows), which)
    check_topk(cfg.extract.topk, identity["target"]["vocab_size"])  # before cache.json exists
    if data_stats is not None:
        st = asdict(data_stats) if is_dataclass(data_stats) else dict(vars(data_stats))
        identity["data"]["stats"] = {k: v for k, v in st.items() if k not in ("lengths", "skipped_index")}
    add_shard_layout(identity, cfg, lengths)
    probe = torch.from_numpy(rows[0][1][:32].astype(np.int64))[None]
    with cache_lock(root, f"preparing the cache (extract worker {w})"):  # one writer of cache.json / target/
        meta = prepare_cache(root, identity, model, tok, hf_dir, probe_ids=probe)

    starts = identity["shard_starts"]  # prepare_cache checked that the cache has the same layout
    chunk_rows = int((meta.get("codec") or {}).get("chunk_rows") or identity["codec"]["chunk_rows"])
    n_shards = len(starts) - 1
    mine = [k for k in range(n_shards) if w.owns(k)]
    done = set(committed_shards(root))
    todo = [k for k in mine if k not in done]
    rows = _keep_rows(rows, starts, todo)  # the token arrays of other workers' shards are not held
    samples = None
    H, K, V = meta["target"]["hidden_size"], meta["topk"], meta["target"]["vocab_size"]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    ext = Extractor(model, layers, K, cfg.extract.logits_chunk_tokens)
    writer = ShardWriter(root, hidden_size=H, topk=K, vocab_size=V, compressor=cfg.extract.compressor,
                         chunk_rows=chunk_rows, queue_size=cfg.extract.writer_queue,
                         hidden_dtype=cfg.extract.hidden_dtype, threads=cfg.extract.writer_threads,
                         shard_extra=lambda p: {"sample_range": [int(p.sample_index[0]), int(p.sample_index[-1]) + 1],
                                                "hidden_size": H, "topk": K, "layers": layers})
    writer.claim_worker(w.rank, w.world)  # a second process with this worker id stops here
    total_samples = sum(starts[k + 1] - starts[k] for k in todo)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_samples, unit="sample", desc=f"extract {which} {w}",
                   position=w.rank if w.world > 1 and w.source == "torchrun" else None, dynamic_ncols=True)
    cuda = ext.device.type == "cuda"
    if cuda:  # this process's GPU is the current one (streams, events, allocator)
        torch.cuda.set_device(ext.device)
    finite = FiniteCheck(ext, fp8=cfg.extract.hidden_dtype == "fp8")
    t0 = time.perf_counter()
    compute_s = 0.0
    n_samples = n_tokens = 0
    try:
        for k in todo:
            lo, hi = starts[k], starts[k + 1]
            plan = ShardPlan(k, np.array([r[0] for r in rows[lo:hi]], dtype=np.int64),
                             [r[1] for r in rows[lo:hi]], [r[2] for r in rows[lo:hi]])
            writer.begin_shard(plan)
            for batch in shard_batches(lengths[lo:hi], cfg.extract.max_tokens_per_batch, window_tokens(cfg)):
                tc = time.perf_counter()
                ids, mask = pad_batch([plan.input_ids[j] for j in batch], pad_id)
                hidden, tids, tlps = ext(ids, mask)
                if cfg.extract.hidden_dtype == "fp8":  # on the device: half the bytes to copy and store
                    hidden = quantize_packed(hidden)
                finite.add(plan, batch, ids, mask, hidden, tlps)  # a device flag, read one batch later
                ready = None
                if cuda:  # start the copy to the host; the writer waits on the event, not the compute loop
                    (hidden, tids, tlps), ready = start_host_copy((hidden, tids, tlps), ext.device)
                compute_s += time.perf_counter() - tc
                writer.put_batch(BatchResult(k, batch, hidden, tids, tlps, ready))
                ntok = int(mask.sum())
                n_samples += len(batch)
                n_tokens += ntok
                if bar is not None:
                    el = max(time.perf_counter() - t0, 1e-9)
                    bar.update(len(batch))
                    bar.set_postfix_str(f"shard {k} | {n_tokens / el:,.0f} tok/s | queue {writer.depth}", refresh=False)
            finite.settle()  # every batch of shard k is finite before the shard can commit
            writer.end_shard(k)
        writer.close()
    except BaseException:
        writer.abort()
        if bar is not None:
            bar.close()
        raise
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    manifest = False
    if len(committed_shards(root)) == n_shards:  # the last worker to finish writes the manifest
        build_manifest(root)
        manifest = True
    rep = ExtractReport(str(root), str(w), n_shards, len(mine), len(mine) - len(todo), len(writer.committed),
                        n_samples, n_tokens, wall, compute_s, writer.wait_s, writer.flush_s, manifest,
                        ext.logits_path, ext.capture, chunk_rows, window_tokens(cfg), writer.peak_held_rows)
    if report is not None:
        report.update(asdict(rep))
    if progress if summary is None else summary:
        print(f"extract {which} worker {w}: {rep.shards_written} shards written, {rep.shards_skipped} already "
              f"committed (of {len(mine)} mine, {n_shards} total); {n_samples} samples, {n_tokens} tokens in "
              f"{wall:.1f}s ({n_tokens / max(wall, 1e-9):,.0f} tok/s); waited on the writer {writer.wait_s:.1f}s, "
              f"which held at most {writer.peak_held_rows:,} rows in partly filled chunks; "
              f"{'manifest written' if manifest else 'manifest left to the last worker'} -> {root}",
              file=sys.stderr, flush=True)
    return root
