"""The TTT training step, side by side (issue 21): before / after this branch, and SpecForge's.

  python bench/bench_train_step.py [--lengths 512,2048,4096] [--ttt 5,7] [--tokens 2048] [--rounds 2]
                                   [--steps 2] [--dtypes auto] [--baseline c96fae6] [--rss]
                                   [--specforge /work/venvs/specforge/bin/python] [--cache CACHE]
                                   [--json OUT.json] [--md OUT.md] [--quick]

One process, the same batches and the same initial weights for every variant, alternated round
by round so a shared machine's load hits all alike (each variant keeps its own AdamW state):
* before     stage2_train/model.py, ttt_attention.py and losses.py as of --baseline (git show into
             a temp dir): the whole step as it was, log-softmax included;
* after      this checkout;
* specforge  SpecForge 0.2.0's draft model doing its TTT step, in its own venv
             (bench/specforge_step_worker.py says how it runs on a CPU), one subprocess a point.
Shapes: for each T, B = max(1, tokens // T) rows of length T: SmolLM2-135M's head (hidden 576,
9/3 heads, draft vocab --draft-vocab), K = 64 teacher entries, random features (or rows of a real
cache with --cache). Reports tokens/s of the timed steps, the loss of the first step (the same
weights: before and after must agree to the dtype's rounding), the memory autograd keeps for
backward (distinct storages, parameters excluded) and, with --rss (one subprocess per point),
the peak RSS growth over a step. --quick: tiny shapes in seconds (the test suite runs it).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from schemas.head import make_head_config  # noqa: E402
from stage2_train.losses import ttt_forward  # noqa: E402
from stage2_train.precision import compute_context  # noqa: E402
from stage2_train.teacher import step_view  # noqa: E402

SMOLLM2 = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536,
               vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
               model_type="llama", hidden_act="silu")
TINY = dict(SMOLLM2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
            vocab_size=512)
WORKER = Path(__file__).with_name("specforge_step_worker.py")
BASE_FILES = ("stage2_train/ttt_attention.py", "stage2_train/model.py", "stage2_train/losses.py")


# --------------------------------------------------------------------------- models and batches


def head_config(target: dict, n_draft: int) -> dict:
    return make_head_config(target, draft_vocab_size=n_draft, layer_ids=[2, 15, 27])


def load_baseline(rev: str, tmp: Path):
    """(Eagle3Draft, ttt_forward) of `rev`: its model.py importing its ttt_attention, and its losses.py
    (module names bench_base_*; the data side, stage2_train.teacher, is today's)."""
    for f in BASE_FILES:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{f}"], capture_output=True, text=True)
        if src.returncode != 0:
            raise SystemExit(f"bench_train_step: git show {rev}:{f} failed ({src.stderr.strip()}); "
                             f"give --baseline a commit of this repository")
        text = src.stdout.replace("from stage2_train.ttt_attention import", "from bench_base_ttt_attention import")
        (tmp / ("bench_base_" + Path(f).name)).write_text(text)
    sys.path.insert(0, str(tmp))
    mods = {}
    for name in ("model", "losses"):
        spec = importlib.util.spec_from_file_location(f"bench_base_{name}", tmp / f"bench_base_{name}.py")
        mods[name] = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(mods[name])
    return mods["model"].Eagle3Draft, mods["losses"].ttt_forward


def initial_state(cfg: dict, seed: int = 0) -> dict:
    from stage2_train.model import Eagle3Draft

    torch.manual_seed(seed)
    m = Eagle3Draft(cfg, torch.randn(cfg["vocab_size"], cfg["hidden_size"]) * 0.02)
    n, V = cfg["draft_vocab_size"], cfg["vocab_size"]
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    m.set_vocab_map(ids - torch.arange(n), torch.zeros(V, dtype=torch.bool).index_fill_(0, ids, True))
    return {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("rotary.")}


def synthetic_batch(B: int, T: int, cfg: dict, K: int, seed: int) -> dict:
    """Features ~ N(0, 1) in bf16 (as cached), a teacher of K draft ids, 70% loss positions in runs."""
    g = torch.Generator().manual_seed(seed)
    n = cfg["draft_vocab_size"]
    idx = torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    prob = torch.softmax(torch.randn(B, T, K, generator=g) * 3, -1)
    mask = (torch.rand(B, T // 8 + 1, generator=g) < 0.7).repeat_interleave(8, dim=1)[:, :T]
    return {"input_ids": torch.randint(0, cfg["vocab_size"], (B, T), generator=g), "loss_mask": mask,
            "valid": torch.ones(B, T, dtype=torch.bool),
            "hidden": torch.randn(B, T, 3 * cfg["hidden_size"], generator=g).to(torch.bfloat16),
            "t_idx": idx, "t_prob": prob, "t_top1": idx[..., 0].clone(), "tokens": B * T,
            "t_valid": torch.ones(B, T, K, dtype=torch.bool), "t_logp": prob.log()}


def cache_batch(reader, B: int, T: int, n_draft: int) -> dict:
    """B rows of length T filled with consecutive cached samples (throughput only: the teacher of a
    row that crosses a sample boundary is the next sample's, as if it were one long conversation)."""
    import numpy as np

    from stage2_train.data import collate
    from stage2_train.vocab import build_draft_vocab

    vocab = build_draft_vocab(reader.token_counts(), n_draft)
    rows, i = [], 0
    for _ in range(B):
        parts, have = [], 0
        while have < T:
            s = reader.sample(i % len(reader))
            parts.append(s)
            have += len(s["input_ids"])
            i += 1
        rows.append({k: np.concatenate([p[k] for p in parts])[:T] for k in parts[0]})
    return collate(rows, vocab.target_to_draft(), T), vocab


def step_views(batch: dict, ttt: int) -> dict:
    """The per-step inputs and teacher (stage2_train.teacher.step_view) for the SpecForge worker."""
    vs = [step_view(batch, k) for k in range(ttt)]
    return {"hidden": batch["hidden"], "ids": [v.input_ids for v in vs], "idx": [v.idx for v in vs],
            "prob": [v.prob for v in vs], "mask": [v.loss_mask for v in vs]}


# --------------------------------------------------------------------------- measuring


def saved_bytes(model):
    """(context, [bytes]): distinct storages autograd keeps for backward, parameters excluded."""
    params = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen, total = set(), [0]

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total[0] += st.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), total


class Runner:
    """One implementation (model class, unroll), its model and optimizer; `step` = unroll + backward + AdamW."""

    def __init__(self, impl, cfg: dict, state: dict, amp, embed: torch.nn.Parameter | None = None):
        cls, self.forward = impl
        self.model = cls(cfg)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("rotary.") for k in missing):
            raise SystemExit(f"bench_train_step: state does not fit {cls.__module__}: {missing} {unexpected}")
        if embed is not None:                      # frozen: one copy for every runner
            self.model.embed_tokens.weight = embed
        self.model.embed_tokens.weight.requires_grad_(False)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-3)
        self.amp = amp

    def step(self, batch: dict, ttt: int, measure: bool = False) -> tuple[float, float, int]:
        hooks, total = saved_bytes(self.model) if measure else (contextlib.nullcontext(), [0])
        t = time.perf_counter()
        with hooks, compute_context(torch.device("cpu"), self.amp):
            out = self.forward(self.model, batch, ttt)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t, out.loss.item(), total[0]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0). getrusage's ru_maxrss cannot be reset and
    survives fork + exec: a child would report its parent's RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_specforge(python: str, tmp: Path, name: str, batch: dict, state_path: Path, cfg: dict, ttt: int,
                  steps: int, dtype: str, threads: int, compile_: bool, mem_cap_gib: float = 0) -> dict:
    bpath = tmp / f"views-{name}.pt"
    if not bpath.exists():
        torch.save(step_views(batch, ttt), bpath)
    sf_cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "eagle_config", "training")}
    req = {"batch": str(bpath), "weights": str(state_path), "config": sf_cfg, "ttt": ttt, "steps": steps,
           "decay": 0.8, "dtype": dtype, "threads": threads, "compile": compile_}
    (tmp / "sf-req.json").write_text(json.dumps(req))
    res = tmp / "sf-res.json"
    res.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    # Its T x T scores can outgrow a shared machine: an address-space cap turns that into an error
    # here instead of the kernel's OOM killer picking some other process.
    cap = int(mem_cap_gib * 2**30)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    p = subprocess.run([python, "-I", str(WORKER), str(tmp / "sf-req.json"), str(res)], env=env,
                       capture_output=True, text=True, preexec_fn=limit if mem_cap_gib else None)
    if p.returncode != 0 or not res.exists():
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-6:])
        return {"error": f"rc {p.returncode}: {tail}"}
    return json.loads(res.read_text())


def rss_point(args, T: int, ttt: int, impl: str, dtype: str, tmp: Path) -> float | None:
    """Peak RSS over the RSS before a step (MiB): the second step of `impl` in a fresh process (--rss)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-worker", impl, "--lengths", str(T), "--ttt", str(ttt),
           "--dtypes", dtype, "--tokens", str(args.tokens), "--baseline", args.baseline,
           "--draft-vocab", str(args.draft_vocab), "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    if args.cache:
        cmd += ["--cache", args.cache]
    p = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return float(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"[bench] --rss {impl} T={T}: {p.stderr.strip()[-300:]}", flush=True)
        return None


# --------------------------------------------------------------------------- main


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,2048,4096")
    ap.add_argument("--ttt", default="5,7")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per batch: B = max(1, tokens // T)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per variant per round (after a warm-up)")
    ap.add_argument("--dtypes", default="auto", help="float32, bfloat16 (autocast) or auto (the trainer's choice "
                                                     "on this machine: bf16 only where it is native)")
    ap.add_argument("--draft-vocab", type=int, default=8000)
    ap.add_argument("--baseline", default="c96fae6", help="git revision of the 'before' implementation")
    ap.add_argument("--specforge", default=os.environ.get("EAGLE3_SPECFORGE_PYTHON"),
                    help="python of a venv with specforge 0.2.0 (default $EAGLE3_SPECFORGE_PYTHON; none: skip)")
    ap.add_argument("--specforge-ttt", default=None, help="TTT lengths for SpecForge (default: the largest of --ttt)")
    ap.add_argument("--specforge-no-compile", action="store_true", help="TORCH_COMPILE_DISABLE=1 in its worker")
    ap.add_argument("--specforge-mem-gib", type=float, default=8.0,
                    help="address-space cap of its worker (0: none); a point over it is reported as an error")
    ap.add_argument("--rss", action="store_true", help="also peak RSS per point, one subprocess each")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=None, help="fill the batches with rows of this cache instead of random ones")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1 round: seconds")
    ap.add_argument("--rss-worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.lengths = a.lengths if a.lengths != "512,2048,4096" else "16,32"
        a.ttt = a.ttt if a.ttt != "5,7" else "2,3"
        a.tokens, a.rounds, a.steps, a.draft_vocab = min(a.tokens, 64), 1, 1, min(a.draft_vocab, 64)
    a.lengths = [int(x) for x in str(a.lengths).split(",")]
    a.ttt = [int(x) for x in str(a.ttt).split(",")]
    a.specforge_ttt = [int(x) for x in a.specforge_ttt.split(",")] if a.specforge_ttt else [max(a.ttt)]
    from stage2_train.precision import resolve_compute_dtype

    a.dtypes = [("bfloat16" if resolve_compute_dtype("auto", torch.device("cpu"), "float32") else "float32")
                if d == "auto" else d for d in a.dtypes.split(",")]
    return a


def setup(a, tmp: Path):
    """(config, initial state, its path, batches per T, implementations)."""
    target = TINY if a.quick else SMOLLM2
    reader = None
    if a.cache:
        from schemas.cache import CacheReader

        reader = CacheReader(a.cache)
        target = reader.target_config()
    cfg = head_config(target, a.draft_vocab)
    state = initial_state(cfg)
    batches = {}
    for T in a.lengths:
        B = max(1, a.tokens // T)
        if reader is None:
            batches[T] = synthetic_batch(B, T, cfg, min(64, a.draft_vocab), seed=T)
        else:
            batches[T], vocab = cache_batch(reader, B, T, a.draft_vocab)
            state["d2t"], state["t2d"] = torch.from_numpy(vocab.d2t), torch.from_numpy(vocab.t2d)
            state["embed_tokens.weight"] = reader.load_embedding().float()
    state_path = tmp / "state.pt"
    torch.save(state, state_path)
    from stage2_train.model import Eagle3Draft

    impls = {"before": load_baseline(a.baseline, tmp), "after": (Eagle3Draft, ttt_forward)}
    return cfg, state, state_path, batches, impls


def rss_worker(a) -> int:
    with tempfile.TemporaryDirectory(prefix="eagle3-bench-step-") as td:
        cfg, state, _, batches, impls = setup(a, Path(td))
        T, ttt = a.lengths[0], a.ttt[0]
        r = Runner(impls[a.rss_worker], cfg, state, torch.bfloat16 if a.dtypes[0] == "bfloat16" else None)
        r.step(batches[T], ttt)                 # warm-up: AdamW state, allocator (SpecForge: compile)
        before = rss_mib()
        reset_peak_rss()
        r.step(batches[T], ttt)
        print(peak_rss_mib() - before)
    return 0


def measure(a, tmp: Path) -> dict:
    cfg, state, state_path, batches, impls = setup(a, tmp)
    points = [(T, s, dt) for dt in a.dtypes for T in a.lengths for s in a.ttt]
    res: dict = {}
    for dt in a.dtypes:
        amp = torch.bfloat16 if dt == "bfloat16" else None
        embed = torch.nn.Parameter(state["embed_tokens.weight"].clone(), requires_grad=False)
        runners = {(name, T, s): Runner(impl, cfg, state, amp, embed) for name, impl in impls.items()
                   for T in a.lengths for s in a.ttt}
        for (name, T, s), r in runners.items():                # warm-up: the first step, same weights
            _, loss, saved = r.step(batches[T], s, measure=True)
            res[f"{name}|{T}|{s}|{dt}"] = {"impl": name, "T": T, "B": batches[T]["input_ids"].shape[0], "ttt": s,
                                            "dtype": dt, "seconds": 0.0, "tokens": 0, "first_loss": loss,
                                            "saved_mib": saved / 2**20}
        for rnd in range(a.rounds):
            for T in a.lengths:
                for s in a.ttt:
                    for name in impls:
                        row = res[f"{name}|{T}|{s}|{dt}"]
                        for _ in range(a.steps):
                            sec, _, _ = runners[(name, T, s)].step(batches[T], s)
                            row["seconds"] += sec
                            row["tokens"] += int(batches[T]["tokens"])
                    if a.specforge and s in a.specforge_ttt:
                        out = run_specforge(a.specforge, tmp, f"{T}-{s}", batches[T], state_path, cfg, s, a.steps,
                                            dt, a.threads, not a.specforge_no_compile, a.specforge_mem_gib)
                        key = f"specforge|{T}|{s}|{dt}"
                        row = res.setdefault(key, {"impl": "specforge", "T": T, "B": batches[T]["input_ids"].shape[0],
                                                   "ttt": s, "dtype": dt, "seconds": 0.0, "tokens": 0})
                        if "error" in out:
                            row["error"] = out["error"]
                        else:
                            row["seconds"] += sum(out["seconds"])
                            row["tokens"] += out["tokens"] * len(out["seconds"])
                            row.update(first_loss=out["losses"][0], saved_mib=out["saved_mib"],
                                       peak_rss_delta_mib=out["peak_rss_delta_mib"], version=out["specforge_version"])
                    print(f"[bench] round {rnd + 1}/{a.rounds} T={T} TTT {s} {dt} done "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
        del runners
    if a.rss:
        for T, s, dt in points:
            for name in impls:
                res[f"{name}|{T}|{s}|{dt}"]["peak_rss_delta_mib"] = rss_point(a, T, s, name, dt, tmp)
    for row in res.values():
        row["tokens_per_s"] = row["tokens"] / row["seconds"] if row.get("seconds") else None
    return {"rows": list(res.values()), "points": points}


def table(rep: dict) -> str:
    rows = {(r["impl"], r["T"], r["ttt"], r["dtype"]): r for r in rep["rows"]}
    out = ["| T | B | TTT | dtype | before tok/s | after tok/s | after / before | first loss before / after | "
           "kept for backward MiB before / after | SpecForge tok/s | after / SpecForge | SpecForge first loss | "
           "SpecForge kept MiB | peak RSS +MiB after / SpecForge |",
           "|---:|---:|---:|---|---:|---:|---:|---|---|---:|---:|---:|---:|---|"]

    def f(x, fmt="{:,.0f}"):
        return "–" if x is None else fmt.format(x)

    for T, s, dt in rep["points"]:
        b, a, sf = rows.get(("before", T, s, dt)), rows.get(("after", T, s, dt)), rows.get(("specforge", T, s, dt))
        ratio = a["tokens_per_s"] / b["tokens_per_s"] if a["tokens_per_s"] and b["tokens_per_s"] else None
        sf_tps = sf.get("tokens_per_s") if sf else None
        sf_cell = f(sf_tps) if not (sf and sf.get("error")) else "error"
        out.append(f"| {T} | {a['B']} | {s} | {dt} | {f(b['tokens_per_s'], '{:,.1f}')} | {f(a['tokens_per_s'], '{:,.1f}')} | "
                   f"{f(ratio, '{:.2f}x')} | {b['first_loss']:.6f} / {a['first_loss']:.6f} | "
                   f"{b['saved_mib']:,.0f} / {a['saved_mib']:,.0f} | {sf_cell} | "
                   f"{f(a['tokens_per_s'] / sf_tps if sf_tps else None, '{:.2f}x')} | "
                   f"{f(sf.get('first_loss') if sf else None, '{:.6f}')} | {f(sf.get('saved_mib') if sf else None)} | "
                   f"{f(a.get('peak_rss_delta_mib'))} / {f(sf.get('peak_rss_delta_mib') if sf else None)} |")
    errs = [f"* SpecForge T={r['T']} TTT {r['ttt']}: {r['error']}" for r in rep["rows"] if r.get("error")]
    return "\n".join(out + ([""] + errs if errs else [])) + "\n"


def main(argv=None) -> int:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    if a.rss_worker:
        return rss_worker(a)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="eagle3-bench-step-") as td:
        rep = measure(a, Path(td))
    rep.update(baseline=a.baseline, threads=a.threads, load1=os.getloadavg()[0], quick=a.quick,
               wall_s=round(time.perf_counter() - t0, 1), torch=torch.__version__,
               command="python bench/bench_train_step.py " + " ".join(sys.argv[1:] if argv is None else argv))
    md = table(rep)
    print("\n" + md)
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=1) + "\n")
    if a.md:
        Path(a.md).write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
