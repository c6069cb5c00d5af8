"""Stage 2: train an EAGLE-3 head from the feature cache with DeepSpeed (the target is never loaded).

One process on CPU runs without a launcher (the rendezvous environment is set here,
gloo backend); several run under `torchrun` (one node or many) or the `deepspeed`
launcher (one node). ZeRO 0-2, bf16/fp16/fp32, gradient accumulation and clipping come
from the DeepSpeed JSON (`train.deepspeed`; "auto" values are filled from the train
config); the optimizer (AdamW) and the schedule (linear warmup + cosine decay) are ours.

On W ranks (DESIGN.md section 8): every collective goes through
`stage2_train.collectives.Ranks` (the rank's device tensors only); step s trains on the
global micro-batches s·W·A .. (s+1)·W·A - 1 (`data.rank_schedule`) with the loss divided
by the step's global count of loss tokens (`train_step`), so W ranks x A accumulation
steps = 1 rank x W·A; the held-out evaluation is sharded over the ranks; a checkpoint
resumes on any number of ranks with the same W·A (`prepare_resume`).

Layout of `train.output`:
  config.json, model.safetensors   the head: best simulated τ on the held-out split (else the last)
  last/                            the head at the last step
  checkpoints/<tag>/, latest       DeepSpeed checkpoints + data position + RNG states (resume; DeepSpeed
                                   unpickles its own files there, so resuming trusts this directory)
  .lock                            held by rank 0 while a run writes here (stage2_train.run_state)
  metrics.jsonl, eval.jsonl        per-step training metrics, held-out evaluations
  train_curves.png, heldout_table.md
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from schemas.cache import CacheError, CacheReader
from schemas.config import ConfigError, RunConfig, dump_config
from schemas.finite import FiniteWatch, NonFiniteError
from schemas.head import make_head_config
from stage2_train.collectives import Ranks, init_distributed
from stage2_train.data import (cropped_lengths, heldout_subset, make_train_loader, rank_schedule, split_indices,
                               steps_per_epoch, to_device)
from stage2_train.evaluate import cache_id, check_head_vs_cache, evaluate_model, metrics_table
from stage2_train.export import write_head
from stage2_train.losses import Sums, loss_token_counts, ttt_forward
from stage2_train.model import Eagle3Draft
from stage2_train.precision import compute_context, dtype_name, resolve_compute_dtype
from stage2_train.sampler import EpochOrder, chunk_aware_order
from stage2_train.start import StartError, init_layer, init_output_head, resolve_start, start_note
from stage2_train.vocab import build_draft_vocab

CKPT_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2


class TrainError(RuntimeError):
    """A training run that cannot start or resume as configured."""


# --------------------------------------------------------------------------- setup


def load_ds_config(cfg: RunConfig, world_size: int) -> dict:
    tc = cfg.train
    p = Path(tc.deepspeed)
    if not p.is_file():
        raise ConfigError(f"train.deepspeed: DeepSpeed config {p} not found")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed: {p} is not valid JSON: {e}") from None
    fill = {"train_micro_batch_size_per_gpu": tc.micro_batch_size,
            "gradient_accumulation_steps": tc.gradient_accumulation_steps,
            "gradient_clipping": tc.grad_clip}
    for k, v in fill.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    for k in ("optimizer", "scheduler"):
        if k in ds:  # ours come from train.lr / train.warmup_ratio; two sources would disagree
            raise ConfigError(f"train.deepspeed: {p} defines '{k}'; remove it (set train.lr, train.weight_decay, "
                              "train.warmup_ratio instead)")
    stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
    if stage > 2:
        raise ConfigError(f"train.deepspeed: {p}: ZeRO stage {stage} is not supported (0-2; the head is small)")
    if not torch.cuda.is_available():
        if (ds.get("fp16") or {}).get("enabled"):
            raise ConfigError(f"train.deepspeed: {p} enables fp16, which needs a GPU; use cpu_fp32.json or bf16")
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def ds_dtype(ds: dict) -> str:
    if (ds.get("bf16") or {}).get("enabled"):
        return "bfloat16"
    if (ds.get("fp16") or {}).get("enabled"):
        return "float16"
    return "float32"


class WarmupCosine:
    """lr multiplier: linear warmup to 1, then cosine decay to 0 at `total` (picklable for checkpoints)."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = int(warmup), int(total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - self.warmup) / span)))


def _grad_norm(module) -> float:
    sq = [p.grad.detach().float().pow(2).sum() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


# --------------------------------------------------------------------------- the plan


class Plan:
    """Everything decided before the first step: cache, split, vocab, head config, step counts."""

    def __init__(self, cfg: RunConfig, world_size: int, grad_accum: int):
        tc = cfg.train
        self.cfg = cfg
        self.reader = CacheReader(cfg.train_cache, expect=cache_expectations(cfg))
        r = self.reader
        self._check_rows()
        self.vocab = build_draft_vocab(r.token_counts(), tc.draft_vocab_size)
        self.max_length = tc.max_length or cfg.data.max_length
        self.lengths = cropped_lengths(r, self.max_length)
        if tc.eval_cache:
            self.train_idx = np.arange(len(r), dtype=np.int64)
            self.val_reader = CacheReader(tc.eval_cache, expect={"hidden_size": r.hidden_size,
                                                                 "vocab_size": r.vocab_size, "layers": r.layers})
            self.val_idx = np.arange(len(self.val_reader), dtype=np.int64)
        else:
            self.train_idx, self.val_idx = split_indices(len(r), tc.val_fraction, tc.seed)
            self.val_reader = r
        self.num_val = len(self.val_idx)  # the split; each evaluation reads at most train.eval_max_tokens of it
        self.val_idx = heldout_subset(self.val_idx, cropped_lengths(self.val_reader, self.max_length),
                                      tc.eval_max_tokens, tc.seed)
        self.world, self.G = world_size, grad_accum
        self.cache_id = cache_id(r)
        tcfg = r.target_config()
        overrides = {"embed_scale": float(r.meta.get("embed_scale", 1.0) or 1.0),
                     "target_num_hidden_layers": int(r.meta["target"]["num_hidden_layers"]),
                     **tc.model_overrides}
        self.head_config = make_head_config(tcfg, draft_vocab_size=tc.draft_vocab_size, layer_ids=r.layers,
                                            overrides=overrides)
        if int(self.head_config["hidden_size"]) != r.hidden_size:
            raise CacheError(f"{r.root / 'cache.json'}: hidden_size is {r.hidden_size} but the head config says "
                             f"{self.head_config['hidden_size']} (train.model_overrides or target/config.json)")
        # Steps: epochs of token-budget micro-batches; W*G micro-batches per optimizer step.
        self._spe: list[int] = []
        if tc.max_steps:
            self.total_steps = int(tc.max_steps)
        else:
            self.total_steps = sum(self.spe(e) for e in range(tc.epochs))
        if self.spe(0) == 0:
            raise TrainError(f"{len(self.train_idx)} training samples give {len(self.batches(0))} micro-batches, "
                             f"fewer than world_size x gradient_accumulation_steps = {world_size * grad_accum}")

    def _check_rows(self) -> None:
        r = self.reader
        s = r.sample(0, fields=("hidden", "topk_ids"))
        if s["hidden"].shape[1:] != (3, r.hidden_size):
            raise CacheError(f"{r.root}: shard hidden rows are {s['hidden'].shape[1:]}, cache.json says "
                             f"(3, {r.hidden_size})")
        if s["topk_ids"].shape[1] != r.topk:
            raise CacheError(f"{r.root}: shard top-k is {s['topk_ids'].shape[1]}, cache.json says {r.topk}")

    def order(self, epoch: int) -> EpochOrder:
        """The epoch's chunk-aware order (stage2_train.sampler); the last one asked for is kept."""
        if getattr(self, "_order", (None, None))[0] != epoch:
            tc = self.cfg.train
            shard_of = np.array([ref.shard for ref in self.reader.refs], dtype=np.int64)
            self._order = (epoch, chunk_aware_order(
                shard_of, self.lengths, self.train_idx, micro_batch_size=tc.micro_batch_size,
                max_tokens=tc.max_tokens_per_batch, seed=tc.seed, epoch=epoch, shuffle_buffer=tc.shuffle_buffer,
                open_shards=tc.open_shards))
        return self._order[1]

    def batches(self, epoch: int) -> list[list[int]]:
        return self.order(epoch).batches

    def spe(self, epoch: int) -> int:
        while len(self._spe) <= epoch:
            self._spe.append(steps_per_epoch(len(self.batches(len(self._spe))), self.world, self.G))
        return self._spe[epoch]

    def read_ahead(self, epoch: int, window: int = 32) -> int:
        """Micro-batches the loader reads ahead: one length-sorting window of the sampler (32 x
        micro_batch_size samples), this rank's share of it; the rows it holds scale with that."""
        tc = self.cfg.train
        windows = max(1, math.ceil(len(self.train_idx) / (window * tc.micro_batch_size)))
        per_rank = len(self.batches(epoch)) / windows / self.world
        return max(4, math.ceil(1.25 * per_rank))

    def locate(self, step: int) -> tuple[int, int]:
        """Global optimizer step -> (epoch, step within the epoch)."""
        e = 0
        while step >= self.spe(e):
            step -= self.spe(e)
            e += 1
        return e, step

    def training_block(self, **extra) -> dict:
        tc = self.cfg.train
        return {"cache": str(self.reader.root), "cache_id": self.cache_id,
                "eval_cache": tc.eval_cache, "draft_vocab_size": tc.draft_vocab_size,
                "vocab_coverage": round(self.vocab.coverage, 6), "ttt_length": tc.ttt_length,
                "loss_decay": tc.loss_decay, "loss": tc.loss, "lk_eta": tc.lk_eta,
                "lm_head_init": tc.lm_head_init, "layer_init": tc.layer_init,
                "max_length": self.max_length, "lr": tc.lr, "seed": tc.seed,
                "split": {"val_fraction": 0.0 if tc.eval_cache else tc.val_fraction, "seed": tc.seed,
                          "cache_id": self.cache_id, "num_val": int(self.num_val),
                          "num_train": int(len(self.train_idx))},
                "eval_max_tokens": tc.eval_max_tokens,
                "total_steps": self.total_steps, **extra}


def cache_expectations(cfg: RunConfig) -> dict:
    """What the config pins about the cache (layers, hidden size): checked on open."""
    expect = {}
    if isinstance(cfg.extract.layers, list):
        expect["layers"] = list(cfg.extract.layers)
    for key in ("target_hidden_size", "hidden_size"):
        if key in cfg.train.model_overrides:
            expect["hidden_size"] = int(cfg.train.model_overrides[key])
    return expect


def preflight(cfg: RunConfig) -> None:
    """Cheap checks of the config against the cache(s): clear errors before any work."""
    tc = cfg.train
    r = CacheReader(cfg.train_cache, expect=cache_expectations(cfg))
    if tc.draft_vocab_size > r.vocab_size:
        from stage2_train.vocab import VocabError

        raise VocabError(f"train.draft_vocab_size {tc.draft_vocab_size} is larger than the target's vocabulary "
                         f"({r.vocab_size} tokens, {r.root / 'cache.json'})")
    if tc.eval_cache:
        CacheReader(tc.eval_cache, expect={"hidden_size": r.hidden_size, "vocab_size": r.vocab_size,
                                           "layers": r.layers})
    load_ds_config(cfg, 1)


def rank_param_diff(module, ranks: Ranks) -> float:
    """Largest |param - rank 0's param| over all ranks (0.0 when replicas agree exactly)."""
    worst = torch.zeros(1, dtype=torch.float64, device=ranks.device)
    for p in module.parameters():
        ref = ranks.broadcast(p.detach().clone(), src=0)
        worst = torch.maximum(worst, (p.detach() - ref).abs().max().double().reshape(1))
    return float(ranks.all_reduce(worst, op="max").item())


# --------------------------------------------------------------------------- outputs


def _truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of steps <= step (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln) if ln.strip() else None
        except json.JSONDecodeError:  # a line cut short by a kill or a full disk
            rec = None
        if rec is not None and rec.get("step", 0) <= step:
            keep.append(ln)
    path.write_text("".join(ln + "\n" for ln in keep))


def plot_curves(out: Path) -> Optional[Path]:
    mp = out / "metrics.jsonl"
    if not mp.is_file():
        return None
    rows = [json.loads(ln) for ln in mp.read_text().splitlines() if ln.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    a1.plot(steps, [r["loss"] for r in rows], label="total (Σ decay^k loss_k)", color="black")
    S = len(rows[0]["loss_k"])
    for k in range(S):
        a1.plot(steps, [r["loss_k"][k] for r in rows], label=f"loss_{k}", alpha=0.6)
        a2.plot(steps, [r["acc_k"][k] for r in rows], label=f"acc_{k}", alpha=0.8)
    ev = out / "eval.jsonl"
    if ev.is_file():
        ers = [json.loads(ln) for ln in ev.read_text().splitlines() if ln.strip()]
        if ers:
            a2.plot([e["step"] for e in ers], [e["acc"][0] for e in ers], "k^", label="held-out acc_0")
    a1.set(xlabel="step", ylabel="loss", title="training loss", yscale="log")
    a2.set(xlabel="step", ylabel="accuracy", title="per-position accuracy (train batches)", ylim=(0, 1))
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    fig.tight_layout()
    p = out / "train_curves.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """One training run's state, shared by the functions below (the engine comes after the plan)."""

    cfg: RunConfig
    ranks: Ranks
    plan: Plan
    ds: dict
    out: Path
    lock: Any = None
    engine: Any = None
    amp: Optional[torch.dtype] = None
    start: int = 0
    best: dict = field(default_factory=lambda: {"tau": -1.0, "step": None, "metrics": None})
    bar: Any = None
    wb: Any = None
    watch: Any = None  # schemas.finite.FiniteWatch on the rank's device

    @property
    def tc(self):
        return self.cfg.train

    @property
    def ckdir(self) -> Path:
        return self.out / CKPT_DIR

    @property
    def G(self) -> int:
        return int(self.ds["gradient_accumulation_steps"])

    @property
    def dtype(self) -> str:
        return ds_dtype(self.ds)

    @property
    def zero_stage(self) -> int:
        return int((self.ds.get("zero_optimization") or {}).get("stage", 0))


def run_train(cfg: RunConfig, *, restart: bool = False, progress: bool = True) -> Path:
    """Train a head from `cfg.train_cache`; returns the head directory (`train.output`).

    Reads top-down: plan (cache, split, steps, output directory), the engine (model,
    optimizer, DeepSpeed, resume), the steps (each followed, on schedule, by a held-out
    evaluation and a checkpoint), the head.
    """
    preflight(cfg)  # bad configs fail here, before any process group or DeepSpeed work
    note, cfg = start_note(cfg), resolve_start(cfg)  # train.*_init = auto -> target or random
    ranks = init_distributed()
    if note and ranks.rank == 0:
        print(note, file=sys.stderr, flush=True)
    run = plan_run(cfg, ranks, restart)
    start_engine(run)
    announce(run, progress)
    finish(run, train_steps(run))
    return run.out


def plan_run(cfg: RunConfig, ranks: Ranks, restart: bool) -> Run:
    """The lock on train.output, the DeepSpeed config, the plan; a fresh or resumable output directory."""
    from stage2_train.run_state import lock_output

    out = Path(cfg.train.output)
    lock = lock_output(out, ranks)  # before anything in train.output is touched
    ds = load_ds_config(cfg, ranks.world)
    run = Run(cfg=cfg, ranks=ranks, plan=Plan(cfg, ranks.world, int(ds["gradient_accumulation_steps"])), ds=ds,
              out=out, lock=lock, watch=FiniteWatch(ranks.device))
    if ranks.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if restart:
            shutil.rmtree(run.ckdir, ignore_errors=True)
            for f in ("metrics.jsonl", "eval.jsonl"):
                (out / f).unlink(missing_ok=True)
        (out / "train_config.yaml").write_text(dump_config(cfg))
    ranks.barrier()
    check_resumable(run)
    return run


def run_identity(run: Run) -> dict:
    """What a checkpoint must share with this run to be resumed. The global batch (ranks x accumulation
    micro-batches) fixes the samples of each step, so a run resumes on any number of ranks that keeps it."""
    r = run.plan.reader
    return {"cache_id": run.plan.cache_id, "draft_vocab_size": run.tc.draft_vocab_size,
            "ttt_length": run.tc.ttt_length, "hidden_size": r.hidden_size, "layers": r.layers,
            "global_micro_batches": run.ranks.world * run.G}


def check_resumable(run: Run) -> None:
    p = run.ckdir / "run.json"
    if not (run.ckdir / "latest").is_file() or not p.is_file():
        return
    st = json.loads(p.read_text())
    if "global_micro_batches" not in st and "world_size" in st:  # written before the global batch was recorded
        st["global_micro_batches"] = int(st["world_size"]) * int(st.get("grad_accum", 1))
    for key, now in run_identity(run).items():
        if key in st and st[key] != now:
            hint = (f" (ranks x gradient_accumulation_steps; this run has {run.ranks.world} x {run.G}: set "
                    f"train.gradient_accumulation_steps so that the product is {st[key]})"
                    if key == "global_micro_batches" else "")
            raise TrainError(f"{run.ckdir}: the checkpoint was trained with {key}={st[key]}, this run has {now}"
                             f"{hint}; use --restart to start over (or another train.output)")


def build_model(run: Run) -> Eagle3Draft:
    """The head with the target's frozen embedding and the draft vocab, built on the host (the same initial
    weights on every device)."""
    r = run.plan.reader
    torch.manual_seed(run.tc.seed)
    with torch.device("cpu"):
        model = Eagle3Draft(run.plan.head_config)
    emb = r.load_embedding()
    if tuple(emb.shape) != tuple(model.embed_tokens.weight.shape):
        raise CacheError(f"{r.target_dir()}: embedding is {tuple(emb.shape)}, expected "
                         f"{tuple(model.embed_tokens.weight.shape)} (vocab_size x hidden_size)")
    model.set_embedding(emb)
    model.set_vocab_map(torch.from_numpy(run.plan.vocab.d2t), torch.from_numpy(run.plan.vocab.t2d))
    try:
        if run.tc.lm_head_init == "target":
            init_output_head(r, model, emb, log=run.ranks.rank == 0)
        if run.tc.layer_init == "target":
            init_layer(r, model)
    except StartError as e:
        raise TrainError(str(e)) from None
    return model


def start_engine(run: Run) -> None:
    """Model on the rank's device, AdamW + warmup/cosine, DeepSpeed; the latest checkpoint when there is one."""
    import deepspeed

    tc, plan, device = run.tc, run.plan, run.ranks.device
    model = build_model(run)
    rotary = model.rotary_buffers()  # W5: every rotary buffer, not only inv_freq (longrope reads original_inv_freq)
    model.to(device)
    warmup = int(math.ceil(tc.warmup_ratio * plan.total_steps))
    tag = prepare_resume(run)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr, betas=(0.9, 0.95),
                            weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warmup, plan.total_steps))
    run.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=run.ds)
    # DeepSpeed may cast float buffers to bf16/fp16 (data_types.buffer_dtype); RoPE frequencies must stay exact.
    run.engine.module.restore_rotary_buffers(rotary)
    run.amp = resolve_compute_dtype(tc.compute_dtype, device, run.dtype)
    if tag is not None:
        resume(run, tag, warmup)
    if run.ranks.rank == 0:
        run.ckdir.mkdir(parents=True, exist_ok=True)
        (run.ckdir / "run.json").write_text(json.dumps({**run_identity(run), "world_size": run.ranks.world,
                                                         "grad_accum": run.G}))
        for f in ("metrics.jsonl", "eval.jsonl"):
            _truncate_jsonl(run.out / f, run.start)


def prepare_resume(run: Run) -> Optional[str]:
    """The tag to resume from, or None. A ZeRO checkpoint written by another number of ranks is converted
    by DeepSpeed's own tool into its universal form, which loads on any number of ranks."""
    from stage2_train.run_state import to_universal

    latest = run.ckdir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    saved = json.loads((run.ckdir / "run.json").read_text()).get("world_size") \
        if (run.ckdir / "run.json").is_file() else None
    if run.zero_stage in (1, 2) and saved not in (None, run.ranks.world):
        if run.ranks.rank == 0:
            to_universal(run.ckdir, tag)
        run.ranks.barrier()
        run.ds = {**run.ds, "checkpoint": {**run.ds.get("checkpoint", {}), "load_universal": True}}
    return tag


def resume(run: Run, tag: str, warmup: int) -> None:
    """Weights, optimizer, schedule, data position, best held-out result and RNG states of checkpoint `tag`."""
    from stage2_train.run_state import load_rng_state

    path, client = run.engine.load_checkpoint(str(run.ckdir), load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise TrainError(f"{run.ckdir}: could not load the latest checkpoint; use --restart")
    run.start, run.best = int(client["step"]), client.get("best", run.best)
    # The scheduler's state carries the old step count; a changed train.max_steps/epochs reshapes it.
    for fn in getattr(run.engine.lr_scheduler, "lr_lambdas", []):
        if isinstance(fn, WarmupCosine):
            fn.__init__(warmup, run.plan.total_steps)
    load_rng_state(run.ckdir / tag, run.ranks.rank)  # JSON; DeepSpeed's files are trusted (see run_state)


def announce(run: Run, progress: bool) -> None:
    """Rank 0: the plan in one line, wandb, the progress bar."""
    if run.ranks.rank != 0:
        return
    tc, plan = run.tc, run.plan
    print(f"[stage 2] cache {plan.reader.root}: {len(plan.train_idx)} train / {plan.num_val} held-out samples "
          f"({len(plan.val_idx)} read per evaluation, train.eval_max_tokens={tc.eval_max_tokens}); draft vocab "
          f"{tc.draft_vocab_size} covers {plan.vocab.coverage:.2%} of loss-masked tokens; {plan.total_steps} steps "
          f"(world {run.ranks.world}, accumulation {run.G}, {run.dtype} weights, {dtype_name(run.amp)} compute, "
          f"ZeRO-{run.zero_stage}, {run.ranks.device})" + (f"; resuming at step {run.start}" if run.start else ""),
          flush=True)
    if tc.report_to == "wandb":
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")  # nothing is sent unless the user chose a mode
        run.wb = wandb.init(project=tc.wandb_project, name=run.cfg.name, dir=str(run.out), resume="allow",
                            config=run.cfg.model_dump(mode="json"))
    if progress:
        from tqdm import tqdm

        run.bar = tqdm(total=plan.total_steps, initial=run.start, desc="train", unit="step", dynamic_ncols=True)


def train_steps(run: Run) -> int:
    """Optimizer steps from run.start to the end, epoch by epoch; returns the last step."""
    tc, plan = run.tc, run.plan
    step = run.start
    while step < plan.total_steps:
        epoch, in_epoch = plan.locate(step)
        order = plan.order(epoch)
        mine = rank_schedule(order.batches, rank=run.ranks.rank, world_size=run.ranks.world, grad_accum=run.G,
                             start_step=in_epoch)
        loader = make_train_loader(plan.reader, order.arrivals, mine, plan.vocab.target_to_draft(), plan.max_length,
                                   num_workers=tc.num_workers, threads=tc.loader_threads,
                                   read_ahead=plan.read_ahead(epoch))
        it = iter(loader)
        for s in range(in_epoch, plan.spe(epoch)):
            if step >= plan.total_steps:
                break
            t0 = time.perf_counter()
            sums, gn = train_step(run, it, step + 1)
            step += 1
            log_step(run, step, epoch, sums, gn, t0)
            do_eval = step % tc.eval_every == 0 or step == plan.total_steps
            do_save = step % tc.save_every == 0 or step == plan.total_steps
            if do_eval or do_save or step % tc.log_every == 0:
                stop_if_nonfinite(run)  # before anything is written from this step's weights
            if do_eval:
                evaluate(run, step)
            if do_save:
                checkpoint(run, step, epoch, s + 1)
        del it, loader
    if run.start >= plan.total_steps and len(plan.val_idx) and run.best["metrics"] is None:
        evaluate(run, step)
    return step


def train_step(run: Run, it, step: int) -> tuple[Sums, Optional[float]]:
    """One optimizer step (number `step`, from 1) over this rank's G micro-batches; returns the step's
    all-reduced sums. Its loss and gradient norm go to run.watch (device scalars, no host sync).

    The loss is normalised by the step's global count of loss tokens (all micro-batches of all
    ranks, counted before the forward), so every loss token weighs the same whatever the cut into
    micro-batches and ranks. DeepSpeed divides the gradient by the accumulation steps and averages
    it over ranks; the factor W x G undoes both.
    """
    tc, r, engine = run.tc, run.ranks, run.engine
    host = [next(it) for _ in range(run.G)]
    n_tokens = r.all_reduce(torch.stack([loss_token_counts(b, tc.ttt_length) for b in host]).sum(0).to(r.device))
    sums, gn = Sums(r.device), None
    for g, b in enumerate(host):
        batch = to_device(b, r.device)
        with compute_context(r.device, run.amp):
            o = ttt_forward(engine.module, batch, tc.ttt_length, tc.loss_decay, objective=tc.loss,
                            lk_eta=tc.lk_eta, loss_tokens=n_tokens)
        engine.backward(o.loss * (r.world * run.G))
        if g == run.G - 1 and r.rank == 0 and run.zero_stage == 0 and run.dtype == "float32":
            gn = _grad_norm(engine.module)  # DeepSpeed reports it only for ZeRO / mixed precision
        engine.step()
        run.watch.observe(step, loss=o.loss)
        sums.add(o.sums).add({"tokens": batch["valid"].sum()})
    # fp16 loss scaling overflows on purpose (DeepSpeed skips the step and lowers the scale): loss only there
    if run.dtype != "float16":
        run.watch.observe(step, grad_norm=gn if gn is not None else engine.get_global_grad_norm())
    return sums.all_reduce(r), gn


def stop_if_nonfinite(run: Run) -> None:
    """Every rank raises NonFiniteError alike when a loss or gradient norm so far was inf/NaN (one MIN
    all-reduce, one host read); called before any checkpoint or head is written, so what is on disk is good."""
    try:
        run.watch.check("train", reduce_min=lambda t: run.ranks.all_reduce(t, "min"))
    except NonFiniteError as e:
        latest = run.ckdir / "latest"
        last = (f"the last good checkpoint, {latest.read_text().strip()} in {run.ckdir}, is kept: a rerun resumes "
                f"from it" if latest.is_file() else f"no checkpoint was written to {run.ckdir}")
        raise NonFiniteError(f"{e}; {last} (lower train.lr or check the cache with `eagle3 shards verify`)") from None


def log_step(run: Run, step: int, epoch: int, sums: Sums, gn: Optional[float], t0: float) -> None:
    """Rank 0: metrics.jsonl, wandb, the progress bar (one device-to-host copy per step)."""
    if run.ranks.rank != 0:
        return
    tc = run.tc
    h = sums.host()
    dt = time.perf_counter() - t0
    loss_k = [a / max(b, 1.0) for a, b in zip(h["loss_sum"], h["loss_n"])]
    acc_k = [a / max(b, 1.0) for a, b in zip(h["correct"], h["counted"])]
    alpha_k, alpha_hi_k, mass_out_k = ([a / max(b, 1.0) for a, b in zip(h[row], h["counted"])]
                                       for row in ("alpha_sum", "alpha_hi_sum", "mass_out_sum"))
    if gn is None:
        gn = run.engine.get_global_grad_norm()
    rec = {"step": step, "epoch": epoch, "loss": sum(tc.loss_decay ** k * v for k, v in enumerate(loss_k)),
           "loss_k": loss_k, "acc_k": acc_k, "alpha_k": alpha_k, "alpha_hi_k": alpha_hi_k,
           "mass_out_k": mass_out_k, "lr": float(run.engine.get_lr()[0]),
           "grad_norm": float(gn) if gn is not None else None, "tokens": int(h["tokens"]),
           "tokens_per_s": float(h["tokens"]) / max(dt, 1e-9)}
    with (run.out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(rec) + "\n")
    if run.wb is not None:
        run.wb.log({"loss": rec["loss"], "lr": rec["lr"], "grad_norm": rec["grad_norm"],
                    "tokens_per_s": rec["tokens_per_s"], **{f"loss_{k}": v for k, v in enumerate(loss_k)},
                    **{f"acc_{k}": v for k, v in enumerate(acc_k)},
                    **{f"alpha_{k}": v for k, v in enumerate(alpha_k)},
                    **{f"alpha_hi_{k}": v for k, v in enumerate(alpha_hi_k)}}, step=step)
    if run.bar is not None:
        run.bar.update(1)
        if step % tc.log_every == 0 or step == run.plan.total_steps or step == run.start + 1:
            run.bar.set_postfix(loss=f"{rec['loss']:.3f}", acc_0=f"{acc_k[0]:.3f}",
                                tok_s=f"{rec['tokens_per_s']:.0f}")


def evaluate(run: Run, step: int) -> None:
    """The held-out evaluation, sharded over the ranks (every rank gets the same metrics); rank 0 writes
    eval.jsonl and, on a better simulated τ, the head."""
    plan = run.plan
    if not len(plan.val_idx):
        return
    m = evaluate_model(run.engine.module, plan.val_reader, plan.val_idx, ttt_length=run.tc.ttt_length,
                       decay=run.tc.loss_decay, max_length=plan.max_length,
                       compute_dtype=run.amp, ranks=run.ranks, threads=run.tc.loader_threads)
    better = m["simulated_tau"] > run.best["tau"]
    if better:
        run.best.update(tau=m["simulated_tau"], step=step, metrics=m)
    if run.ranks.rank == 0:
        with (run.out / "eval.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **m}) + "\n")
        if better:
            write_head(run.engine.module, run.out, plan.training_block(best_step=step, heldout=m,
                                                                       compute_dtype=dtype_name(run.amp)))


def checkpoint(run: Run, step: int, epoch: int, in_epoch: int) -> None:
    """DeepSpeed's checkpoint + data position + RNG states; the two newest are kept."""
    from stage2_train.run_state import guarded_checkpoint, rng_file, save_rng_state

    tag, ckdir = f"step{step:08d}", run.ckdir

    def save() -> None:
        (ckdir / tag).mkdir(parents=True, exist_ok=True)
        save_rng_state(rng_file(ckdir / tag, run.ranks.rank))
        run.engine.save_checkpoint(str(ckdir), tag=tag, exclude_frozen_parameters=True,
                                   client_state={"step": step, "epoch": epoch, "step_in_epoch": in_epoch,
                                                 "best": run.best})

    guarded_checkpoint(ckdir, tag, save)
    run.ranks.barrier()
    if run.ranks.rank == 0:  # `latest` now names this tag; older ones, and converted ones, can go
        tags = sorted(p for p in ckdir.iterdir() if p.is_dir() and re.fullmatch(r"step\d{8}", p.name))
        for p in tags[:-KEEP_CHECKPOINTS] + sorted(ckdir.glob("step*_universal")):
            shutil.rmtree(p, ignore_errors=True)
        (ckdir / "latest_universal").unlink(missing_ok=True)


def finish(run: Run, step: int) -> None:
    """The head: last/ always, the best held-out one at the top (else the last); curves; the lock released."""
    if run.bar is not None:
        run.bar.close()
    stop_if_nonfinite(run)
    final = {"final_step": step, "dtype": run.dtype, "compute_dtype": dtype_name(run.amp),
             "world_size": run.ranks.world, "grad_accum": run.G, "zero_stage": run.zero_stage}
    if run.ranks.world > 1:  # data parallel replicas must hold the same head
        final["ranks_max_param_diff"] = rank_param_diff(run.engine.module, run.ranks)
    if run.ranks.rank == 0:
        write_head(run.engine.module, run.out / "last", run.plan.training_block(**final))
        if run.best["metrics"] is None:  # no held-out split: the head is the last one
            write_head(run.engine.module, run.out, run.plan.training_block(**final))
        else:
            cfgp = run.out / "config.json"
            hc = json.loads(cfgp.read_text())
            hc["training"].update(best_step=run.best["step"], **final)
            cfgp.write_text(json.dumps(hc, indent=2))
            table = metrics_table(run.best["metrics"], f"held-out, best step {run.best['step']}")
            (run.out / "heldout_table.md").write_text(table)
            print(table, flush=True)
        plot_curves(run.out)
    if run.wb is not None:
        run.wb.finish()
    run.ranks.barrier()
    if hasattr(run.engine, "destroy"):
        run.engine.destroy()
    if run.lock is not None:
        run.lock.release()
    run.ranks.close()


def check_head_on_cache(head_config: dict, cache_dir: str | Path) -> None:
    """Public helper: fail clearly when a head and a cache disagree (hidden size, vocab, layers)."""
    check_head_vs_cache(head_config, CacheReader(cache_dir))
