"""Stage 2: train an EAGLE-3 head from the feature cache with DeepSpeed (the target is never loaded).

One process on CPU runs without a launcher (the rendezvous environment is set here,
gloo backend); several run under `torchrun` or the `deepspeed` launcher. ZeRO 0-2,
bf16/fp16/fp32, gradient accumulation and clipping come from the DeepSpeed JSON
(`train.deepspeed`; "auto" values are filled from the train config); the optimizer
(AdamW) and the schedule (linear warmup + cosine decay) are ours.

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
import shutil
import socket
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from schemas.cache import CacheError, CacheReader
from schemas.config import ConfigError, RunConfig, dump_config
from schemas.head import make_head_config
from stage2_train.data import (cropped_lengths, make_train_loader, rank_schedule, split_indices, steps_per_epoch,
                               to_device)
from stage2_train.evaluate import cache_id, check_head_vs_cache, evaluate_model, metrics_table
from stage2_train.export import write_head
from stage2_train.losses import ttt_forward
from stage2_train.model import Eagle3Draft
from stage2_train.precision import compute_context, dtype_name, resolve_compute_dtype
from stage2_train.sampler import EpochOrder, chunk_aware_order
from stage2_train.vocab import build_draft_vocab

CKPT_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2


class TrainError(RuntimeError):
    """A training run that cannot start or resume as configured."""


# --------------------------------------------------------------------------- setup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Join (or create) the process group; returns (rank, world_size, device)."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:  # no launcher: a group of one (else DeepSpeed tries MPI)
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                               "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
                               "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port()))})
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


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
                "loss_decay": tc.loss_decay, "max_length": self.max_length, "lr": tc.lr, "seed": tc.seed,
                "split": {"val_fraction": 0.0 if tc.eval_cache else tc.val_fraction, "seed": tc.seed,
                          "cache_id": self.cache_id, "num_val": int(len(self.val_idx)),
                          "num_train": int(len(self.train_idx))},
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


def rank_param_diff(module) -> float:
    """Largest |param - rank 0's param| over all ranks (0.0 when replicas agree exactly)."""
    import torch.distributed as dist

    worst = torch.zeros(1, dtype=torch.float64)
    for p in module.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, src=0)
        worst = torch.maximum(worst, (p.detach() - ref).abs().max().double().cpu().reshape(1))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


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


def run_train(cfg: RunConfig, *, restart: bool = False, progress: bool = True) -> Path:
    """Train a head from `cfg.train_cache`; returns the head directory (`train.output`)."""
    import deepspeed
    import torch.distributed as dist

    from stage2_train.run_state import guarded_checkpoint, load_rng_state, lock_output, rng_file, save_rng_state

    tc = cfg.train
    out = Path(tc.output)
    preflight(cfg)  # bad configs fail here, before any process group or DeepSpeed work
    rank, world, device = init_distributed()
    out_lock = lock_output(out, rank, world)  # before anything in train.output is touched
    ds = load_ds_config(cfg, world)
    G = int(ds["gradient_accumulation_steps"])
    plan = Plan(cfg, world, G)
    ckdir = out / CKPT_DIR

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if restart:
            shutil.rmtree(ckdir, ignore_errors=True)
            for f in ("metrics.jsonl", "eval.jsonl"):
                (out / f).unlink(missing_ok=True)
        (out / "train_config.yaml").write_text(dump_config(cfg))
    dist.barrier()

    resume = (ckdir / "latest").is_file()
    # What a checkpoint must share with this run to be resumed (ZeRO partitions depend on world size).
    run_identity = {"cache_id": plan.cache_id, "draft_vocab_size": tc.draft_vocab_size, "ttt_length": tc.ttt_length,
                    "hidden_size": plan.reader.hidden_size, "layers": plan.reader.layers, "world_size": world,
                    "grad_accum": G}
    if resume:
        st = json.loads((ckdir / "run.json").read_text()) if (ckdir / "run.json").is_file() else {}
        for key in ("cache_id", "draft_vocab_size", "ttt_length", "hidden_size", "layers", "world_size",
                    "grad_accum"):
            now = run_identity[key]
            if key in st and st[key] != now:
                raise TrainError(f"{ckdir}: the checkpoint was trained with {key}={st[key]}, this run has {now}; "
                                 "use --restart to start over (or another train.output)")

    torch.manual_seed(tc.seed)
    model = Eagle3Draft(plan.head_config)
    emb = plan.reader.load_embedding()
    if tuple(emb.shape) != tuple(model.embed_tokens.weight.shape):
        raise CacheError(f"{plan.reader.target_dir()}: embedding is {tuple(emb.shape)}, expected "
                         f"{tuple(model.embed_tokens.weight.shape)} (vocab_size x hidden_size)")
    model.set_embedding(emb)
    model.set_vocab_map(torch.from_numpy(plan.vocab.d2t), torch.from_numpy(plan.vocab.t2d))
    rotary = model.rotary_buffers()  # W5: every rotary buffer, not only inv_freq (longrope reads original_inv_freq)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
    warmup = int(math.ceil(tc.warmup_ratio * plan.total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warmup, plan.total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    # DeepSpeed may cast float buffers to bf16/fp16 (data_types.buffer_dtype; older versions cast them all);
    # RoPE frequencies must stay exact.
    engine.module.restore_rotary_buffers(rotary)
    dtype = ds_dtype(ds)
    amp = resolve_compute_dtype(tc.compute_dtype, device, dtype)
    zero_stage = int((ds.get("zero_optimization") or {}).get("stage", 0))

    start, best = 0, {"tau": -1.0, "step": None, "metrics": None}
    if resume:
        path, client = engine.load_checkpoint(str(ckdir), load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise TrainError(f"{ckdir}: could not load the latest checkpoint; use --restart")
        start = int(client["step"])
        best = client.get("best", best)
        # The scheduler's state carries the old step count; a changed train.max_steps/epochs reshapes it.
        for fn in getattr(engine.lr_scheduler, "lr_lambdas", []):
            if isinstance(fn, WarmupCosine):
                fn.__init__(warmup, plan.total_steps)
        load_rng_state(Path(path).parent, rank)  # JSON; DeepSpeed's files above are trusted (see run_state)
    if rank == 0:
        ckdir.mkdir(parents=True, exist_ok=True)
        (ckdir / "run.json").write_text(json.dumps(run_identity))
        for f in ("metrics.jsonl", "eval.jsonl"):
            _truncate_jsonl(out / f, start)
        print(f"[stage 2] cache {plan.reader.root}: {len(plan.train_idx)} train / {len(plan.val_idx)} held-out "
              f"samples; draft vocab {tc.draft_vocab_size} covers {plan.vocab.coverage:.2%} of loss-masked tokens; "
              f"{plan.total_steps} steps (world {world}, accumulation {G}, {dtype} weights, {dtype_name(amp)} compute, "
              f"ZeRO-{(ds.get('zero_optimization') or {}).get('stage', 0)})"
              + (f"; resuming at step {start}" if start else ""), flush=True)

    wb = None
    if rank == 0 and tc.report_to == "wandb":
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")  # nothing is sent unless the user chose a mode
        wb = wandb.init(project=tc.wandb_project, name=cfg.name, dir=str(out), resume="allow",
                        config=cfg.model_dump(mode="json"))

    bar = None
    if rank == 0 and progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def evaluate(step: int) -> None:
        if not len(plan.val_idx):
            return
        res = [None]
        if rank == 0:
            m = evaluate_model(engine.module, plan.val_reader, plan.val_idx, ttt_length=tc.ttt_length,
                               decay=tc.loss_decay, max_tokens=max(tc.max_tokens_per_batch, 4096),
                               max_length=plan.max_length, compute_dtype=amp)
            with (out / "eval.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, **m}) + "\n")
            if m["simulated_tau"] > best["tau"]:
                best.update(tau=m["simulated_tau"], step=step, metrics=m)
                write_head(engine.module, out, plan.training_block(best_step=step, heldout=m,
                                                                    compute_dtype=dtype_name(amp)))
            res[0] = dict(best)
        dist.broadcast_object_list(res, src=0)
        best.update(res[0])

    def checkpoint(step: int, epoch: int, in_epoch: int) -> None:
        tag = f"step{step:08d}"

        def save() -> None:
            (ckdir / tag).mkdir(parents=True, exist_ok=True)
            save_rng_state(rng_file(ckdir / tag, rank))
            engine.save_checkpoint(str(ckdir), tag=tag, exclude_frozen_parameters=True,
                                   client_state={"step": step, "epoch": epoch, "step_in_epoch": in_epoch,
                                                 "best": best})

        guarded_checkpoint(ckdir, tag, save)
        dist.barrier()
        if rank == 0:  # `latest` now names this tag; older ones can go
            tags = sorted(p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith("step"))
            for p in tags[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(p, ignore_errors=True)

    step = start
    t_last = time.perf_counter()
    while step < plan.total_steps:
        epoch, in_epoch = plan.locate(step)
        order = plan.order(epoch)
        sched_b = rank_schedule(order.batches, rank=rank, world_size=world, grad_accum=G, start_step=in_epoch)
        loader = make_train_loader(plan.reader, order.arrivals, sched_b, plan.vocab.target_to_draft(),
                                   plan.max_length, num_workers=tc.num_workers, threads=tc.loader_threads)
        it = iter(loader)
        for s in range(in_epoch, plan.spe(epoch)):
            if step >= plan.total_steps:
                break
            stats = torch.zeros(5, tc.ttt_length, dtype=torch.float64)
            gn = None
            for g in range(G):
                batch = to_device(next(it), device)
                with compute_context(device, amp):
                    o = ttt_forward(engine.module, batch, tc.ttt_length, tc.loss_decay)
                engine.backward(o.loss)
                if g == G - 1 and zero_stage == 0 and dtype == "float32":
                    gn = _grad_norm(engine.module)  # DeepSpeed reports it only for ZeRO / mixed precision
                engine.step()
                stats[0] += o.loss_sum
                stats[1] += o.loss_n
                stats[2] += o.correct
                stats[3] += o.counted
                stats[4, 0] += batch["tokens"]
            step += 1
            if world > 1:
                dist.all_reduce(stats)
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            if rank == 0:
                loss_k = (stats[0] / stats[1].clamp_min(1)).tolist()
                acc_k = (stats[2] / stats[3].clamp_min(1)).tolist()
                if gn is None:
                    gn = engine.get_global_grad_norm()
                rec = {"step": step, "epoch": epoch, "loss": sum(tc.loss_decay ** k * l for k, l in enumerate(loss_k)),
                       "loss_k": loss_k, "acc_k": acc_k, "lr": float(engine.get_lr()[0]),
                       "grad_norm": float(gn) if gn is not None else None, "tokens": int(stats[4, 0]),
                       "tokens_per_s": float(stats[4, 0]) / max(dt, 1e-9)}
                with (out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                if wb is not None:
                    wb.log({"loss": rec["loss"], "lr": rec["lr"], "grad_norm": rec["grad_norm"],
                            "tokens_per_s": rec["tokens_per_s"],
                            **{f"loss_{k}": v for k, v in enumerate(loss_k)},
                            **{f"acc_{k}": v for k, v in enumerate(acc_k)}}, step=step)
                if bar is not None:
                    bar.update(1)
                    if step % tc.log_every == 0 or step == plan.total_steps or step == start + 1:
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc_0=f"{acc_k[0]:.3f}",
                                        tok_s=f"{rec['tokens_per_s']:.0f}")
            if step % tc.eval_every == 0 or step == plan.total_steps:
                evaluate(step)
            if step % tc.save_every == 0 or step == plan.total_steps:
                checkpoint(step, epoch, s + 1)
        del it, loader
    if bar is not None:
        bar.close()
    if start >= plan.total_steps and len(plan.val_idx) and best["metrics"] is None:
        evaluate(step)

    final = {"final_step": step, "dtype": dtype, "compute_dtype": dtype_name(amp), "world_size": world, "grad_accum": G, "zero_stage": zero_stage}
    if world > 1:  # data parallel replicas must hold the same head
        final["ranks_max_param_diff"] = rank_param_diff(engine.module)
    if rank == 0:
        write_head(engine.module, out / "last", plan.training_block(**final))
        if best["metrics"] is None:  # no held-out split: the head is the last one
            write_head(engine.module, out, plan.training_block(**final))
        else:
            cfgp = out / "config.json"
            hc = json.loads(cfgp.read_text())
            hc["training"].update(best_step=best["step"], **final)
            cfgp.write_text(json.dumps(hc, indent=2))
            table = metrics_table(best["metrics"], f"held-out, best step {best['step']}")
            (out / "heldout_table.md").write_text(table)
            print(table, flush=True)
        plot_curves(out)
    if wb is not None:
        wb.finish()
    dist.barrier()
    if hasattr(engine, "destroy"):
        engine.destroy()
    if out_lock is not None:
        out_lock.release()
    return out


def check_head_on_cache(head_config: dict, cache_dir: str | Path) -> None:
    """Public helper: fail clearly when a head and a cache disagree (hidden size, vocab, layers)."""
    check_head_vs_cache(head_config, CacheReader(cache_dir))
