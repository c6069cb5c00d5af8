"""One rank of gpu_check.py's stage-2 collectives check (run by torchrun, 2 ranks).

The process group is created here with --backend (NCCL on 2 GPUs; gloo when the ranks
share one GPU, which NCCL refuses), both ranks on cuda:0 in that case. Every
torch.distributed collective is wrapped: the device of each tensor handed to it is
recorded, and a tensor off the rank's compute device is listed (NCCL refuses CPU
tensors; gloo takes them, so on one GPU this list is what NCCL would have refused).
Then the real trainer (stage2_train.trainer.run_train) runs --steps steps; rank 0 writes
--report: calls counted, ops seen, off-device calls, world size, the ranks' parameter
difference from the head's config.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPS = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
       "reduce", "all_to_all_single", "gather", "scatter", "_all_gather_base", "_reduce_scatter_base")


def guard_collectives(device_type: str, log: dict) -> None:
    """Wrap torch.distributed's collectives: record every call and the tensors off `device_type`."""
    import torch
    import torch.distributed as dist

    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            for y in x:
                yield from tensors(y)

    def wrap(name, fn):
        def guarded(*args, **kwargs):
            log["calls"] += 1
            log["ops"].add(name)
            off = [f"{tuple(t.shape)} {t.dtype} on {t.device}" for a in (*args, *kwargs.values())
                   for t in tensors(a) if t.device.type != device_type]
            if off:
                where = "".join(traceback.format_stack(limit=4)[:-1]).strip().splitlines()
                log["off_device"].append({"op": name, "tensors": off[:4], "at": where[-2:]})
            return fn(*args, **kwargs)

        return guarded

    for name in OPS:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--backend", choices=("nccl", "gloo"), required=True)
    ap.add_argument("--device", choices=("cuda", "cpu"), required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--report", required=True)
    a = ap.parse_args()
    import torch
    import torch.distributed as dist

    if a.device == "cuda" and torch.cuda.device_count() < 2:
        os.environ["LOCAL_RANK"] = "0"  # both ranks share cuda:0 (the trainer sets its device from LOCAL_RANK)
    if a.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(a.backend)  # the trainer joins this group instead of creating an NCCL one
    log = {"calls": 0, "ops": set(), "off_device": []}
    guard_collectives(a.device, log)

    from pipeline.common import get_config
    from stage2_train.trainer import run_train

    cfg = get_config(a.config, [f"train.output={a.output}", f"train.max_steps={a.steps}"])
    head = run_train(cfg, restart=True, progress=False)
    if dist.get_rank() == 0:
        rows = (Path(head) / "metrics.jsonl").read_text().splitlines()
        training = json.loads((Path(head) / "config.json").read_text())["training"]
        Path(a.report).write_text(json.dumps({
            "steps": len(rows), "calls": log["calls"], "ops": sorted(log["ops"]), "off_device": log["off_device"],
            "world_size": training.get("world_size"), "ranks_max_param_diff": training.get("ranks_max_param_diff")},
            indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
