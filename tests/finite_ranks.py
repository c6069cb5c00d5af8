"""A rank of test_safety_finite's two-process FiniteWatch test (a light module: spawned processes import it)."""
import json
from pathlib import Path

import torch

from schemas.finite import FiniteWatch
from stage2_train.collectives import Ranks


def watch_rank(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    w = FiniteWatch("cpu")
    ranks = Ranks(rank, world, torch.device("cpu"))
    for step in range(8):  # rank 1: NaN loss at step 4; rank 0: inf gradient norm from step 6
        w.observe(step, loss=torch.tensor(float("nan") if rank == 1 and step == 4 else 1.0),
                  grad_norm=torch.tensor(float("inf") if rank == 0 and step >= 6 else 1.0))
    Path(out, f"r{rank}").write_text(json.dumps(w.state(lambda t: ranks.all_reduce(t, "min"))))
    dist.destroy_process_group()
