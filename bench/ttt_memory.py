"""Training memory of the TTT unroll: the memory-linear attention + chunked loss vs the eager one.

Runs one forward + backward of `ttt_forward` (B = 1) on CPU in a fresh subprocess per
case and reports
* kept: bytes autograd keeps for backward (saved tensors, deduplicated by storage,
  parameters excluded), split by kind: T x T scores, [T, N] logits, the rest;
* peak: the process's peak RSS growth during forward + backward (VmHWM after
  /proc/self/clear_refs, minus RSS before), i.e. kept + transient blocks.
and extrapolates `kept` to a target scale (default T=4096, hidden 4096, 32 heads,
draft vocab 32000, 7 steps, MLP 3.5 x hidden as Llama-3-8B, bf16 = 2 bytes) kind by kind: scores scale with
heads x T^2, logits with N x T, the rest with hidden x T (x 1/2 for bf16 activations,
the fp32 softmax/logit copies stay fp32: we keep the measured fp32 bytes as an upper bound).

    python bench/ttt_memory.py                 # both implementations, default small case
    python bench/ttt_memory.py --T 1024 --heads 8 --head-dim 8 --vocab 8000
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def legacy_ttt_step(self, hidden, input_ids, position_ids, cache):
    """The eager TTT step before the memory work (commit edbc6e1), rotated at t + k like today."""
    import torch

    layer, a = self.midlayer, self.midlayer.self_attn
    x = layer.attn_input(hidden, self.embed(input_ids))
    cos, sin = self._rope(x, position_ids + len(cache))
    q, k, v = a.qkv(x, cos, sin)
    cache.append((k, v))
    k0, v0 = a._expand(cache[0][0]), a._expand(cache[0][1])
    T = q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    s0 = torch.matmul(q, k0.transpose(-1, -2)) * scale
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    s0 = s0.masked_fill(~allowed, torch.finfo(s0.dtype).min)
    diag_k = [a._expand(kj) for kj, _ in cache[1:]]
    diag_v = [a._expand(vj) for _, vj in cache[1:]]
    if diag_k:
        sd = torch.stack([(q * kj).sum(-1) for kj in diag_k], dim=-1) * scale
        probs = torch.softmax(torch.cat((s0, sd), dim=-1).float(), dim=-1).to(q.dtype)
        p0, pd = probs[..., :T], probs[..., T:]
        o = torch.matmul(p0, v0) + sum(pd[..., j:j + 1] * vj for j, vj in enumerate(diag_v))
    else:
        o = torch.matmul(torch.softmax(s0.float(), dim=-1).to(q.dtype), v0)
    return layer.finish(hidden, a.out(o))


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def run_case(args) -> dict:
    import torch

    from schemas.head import make_head_config
    from stage2_train.losses import ttt_forward
    from stage2_train.model import Eagle3Draft

    torch.manual_seed(0)
    h = args.heads * args.head_dim
    V = args.vocab + 16
    target = {"hidden_size": h, "num_attention_heads": args.heads, "num_key_value_heads": args.heads,
              "head_dim": args.head_dim, "intermediate_size": int(3.5 * h), "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "max_position_embeddings": args.T + 16, "vocab_size": V, "hidden_act": "silu", "model_type": "llama"}
    m = Eagle3Draft(make_head_config(target, draft_vocab_size=args.vocab, layer_ids=[1, 2, 3]), torch.randn(V, h))
    m.set_vocab_map(torch.zeros(args.vocab, dtype=torch.long),
                    torch.zeros(V, dtype=torch.bool).index_fill_(0, torch.arange(args.vocab), True))
    if args.impl == "eager":
        m.ttt_step = legacy_ttt_step.__get__(m)
    T, K = args.T, 8
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, V, (1, T), generator=g), "loss_mask": torch.ones(1, T, dtype=torch.bool),
             "t_idx": torch.randint(0, args.vocab, (1, T, K), generator=g),
             "t_prob": torch.softmax(torch.randn(1, T, K, generator=g), -1),
             "t_top1": torch.randint(0, args.vocab, (1, T), generator=g), "hidden": torch.randn(1, T, 3 * h, generator=g)}
    batch.update(t_valid=torch.ones(1, T, K, dtype=torch.bool), t_logp=batch["t_prob"].log())
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in m.buffers()}
    kept: dict[int, tuple[int, str]] = {}

    def kind(shape) -> str:
        if shape and shape[-1] == args.vocab:
            return "logits"
        if len(shape) == 4 and shape[-1] >= T and shape[-2] == T:   # [B, heads, T, keys]
            return "scores"
        return "other"

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and (ptr not in kept or kept[ptr][1] == "other"):  # views: keep the telling shape
            kept[ptr] = (t.untyped_storage().nbytes(), kind(tuple(t.shape)))
            if os.environ.get("TTT_MEMORY_DEBUG"):
                print(tuple(t.shape), t.dtype, t.untyped_storage().nbytes(), file=sys.stderr)
        return t

    chunk = args.loss_chunk if args.impl == "linear" else 1 << 40
    import time

    before = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ttt_forward(m, batch, args.steps, loss_chunk_tokens=chunk)
    out.loss.backward()
    wall = time.perf_counter() - t0
    peak = _rss("VmHWM") - before
    by_kind = {k: sum(b for b, kk in kept.values() if kk == k) for k in ("scores", "logits", "other")}
    return {"impl": args.impl, "kept": by_kind, "kept_total": sum(by_kind.values()), "peak_rss": peak,
            "loss": float(out.loss.detach()), "wall_s": wall}


def extrapolate(r: dict, a, full: dict) -> float:
    """Kept bytes at the full scale, kind by kind (fp32 bytes measured; bf16 halves the 'other' kind)."""
    k = r["kept"]
    s_scores = (full["heads"] / a.heads) * (full["T"] / a.T) ** 2
    s_logits = (full["vocab"] / a.vocab) * (full["T"] / a.T)
    s_other = (full["heads"] * full["head_dim"]) / (a.heads * a.head_dim) * (full["T"] / a.T) * 0.5
    return k["scores"] * s_scores + k["logits"] * s_logits + k["other"] * s_other


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--loss-chunk", type=int, default=None,
                    help="positions per loss chunk (default 2048 * T / 4096: the same fraction as 2048 at T=4096)")
    ap.add_argument("--impl", choices=["eager", "linear"], default=None, help="(internal) run one case")
    ap.add_argument("--quick", action="store_true", help="a tiny case, seconds (the test suite)")
    a = ap.parse_args()
    if a.quick:
        a.T, a.heads, a.vocab, a.steps = 64, 4, 500, 3
    if a.loss_chunk is None:
        a.loss_chunk = max(1, 2048 * a.T // 4096)
    if a.impl:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(run_case(a)))
        return
    full = {"T": 4096, "heads": 32, "head_dim": 128, "vocab": 32000}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    print(f"case: B=1 T={a.T} heads={a.heads} head_dim={a.head_dim} draft vocab={a.vocab} steps={a.steps} "
          f"loss chunk={a.loss_chunk} positions, fp32 CPU")
    for impl in ("eager", "linear"):
        cmd = [sys.executable, __file__, "--impl", impl, "--T", str(a.T), "--heads", str(a.heads), "--head-dim",
               str(a.head_dim), "--vocab", str(a.vocab), "--steps", str(a.steps), "--loss-chunk", str(a.loss_chunk)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        gib = 2 ** 30
        print(f"{impl:>6}: kept for backward {r['kept_total'] / 2**20:8.1f} MiB "
              f"(scores {r['kept']['scores'] / 2**20:.1f}, logits {r['kept']['logits'] / 2**20:.1f}, "
              f"other {r['kept']['other'] / 2**20:.1f}); peak RSS growth {r['peak_rss'] / 2**20:8.1f} MiB; "
              f"loss {r['loss']:.6f}; fwd+bwd {r['wall_s']:.2f} s (1 thread, with hooks); kept at T=4096 h=4096 32 heads N=32000: "
              f"{extrapolate(r, a, full) / gib:.1f} GiB")


if __name__ == "__main__":
    main()
