"""Issue 21's quality run on one CUDA GPU under a wall-clock budget: regenerate, extract, train.

  python bench/quality_gpu.py --prompts RUN/prompts.jsonl --target SmolLM2.gguf --run-dir DIR
                              [--budget-s 540] [--regen-s 200] [--pack OUTDIR] [--device cuda|cpu] [--quick]

The CPU run (bench/quality.py) regenerates ~480 answer tokens/s and trains ~1,000 tokens/s on 2
cores, so its heads see ~0.3 M distinct tokens. This script runs the same stages with the same
recipe on one GPU, where the budget buys an order of magnitude more data:
1. regenerate: the target answers the prompt set's turns (HF generate, batches of --regen-batch
   conversations) until --regen-s, stopping after the last batch that can end by then; the
   conversations not written are dropped from the set (prompts.jsonl keeps those written;
   prompts-all.jsonl the whole set);
2. extract the cache of what was written;
3. a 40-step probe of the training step measures steps/s and the start-up; the head is then
   trained from scratch for as many steps as the rest of the budget holds (cosine schedule to
   the end), its held-out evaluations 8 times along the way (the head kept is the best one);
4. --pack: the run dir without the cache and checkpoints (prompts, regenerated answers, config,
   stage markers, head with its metrics, the cache's summary) as a tar.gz cut into parts of at
   most 15 MiB, so a device with a small return channel can hand it back.
Stage 3 then runs where the goals are measured (bf16 CPU):
  python bench/quality.py --run-dir DIR --eval-only --sharegpt N ... (see bench/quality.py).
`--device cpu --quick` rehearses the script on tiny sizes (tests/test_quality_gpu.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import Sizes, config_text  # noqa: E402

PROBE_STEPS = 40
EVALS = 8            # held-out evaluations over the final training
PART_BYTES = 15 << 20


def log(msg: str) -> None:
    print(f"[quality-gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gpu_config(run: Path, target: str, device: str, quick: bool, a) -> Path:
    """quality.py's final config (same recipe), with the device's settings."""
    sz, gpu = Sizes.quick() if quick else Sizes(), device == "cuda"
    raw = yaml.safe_load(config_text(run, sz, quick=quick, dtype="bfloat16" if gpu else "float32",
                                     final=True, point={"train.lr": a.lr, "train.draft_vocab_size": a.draft_vocab}))
    raw["target"].update(path=target, device="cuda:0" if gpu else "cpu", attn_implementation="sdpa")
    raw["data"]["regenerate"]["batch_size"] = a.regen_batch
    raw["extract"].update(max_tokens_per_batch=65536 if gpu else 4096, writer_threads=8 if gpu else 0)
    ds = ROOT / "configs/deepspeed" / ("zero2_bf16.json" if gpu else "cpu_fp32.json")
    raw["train"].update(deepspeed=str(ds), micro_batch_size=a.micro_batch, max_tokens_per_batch=a.batch_tokens)
    p = run / "gpu.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


class BatchClock:
    """Says when to stop regeneration: after the last whole batch that can end before the deadline.
    A batch killed midway is lost (it is written whole or not at all), so its time is better spent
    training. The longest batch so far (the first includes the target's load) is the estimate."""

    def __init__(self, out: Path, deadline: float, clock=time.time):
        self.out, self.deadline, self.clock = out, deadline, clock
        self.lines, self.last, self.longest = self._count(), clock(), 0.0

    def _count(self) -> int:
        return self.out.read_bytes().count(b"\n") if self.out.exists() else 0

    def __call__(self) -> bool:
        n, now = self._count(), self.clock()
        if n == self.lines:
            return False
        self.longest = max(self.longest, now - self.last)
        self.lines, self.last = n, now
        return now + self.longest > self.deadline


def _stop(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def stage_env() -> dict:
    """Each stage is its own 1-rank job: rendezvous variables this process carries (a launcher's, or an
    in-process training run's, whose port may still be bound) would make its group fail or hang."""
    from pipeline.submit import LAUNCHER_ENV

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


def cli(cfg: Path, stages: str, *over: str, deadline: float | None = None, logfile: Path,
        stop_early=None) -> tuple[int, float]:
    """`pipeline.cli run CFG --stages S`; stopped (SIGTERM, then SIGKILL; rc -999) at `deadline`
    (time.time()) or as soon as `stop_early()` says so (polled every second)."""
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(cfg), "--stages", stages, "--no-progress", *over]
    log("$ " + " ".join(cmd))
    t0 = time.time()
    with logfile.open("a") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=stage_env())
        while (rc := p.poll()) is None:
            if deadline is not None and time.time() >= deadline:
                log(f"deadline: stopping {stages}")
            elif stop_early is not None and stop_early():
                log(f"the next batch would end after the deadline: stopping {stages}")
            else:
                time.sleep(1.0)
                continue
            _stop(p)
            rc = -999
            break
    dt = time.time() - t0
    log(f"{stages}: rc {rc} after {dt:.1f} s")
    return rc, dt


def cut_to_written(run: Path) -> int:
    """Keep the prompts whose conversations were written (a killed batch is dropped whole)."""
    from stage1_extract.regenerate import scan_output

    done = scan_output(run / "regenerated.jsonl", repair=True)
    full = run / "prompts-all.jsonl"
    if not full.exists():
        (run / "prompts.jsonl").rename(full)
    rows = [json.loads(x) for x in full.read_text(encoding="utf-8").splitlines() if x.strip()]
    kept = [r for r in rows if r["id"] in done]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
    (run / "prompts.jsonl").write_text(text, encoding="utf-8")
    log(f"regenerated {len(kept):,} of {len(rows):,} conversations")
    return len(kept)


def probe_rate(head: Path) -> tuple[float, float]:
    """(steps/s, tokens/step) of the steady steps of a probe run's metrics.jsonl."""
    rows = [json.loads(x) for x in (head / "metrics.jsonl").read_text().splitlines()][5:]
    secs = [r["tokens"] / r["tokens_per_s"] for r in rows if r["tokens_per_s"] > 0]
    return 1.0 / statistics.median(secs), statistics.mean(r["tokens"] for r in rows)


def train(run: Path, cfg: Path, end: float, logs: Path) -> dict:
    """The probe, then the head trained for the steps that fit before `end`."""
    probe = run / "probe"
    rc, wall = cli(cfg, "train", f"train.output={probe}", f"train.max_steps={PROBE_STEPS}",
                   f"train.eval_every={PROBE_STEPS}", f"train.save_every={PROBE_STEPS}", deadline=end, logfile=logs)
    if rc != 0:  # the run so far is still packed
        log(f"the training probe failed or ran out of time (rc {rc}); see {logs}")
        return {"probe_rc": rc}
    rate, tok = probe_rate(probe)
    overhead = wall - PROBE_STEPS / rate           # start-up + one held-out evaluation + saving
    left = end - time.time() - overhead * (1 + EVALS / 4)
    steps = max(int(left * rate * 0.9), PROBE_STEPS)
    every = max(steps // EVALS, 10)
    log(f"probe: {rate:.2f} steps/s, {tok:,.0f} tokens/step, start-up etc. {overhead:.1f} s -> {steps} steps "
        f"(~{steps * tok / 1e6:.1f} M tokens), held-out evaluation every {every}")
    rc, wall = cli(cfg, "train", f"train.max_steps={steps}", f"train.eval_every={every}", f"train.save_every={every}",
                   deadline=end, logfile=logs)
    return {"probe_steps_per_s": rate, "probe_tokens_per_step": tok, "probe_overhead_s": overhead,
            "planned_steps": steps, "train_rc": rc, "train_s": wall}


def pack(run: Path, out: Path) -> list[Path]:
    """The run without its cache, checkpoints and probe, as tar.gz parts of at most PART_BYTES."""
    skip = {"cache", "probe", "checkpoints", "last"}
    tgz = out / "quality-gpu.tar.gz"
    with tarfile.open(tgz, "w:gz", compresslevel=6) as t:
        t.add(run, arcname=run.name, filter=lambda ti: None if set(Path(ti.name).parts) & skip else ti)
    data, parts = tgz.read_bytes(), []
    for i in range(0, len(data), PART_BYTES):
        parts.append(out / f"quality-gpu.tar.gz.{i // PART_BYTES:02d}")
        parts[-1].write_bytes(data[i:i + PART_BYTES])
    tgz.unlink()
    return parts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", required=True, help="bench/quality.py's prompt set (its <run>/prompts.jsonl)")
    ap.add_argument("--target", required=True, help="target.path (SmolLM2's .gguf)")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="quality.py's --quick sizes")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall seconds for all the stages")
    ap.add_argument("--regen-s", type=float, default=200.0, help="wall seconds of regeneration")
    ap.add_argument("--regen-batch", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=32, help="samples per step (GPU: 4x the CPU run's 8)")
    ap.add_argument("--batch-tokens", type=int, default=16384, help="train.max_tokens_per_batch (CPU run: 4096)")
    ap.add_argument("--lr", type=float, default=2e-3, help="the CPU sweep's 1e-3 at a 4x larger batch")
    ap.add_argument("--draft-vocab", type=int, default=Sizes.draft_vocab)
    ap.add_argument("--pack", default=None, help="write the packed run here")
    a = ap.parse_args(argv)
    t0 = time.time()
    end = t0 + a.budget_s
    run = Path(a.run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "prompts-all.jsonl").exists():
        (run / "prompts.jsonl").write_bytes(Path(a.prompts).read_bytes())
    cfg = gpu_config(run, a.target, a.device, a.quick, a)
    logs = run / "stages.log"
    times: dict = {"budget_s": a.budget_s}
    clock = BatchClock(run / "regenerated.jsonl", t0 + a.regen_s)
    _, times["regenerate_s"] = cli(cfg, "regenerate", deadline=t0 + a.regen_s, logfile=logs, stop_early=clock)
    times["conversations"] = cut_to_written(run)
    rc, times["extract_s"] = cli(cfg, "regenerate,extract", logfile=logs)
    if rc != 0:
        raise SystemExit(f"quality-gpu: extraction failed (rc {rc}); see {logs}")
    from pipeline.run import cache_summary

    (run / "cache_summary.json").write_text(json.dumps(cache_summary(run / "cache"), indent=1))
    times.update(train(run, cfg, end, logs))
    times["wall_s"] = time.time() - t0
    (run / "gpu_times.json").write_text(json.dumps(times, indent=1))
    log(json.dumps(times))
    if a.pack:
        for p in pack(run, Path(a.pack)):
            log(f"packed {p} ({p.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
