"""`eagle3 plan`: what each stage will need, from the config and the target's config.json alone.

No weights are read and nothing is run. Every figure is a formula of the shapes in
the target's config.json, the run config and the DeepSpeed JSON, written below next
to the code that it models; `tests/test_plan.py` and `bench/plan_vs_measured.py`
check them against measurements (shards stats, peak RSS on the CPU), and
`bench/gpu_check.py` prints the plan next to the peaks it measures on a GPU.

Data-set size: counted from the data files (conversations, cheap) and tokenized on an
evenly spaced probe of at most `probe` conversations with the target's tokenizer (its
files only); the mean probe length times the conversation count is the token total.
With `data.regenerate.enabled`, the files hold prompts only: every assistant turn is
counted as `max_new_tokens` tokens (an upper bound), capped at `data.max_length`.
`--tokens` / `--samples` replace the count (no data files needed).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

GiB = 2 ** 30

# Bytes on disk per stored byte with zstd (extract.compressor's default), measured with
# `eagle3 shards stats` on a SmolLM2-135M-Instruct cache (48 AlpacaEval conversations,
# max_length 1024, top-64; configs/minicpm4-8b.yaml): hidden 1.628 B per bf16 value,
# top-K ids 2.142 B per id, top-K log-probs 1.584 B per value, ids/mask/index 2.4 B a token.
# Real activations; a random target's compress less. fp8 hidden states: not measured, raw.
ZSTD_RATIO = {"hidden_bf16": 1.628 / 2, "hidden_fp8": 1.0, "topk_ids": 2.142 / 4, "topk_logprobs": 1.584 / 2}
ZSTD_SMALL_PER_TOKEN = 2.4  # input_ids + loss_mask + offsets/sample_index, per token

# Reference GPU: H100 SXM, dense bf16.
DEFAULT_GPU_MEM = 80 * GiB
DEFAULT_PEAK_TFLOPS = 989.0
DEFAULT_MFU = 0.35
HEADROOM = 0.9  # a job that plans more than this share of the GPU's memory gets a warning

LOSS_CHUNK_TOKENS = 2048       # stage2_train.losses.LOSS_CHUNK_TOKENS
SCORE_BLOCK_ELEMENTS = 1 << 26  # stage2_train.ttt_attention.SCORE_BLOCK_ELEMENTS


class PlanError(ValueError):
    pass


# --------------------------------------------------------------------------- shapes


@dataclass
class Shape:
    """A decoder-only target as its config.json describes it (Llama-like layers)."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, c: dict) -> "Shape":
        try:
            h, nh = int(c["hidden_size"]), int(c["num_attention_heads"])
            return cls(model_type=str(c.get("model_type", "?")), hidden=h, layers=int(c["num_hidden_layers"]),
                       heads=nh, kv_heads=int(c.get("num_key_value_heads") or nh),
                       head_dim=int(c.get("head_dim") or h // nh), intermediate=int(c["intermediate_size"]),
                       vocab=int(c["vocab_size"]), tied=bool(c.get("tie_word_embeddings", False)))
        except KeyError as e:
            raise PlanError(f"the target's config.json has no {e.args[0]!r}") from None

    def layer_params(self) -> int:
        h, a, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return h * a + 2 * h * kv + a * h + 3 * h * self.intermediate + 2 * h

    def params(self) -> int:
        emb = self.vocab * self.hidden
        return emb * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden


def head_params(s: Shape, draft_vocab: int) -> int:
    """Trainable parameters of the EAGLE-3 head (stage2_train.model.Eagle3Draft): fc 3h->h,
    q/k/v reading 2h, o, the target's MLP width, 4 norms, lm_head over the draft vocab."""
    h, a, kv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    return 3 * h * h + 2 * h * a + 2 * (2 * h * kv) + a * h + 3 * h * s.intermediate + 4 * h + draft_vocab * h


def load_target_shape(cfg, target_config: Optional[str] = None) -> tuple[Shape, str]:
    """(shape, where it came from): --target-config, else target.path's config.json (an HF
    directory, or the cached conversion of a GGUF target)."""
    if target_config:
        p = Path(target_config)
    else:
        from schemas.target import TargetError, converted_dir, gguf_location

        try:
            g = gguf_location(cfg.target)
            p = (converted_dir(cfg.target) if g is None else _gguf_conversion(cfg.target)) / "config.json"
        except TargetError as e:
            raise PlanError(f"{e}; give the target's config.json with --target-config FILE") from None
    if not p.is_file():
        raise PlanError(f"{p}: no such file (the target's config.json; --target-config FILE)")
    try:
        return Shape.from_config(json.loads(p.read_text())), str(p)
    except json.JSONDecodeError as e:
        raise PlanError(f"{p}: not valid JSON: {e}") from None


def _gguf_conversion(tcfg) -> Path:
    """The converted HF dir of a GGUF target, only if it exists (the plan never converts)."""
    from schemas.target import TargetError, conversion_dir, gguf_location

    out = conversion_dir(tcfg, gguf_location(tcfg))
    if not (out / "config.json").is_file():
        raise TargetError(f"target {tcfg.path} is a GGUF file that was never converted (any stage converts it once)")
    return out


# --------------------------------------------------------------------------- data


@dataclass
class DataSize:
    samples: int
    tokens: int
    how: str

    @property
    def mean(self) -> float:
        return self.tokens / max(self.samples, 1)


def count_data(cfg, *, tokens: Optional[int] = None, samples: Optional[int] = None, probe: int = 256) -> DataSize:
    """Samples and tokens of data.train (see the module docstring for the rule)."""
    d = cfg.data
    if tokens is not None or samples is not None:
        if tokens is None:
            return DataSize(samples, samples * d.max_length // 2, "--samples, mean length max_length/2 assumed")
        if samples is None:
            samples = max(1, math.ceil(tokens / (d.max_length / 2)))
            return DataSize(samples, tokens, "--tokens, mean length max_length/2 assumed for the sample count")
        return DataSize(samples, tokens, "--tokens/--samples")
    if not d.train:
        raise PlanError("data.train is empty: give --tokens (and --samples) instead")
    from schemas.target import TargetError, load_tokenizer
    from stage1_extract.conversations import load_conversations

    regen = d.regenerate.enabled
    convs, _ = load_conversations(list(d.train), on_error="skip", max_samples=d.max_samples,
                                  require_assistant=not regen)
    if not convs:
        raise PlanError(f"data.train {d.train}: no conversations")
    try:
        tok = load_tokenizer(cfg.target)
    except TargetError as e:
        raise PlanError(f"{e}; the plan tokenizes a probe of the data: give --tokens instead") from None
    step = max(1, len(convs) // probe)
    lens = [_probe_tokens(tok, c.messages, d.max_length, d.regenerate.max_new_tokens if regen else None)
            for c in convs[::step][:probe]]
    mean = sum(lens) / len(lens)
    how = (f"{len(convs):,} conversations in data.train, {len(lens)} tokenized"
           + (f", assistant turns counted as {d.regenerate.max_new_tokens} tokens (regenerate)" if regen else ""))
    return DataSize(len(convs), int(round(mean * len(convs))), how)


def _probe_tokens(tok, messages: list[dict], max_length: int, answer_tokens: Optional[int]) -> int:
    """Tokens of one conversation as the chat template renders it, capped at max_length; with
    `answer_tokens` (regeneration), its prompts plus that many tokens per answer to come."""
    if answer_tokens is None:
        text = tok.apply_chat_template(messages, tokenize=False)
        extra = 0
    else:
        users = [m for m in messages if m["role"] != "assistant"]
        text = tok.apply_chat_template(users, tokenize=False, add_generation_prompt=True)
        extra = answer_tokens * sum(1 for m in users if m["role"] == "user")
    return min(len(tok(text, add_special_tokens=False)["input_ids"]) + extra, max_length)


# --------------------------------------------------------------------------- stage 1: cache


def cache_bytes_per_token(s: Shape, topk: int, hidden_dtype: str = "bf16", compressor: str = "zstd") -> dict:
    """Raw and on-disk bytes per token of a shard (DESIGN.md section 4 layout).

    raw = input_ids 4 + loss_mask 1 + offsets/sample_index (16 per sample, ~0 per token)
          + hidden 3 x H x 2 (bf16) or 3 x (H + 2) (fp8 e4m3 + fp16 scale)
          + top-K ids 4K + top-K log-probs 2K
    disk = the same arrays times the measured zstd ratios (ZSTD_RATIO); 'none' stores raw.
    """
    H, K = s.hidden, topk
    hid = 3 * H * 2 if hidden_dtype == "bf16" else 3 * (H + 2)
    raw = {"hidden": hid, "topk_ids": 4 * K, "topk_logprobs": 2 * K, "small": 5}
    if compressor == "none":
        disk = dict(raw)
    else:
        disk = {"hidden": hid * ZSTD_RATIO["hidden_bf16" if hidden_dtype == "bf16" else "hidden_fp8"],
                "topk_ids": 4 * K * ZSTD_RATIO["topk_ids"], "topk_logprobs": 2 * K * ZSTD_RATIO["topk_logprobs"],
                "small": ZSTD_SMALL_PER_TOKEN}
    return {"raw": sum(raw.values()), "disk": sum(disk.values()), "parts": disk}


def pow2ceil(n: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def stage1_host_bytes(row_bytes: float, disk_row_bytes: float, load_bytes: int, *, batch_arrays: list[float],
                      pinned: bool, data_tokens: int, mean_tokens: float, shard_tokens: float, window_tokens: int,
                      chunk_rows: int, writer_queue: int, writer_threads: int) -> dict:
    """Host memory of one extraction worker with the streaming writer (stage1_extract/writer.py,
    schemas/cache_write.py; shards sized by tokens, chunks written as their rows fill).
    r = raw row bytes (3H x 2 + 6K, +6 with fp8 scales), d = its on-disk bytes, C = chunk_rows,
    Q = writer_queue, T = writer_threads, n = samples of a window:

        queued  = (Q + 2) x one batch: Q in the queue, one the writer thread is putting in place,
                  one the compute loop holds while it waits for a free slot (the writer is the
                  slower side on a GPU). One batch = its trimmed arrays at max_tokens_per_batch
                  rows (batch_arrays, bytes each; padding makes real batches a few % smaller); on CUDA they are pinned copies, and torch's
                  caching host allocator rounds each to a power of two and keeps the blocks.
        held    = partly filled chunks: a sample's interior chunks go straight to compression,
                  the chunk that holds the boundary between two neighbours waits until both
                  are computed. Samples finish in length order, which is unrelated to their
                  position, so half-way through a window half of its n - 1 inner boundaries
                  (and the one with the previous window) wait, each with C / 2 rows filled on
                  average: (n + 1) / 2 x C / 2 rows, window = min(window_tokens, shard tokens),
                  n = window / mean length (the writer's `peak_held_rows` measures it; a buffer
                  is allocated C rows but its pages are touched as rows fill). Bounded by
                  (window + C) rows whatever the lengths (`held_bound`).
        compress = (T + 1) chunks of C rows in flight per array, raw and compressed (T > 1;
                  with T = 1 a chunk is compressed in place: its C x d output alone)
        tokens  = 5 bytes (int32 id + uint8 mask) per token of the whole data set: every worker
                  tokenizes all of it to compute the same shard layout (freed after, but the
                  many small arrays leave the heap at that size)
        load    = the target's weights in host memory: only on a CPU target; on a GPU they go
                  from the memory-mapped safetensors to the device (file pages, not anonymous)
        total   = load + buffer, buffer = queued + held + compress + tokens

    Nothing here grows with the shard or the data set except `tokens` (DESIGN.md section 8).
    """
    batch = sum(pow2ceil(b) if pinned else b for b in batch_arrays)
    queued = (writer_queue + 2) * batch
    window = max(1.0, min(window_tokens, shard_tokens))
    n = window / max(mean_tokens, 1.0)
    held = min((n + 1) / 2 * chunk_rows / 2, window + chunk_rows) * row_bytes
    held_bound = (window + chunk_rows) * row_bytes
    compress = ((writer_threads + 1) * chunk_rows * (row_bytes + disk_row_bytes) if writer_threads > 1
                else chunk_rows * disk_row_bytes)
    tokens = 5 * data_tokens
    buffer = queued + held + compress + tokens
    return {"batch": batch, "queued": queued, "held": held, "held_bound": held_bound, "compress": compress,
            "tokens": tokens, "buffer": buffer, "load": load_bytes, "total": load_bytes + buffer}


def feature_arrays_per_token(s: Shape, topk: int, hidden_dtype: str = "bf16") -> list[int]:
    """Bytes per token of the arrays a batch hands to the writer: hidden [3, H] bf16 (or fp8 bits +
    fp16 scales), top-K ids int32, top-K log-probs fp16."""
    hid = 3 * s.hidden * 2 if hidden_dtype == "bf16" else 3 * (s.hidden + 2)
    return [hid, 4 * topk, 2 * topk]


def stage1_host_plan(cfg, s: Shape, data: DataSize, cache: dict) -> dict:
    """stage1_host_bytes for a run config: the window, chunk rows and shard size stage 1 will use."""
    from stage1_extract.extract import auto_chunk_rows, window_tokens

    e = cfg.extract
    per = feature_arrays_per_token(s, e.topk, e.hidden_dtype)
    on_cpu = str(cfg.target.device) == "cpu"
    dtype_bytes = 4 if cfg.target.dtype == "float32" else 2
    shard = e.samples_per_shard * data.mean
    if e.shard_tokens:
        shard = min(shard, max(e.shard_tokens, data.mean))
    rows = auto_chunk_rows([data.mean]) if e.chunk_rows == "auto" else int(e.chunk_rows)
    threads = e.writer_threads or 4  # 0 = up to 4 cores (stage1_extract.writer); a GPU node has them
    h = stage1_host_bytes(sum(per), cache["disk"] - cache["parts"]["small"],
                          s.params() * dtype_bytes if on_cpu else 0,
                          batch_arrays=[b * e.max_tokens_per_batch for b in per], pinned=not on_cpu,
                          data_tokens=data.tokens, mean_tokens=data.mean, shard_tokens=shard,
                          window_tokens=window_tokens(cfg), chunk_rows=rows, writer_queue=e.writer_queue,
                          writer_threads=threads)
    return {**h, "chunk_rows": rows, "window_tokens": window_tokens(cfg), "shard_tokens": shard,
            "writer_threads": threads}


def stage1_gpu_bytes(s: Shape, *, dtype_bytes: int, tokens: int, chunk_tokens: int) -> dict:
    """Target weights + one batch of `tokens` (extract.max_tokens_per_batch, padded) in flight:

        per token: the 3 captured layers 3H, the residual and its norm 2H, q/k/v H + 2 x kv x d,
                   the attention output H, the MLP's gate/up/act 3I   (x dtype bytes)
        logits:    3 x fp32 [chunk, V] (the head's logits, log-softmax, top-K work), chunk = logits_chunk_tokens
    """
    kv = s.kv_heads * s.head_dim
    per_token = dtype_bytes * (3 * s.hidden + 2 * s.hidden + s.hidden + 2 * kv + s.hidden + 3 * s.intermediate)
    logits = 3 * 4 * min(tokens, chunk_tokens) * s.vocab
    weights = s.params() * dtype_bytes
    return {"weights": weights, "activations": tokens * per_token + logits,
            "total": weights + tokens * per_token + logits}


# --------------------------------------------------------------------------- stage 2


@dataclass
class DSPlan:
    zero_stage: int
    bf16: bool
    reduce_bucket: int
    allgather_bucket: int

    @classmethod
    def from_json(cls, path: str) -> "DSPlan":
        p = Path(path)
        if not p.is_file():
            raise PlanError(f"train.deepspeed: {p} not found")
        ds = json.loads(p.read_text())
        z = ds.get("zero_optimization") or {}
        half = bool((ds.get("bf16") or {}).get("enabled") or (ds.get("fp16") or {}).get("enabled"))
        return cls(int(z.get("stage", 0)), half, int(float(z.get("reduce_bucket_size", 5e8))),
                   int(float(z.get("allgather_bucket_size", 5e8))))


def ttt_activation_bytes(s: Shape, *, draft_vocab: int, tokens: int, seq_len: int, ttt: int, half: bool) -> dict:
    """Activation memory of one micro-batch of `tokens` rows (B x L = tokens, L = seq_len) through
    `ttt` TTT steps (stage2_train.losses.ttt_forward), per rank.

    kept (saved for backward), per token per step, measured with saved-tensor hooks at small
    shapes (bench/plan_vs_measured.py --kept) and linear in each width:
        fp32 weights: 74 H + 16 I + 7 heads + 180 bytes      bf16 weights: 55 H + 8 I + 7 heads + 180 bytes
        + 4 N bytes when the micro-batch fits one loss chunk (else the chunks are recomputed)
    transient (the largest of the backward's temporaries):
        a loss chunk's fp32 [chunk, N] logits, log-softmax and gradient: 12 x min(tokens, 2048) x N
        the log-sum-exp's fp32 score blocks: 12 x min(B x heads x L^2, 2^26)
        the MLP's gate/up/act gradients: 3 x I x tokens x dtype bytes
    """
    h, I, N = s.hidden, s.intermediate, draft_vocab
    per = (55 * h + 8 * I) if half else (74 * h + 16 * I)
    per += 7 * s.heads + 180
    if tokens <= LOSS_CHUNK_TOKENS:
        per += 4 * N
    kept = tokens * ttt * per
    B = max(1, tokens // max(seq_len, 1))
    transient = max(12 * min(tokens, LOSS_CHUNK_TOKENS) * N,
                    12 * min(B * s.heads * seq_len ** 2, SCORE_BLOCK_ELEMENTS),
                    3 * I * tokens * (2 if half else 4))
    return {"kept": kept, "transient": transient, "total": kept + transient}


def stage2_batch_bytes(s: Shape, *, topk: int, tokens: int) -> int:
    """The micro-batch on the device (stage2_train.data.collate), per token: hidden 3H bf16 (6H),
    the renormalised teacher t_idx int64 + t_prob fp32 (12K), the raw top-K t_logp fp32 + t_valid
    bool (5K), input_ids and t_top1 int64, loss_mask and valid bool (18)."""
    return tokens * (6 * s.hidden + 17 * topk + 18)


def stage2_gpu_bytes(s: Shape, ds: DSPlan, *, draft_vocab: int, tokens: int, seq_len: int, ttt: int,
                     world: int, topk: int = 64) -> dict:
    """Per rank: model states under the DeepSpeed config + the micro-batch (stage2_batch_bytes)
    + activations (ttt_activation_bytes).

    P = trainable head parameters, W = ranks (ZeRO partitions over all of them):
        weights  P x (2 bf16 | 4 fp32); the frozen target embedding V x H the same; t2d/d2t buffers
        grads    P x (2 | 4), divided by W under ZeRO-2
        optimizer  AdamW m, v (8 P) + an fp32 master copy and fp32 gradient partition with bf16
                   weights (+8 P), divided by W under ZeRO 1-2
        buckets  ZeRO-2's reduce and all-gather buckets (elements x weight bytes)
    """
    P = head_params(s, draft_vocab)
    wb = 2 if ds.bf16 else 4
    weights = P * wb + s.vocab * s.hidden * wb + s.vocab + 8 * draft_vocab
    grads = P * wb / (world if ds.zero_stage >= 2 else 1)
    optim = (8 * P + (8 * P if ds.bf16 else 0)) / (world if ds.zero_stage >= 1 else 1)
    buckets = (ds.reduce_bucket + ds.allgather_bucket) * wb if ds.zero_stage >= 2 else 0
    act = ttt_activation_bytes(s, draft_vocab=draft_vocab, tokens=tokens, seq_len=seq_len, ttt=ttt, half=ds.bf16)
    states = weights + grads + optim + buckets
    batch = stage2_batch_bytes(s, topk=topk, tokens=tokens)
    return {"params": P, "weights": weights, "grads": grads, "optimizer": optim, "buckets": buckets,
            "batch": batch, "activations": act["total"], "states": states, "total": states + batch + act["total"]}


def stage2_flops_per_token(s: Shape, draft_vocab: int, ttt: int, seq_len: float) -> float:
    """Forward + backward (3 x forward) of the head per training token: fc once, then per TTT step
    the layer's matmuls, the draft lm_head and causal attention over ~L/2 keys."""
    h, a, kv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    step = 2 * (2 * h * a + 2 * 2 * h * kv + a * h + 3 * h * s.intermediate + draft_vocab * h) + 2 * 2 * a * seq_len / 2
    return 3 * (2 * 3 * h * h + ttt * step)


def stage1_flops_per_token(s: Shape, seq_len: float) -> float:
    """The target's forward per token: 2 x non-embedding parameters, the full-vocab head, causal attention."""
    a = s.heads * s.head_dim
    return 2 * (s.layers * s.layer_params() + s.vocab * s.hidden) + s.layers * 2 * 2 * a * seq_len / 2


def stage3_gpu_bytes(s: Shape, *, dtype_bytes: int, draft_vocab: int, context: int, verify_tokens: int) -> dict:
    """Target + head weights, the target's KV cache for the longest context (prompt + max_new_tokens,
    capped at data.max_length... as configured) and one verification pass."""
    weights = s.params() * dtype_bytes + head_params(s, draft_vocab) * dtype_bytes
    kv = 2 * s.layers * s.kv_heads * s.head_dim * dtype_bytes * context
    act = verify_tokens * (dtype_bytes * (4 * s.hidden + 3 * s.intermediate) + 4 * s.vocab)
    return {"weights": weights, "kv_cache": kv, "activations": act, "total": weights + kv + act}


# --------------------------------------------------------------------------- the plan


@dataclass
class Options:
    gpus: int = 8
    nodes: int = 1
    gpu_mem: int = DEFAULT_GPU_MEM
    peak_tflops: float = DEFAULT_PEAK_TFLOPS
    mfu: float = DEFAULT_MFU
    tokens: Optional[int] = None
    samples: Optional[int] = None
    target_config: Optional[str] = None


@dataclass
class Plan:
    figures: dict
    warnings: list[str] = field(default_factory=list)


def make_plan(cfg, opt: Options) -> Plan:
    shape, src = load_target_shape(cfg, opt.target_config)
    data = count_data(cfg, tokens=opt.tokens, samples=opt.samples)
    world = opt.gpus * opt.nodes
    e, t = cfg.extract, cfg.train
    dtype_bytes = 4 if cfg.target.dtype == "float32" else 2
    c = cache_bytes_per_token(shape, e.topk, e.hidden_dtype, e.compressor)
    c8 = cache_bytes_per_token(shape, e.topk, "fp8", e.compressor)
    host = stage1_host_plan(cfg, shape, data, c)
    g1 = stage1_gpu_bytes(shape, dtype_bytes=dtype_bytes, tokens=e.max_tokens_per_batch,
                          chunk_tokens=e.logits_chunk_tokens)
    ds = DSPlan.from_json(t.deepspeed)
    seq = min(t.max_length or cfg.data.max_length, t.max_tokens_per_batch)
    g2 = stage2_gpu_bytes(shape, ds, draft_vocab=t.draft_vocab_size, tokens=t.max_tokens_per_batch, seq_len=seq,
                          ttt=t.ttt_length, world=world, topk=e.topk)
    context = min(cfg.data.max_length, 2048) + cfg.eval.max_new_tokens
    g3 = stage3_gpu_bytes(shape, dtype_bytes=dtype_bytes, draft_vocab=t.draft_vocab_size, context=context,
                          verify_tokens=max(cfg.eval.total_tokens, cfg.eval.draft_tokens + 1))
    flops = opt.peak_tflops * 1e12 * opt.mfu
    train_tokens = data.tokens * (1 - (0.0 if t.eval_cache else t.val_fraction))
    epochs = t.epochs
    if t.max_steps:
        epochs = t.max_steps * t.max_tokens_per_batch * t.gradient_accumulation_steps * world / max(train_tokens, 1)
    s1 = data.tokens * stage1_flops_per_token(shape, data.mean) / flops / world
    s2 = train_tokens * epochs * stage2_flops_per_token(shape, t.draft_vocab_size, t.ttt_length, data.mean) / flops / world
    fig = {
        "target": {"config": src, "model_type": shape.model_type, "hidden_size": shape.hidden,
                   "num_hidden_layers": shape.layers, "vocab_size": shape.vocab, "params": shape.params()},
        "data": {"samples": data.samples, "tokens": data.tokens, "mean_tokens": round(data.mean, 1), "how": data.how},
        "gpus": world, "nodes": opt.nodes, "gpus_per_node": opt.gpus, "gpu_mem_bytes": opt.gpu_mem,
        "cache_raw_bytes_per_token": c["raw"], "cache_bytes_per_token": round(c["disk"], 1),
        "cache_bytes_per_token_fp8": round(c8["disk"], 1), "cache_bytes_per_token_bf16": round(
            cache_bytes_per_token(shape, e.topk, "bf16", e.compressor)["disk"], 1),
        "cache_bytes_total": int(c["disk"] * data.tokens), "cache_bytes_total_fp8": int(c8["disk"] * data.tokens),
        "cache_bytes_total_bf16": int(cache_bytes_per_token(shape, e.topk, "bf16", e.compressor)["disk"] * data.tokens),
        "stage1_host_bytes_per_worker": int(host["total"]), "stage1_host": {k: int(v) for k, v in host.items()},
        "stage1_gpu_bytes": int(g1["total"]), "stage1_gpu": {k: int(v) for k, v in g1.items()},
        "stage2_gpu_bytes_per_rank": int(g2["total"]), "stage2_gpu": {k: int(v) for k, v in g2.items()},
        "stage2_zero_stage": ds.zero_stage, "stage2_weights": "bf16" if ds.bf16 else "fp32",
        "stage3_gpu_bytes": int(g3["total"]), "stage3_gpu": {k: int(v) for k, v in g3.items()},
        "mfu": opt.mfu, "peak_tflops": opt.peak_tflops,
        "stage1_hours": s1 / 3600, "stage2_hours": s2 / 3600, "stage2_epochs": round(epochs, 3),
    }
    slurm_mem = parse_mem(cfg.jobs.slurm.mem) if cfg.jobs.executor == "slurm" else None
    fig["stage1_host_bytes_per_node"] = int(host["total"]) * opt.gpus
    return Plan(fig, fit_warnings(fig, opt, slurm_mem))


def parse_mem(text: Optional[str]) -> Optional[int]:
    """Slurm's --mem ('200G', '64000M', '1T'; a bare number is MiB) in bytes; None when unset."""
    if not text:
        return None
    t = text.strip().upper().removesuffix("B")
    unit = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}.get(t[-1:], None)
    try:
        return int(float(t[:-1]) * unit) if unit else int(float(t) * 2 ** 20)
    except ValueError:
        return None


def fit_warnings(f: dict, opt: Options, slurm_mem: Optional[int] = None) -> list[str]:
    limit = opt.gpu_mem * HEADROOM
    out = []
    host = f["stage1_host_bytes_per_worker"]
    if slurm_mem is not None and host > slurm_mem * HEADROOM:
        out.append(f"a stage-1 worker needs {host / GiB:.1f} GiB of host memory, more than {HEADROOM:.0%} of "
                   f"jobs.slurm.mem ({slurm_mem / GiB:.0f} GiB per task)")
    for key, what in (("stage1_gpu_bytes", "stage 1 (target + one extraction batch)"),
                      ("stage2_gpu_bytes_per_rank", "stage 2 (head, optimizer, activations) per rank"),
                      ("stage3_gpu_bytes", "stage 3 (target + head + KV cache)")):
        if f[key] > limit:
            out.append(f"{what} needs {f[key] / GiB:.1f} GiB, more than {HEADROOM:.0%} of the "
                       f"{opt.gpu_mem / GiB:.0f} GiB assumed per GPU (--gpu-mem)")
    return out


def plan_lines(p: Plan) -> list[tuple[str, str]]:
    """The human table: (what, figure)."""
    f = p.figures

    def g(b):
        return f"{b / GiB:,.1f} GiB"

    def tb(b):
        return f"{b / 1e12:,.2f} TB"
    t, d, h = f["target"], f["data"], f["stage1_host"]
    return [
        ("target", f"{t['model_type']} {t['params'] / 1e9:.2f}B params, hidden {t['hidden_size']}, "
                   f"{t['num_hidden_layers']} layers, vocab {t['vocab_size']:,} ({t['config']})"),
        ("data", f"{d['samples']:,} samples, {d['tokens']:,} tokens (mean {d['mean_tokens']:,}): {d['how']}"),
        ("GPUs", f"{f['gpus']} = {f['nodes']} node(s) x {f['gpus_per_node']}, {g(f['gpu_mem_bytes'])} each assumed"),
        ("cache bytes/token", f"{f['cache_bytes_per_token']:,} on disk (bf16 {f['cache_bytes_per_token_bf16']:,}, "
                              f"fp8 {f['cache_bytes_per_token_fp8']:,}; raw {f['cache_raw_bytes_per_token']:,})"),
        ("cache total", f"{tb(f['cache_bytes_total'])} (bf16 {tb(f['cache_bytes_total_bf16'])}, "
                        f"fp8 {tb(f['cache_bytes_total_fp8'])})"),
        ("stage 1 host / worker", f"{g(f['stage1_host_bytes_per_worker'])} = load {g(h['load'])} + queued batches "
                                  f"{g(h['queued'])} + partly filled chunks {g(h['held'])} (at most "
                                  f"{g(h['held_bound'])}) + compressing {g(h['compress'])} + token ids "
                                  f"{g(h['tokens'])}; {g(f['stage1_host_bytes_per_node'])} per node of "
                                  f"{f['gpus_per_node']} workers (window {h['window_tokens']:,} tokens, chunk_rows "
                                  f"{h['chunk_rows']}, writer_threads {h['writer_threads']})"),
        ("stage 1 GPU", f"{g(f['stage1_gpu_bytes'])} = weights {g(f['stage1_gpu']['weights'])} "
                        f"+ batch {g(f['stage1_gpu']['activations'])}"),
        ("stage 2 GPU / rank", f"{g(f['stage2_gpu_bytes_per_rank'])} = weights {g(f['stage2_gpu']['weights'])} "
                               f"+ grads {g(f['stage2_gpu']['grads'])} + optimizer {g(f['stage2_gpu']['optimizer'])}"
                               f" + buckets {g(f['stage2_gpu']['buckets'])} + batch "
                               f"{g(f['stage2_gpu']['batch'])} + activations "
                               f"{g(f['stage2_gpu']['activations'])} (ZeRO-{f['stage2_zero_stage']}, "
                               f"{f['stage2_weights']} weights, {f['stage2_gpu']['params'] / 1e6:,.0f}M params)"),
        ("stage 3 GPU", f"{g(f['stage3_gpu_bytes'])} = weights {g(f['stage3_gpu']['weights'])} "
                        f"+ KV cache {g(f['stage3_gpu']['kv_cache'])}"),
        ("stage 1 time", f"{f['stage1_hours']:,.2f} h on {f['gpus']} GPUs at {f['mfu']:.0%} MFU of "
                         f"{f['peak_tflops']:,.0f} TFLOP/s"),
        ("stage 2 time", f"{f['stage2_hours']:,.2f} h for {f['stage2_epochs']} epochs on {f['gpus']} GPUs "
                         f"(same MFU)"),
    ]
