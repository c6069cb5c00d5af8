"""The rank's process group, and the one door our code takes to it.

Rule (DESIGN.md section 8): every tensor handed to a collective lives on the rank's
compute device. NCCL, the backend on GPUs, refuses host tensors; gloo, the backend
on CPU, accepts anything (a `meta` tensor included), so a host tensor in a collective
passes every CPU test and stops the first real run. So:

* `Ranks` is the only code of ours that calls torch.distributed collectives
  (tests/test_collectives.py reads the sources to hold that), and it refuses, on every
  backend, a tensor that is not on `Ranks.device`, naming the collective: on a GPU,
  where NCCL would fail; on CPU, every tensor made somewhere the work is not.
* The tests run the whole training loop under tests/device_guard (2 ranks, ZeRO-2,
  held-out evaluation, checkpoint, resume): there every tensor that the trainer makes
  without an explicit device lands on `meta`, and every collective refuses a tensor
  off the rank's device. Such a tensor then fails on CPU where a host tensor fails on
  a GPU: at the collective, or when it meets real tensors or is read.

Backends: NCCL on CUDA, gloo on CPU, one group. Objects travel as bytes in a tensor
on the rank's device, so no second (host) group is needed.
"""
from __future__ import annotations

import os
import pickle
import socket
from typing import Any

import torch

class CollectiveDeviceError(RuntimeError):
    """A tensor that is not on the rank's device was handed to a collective."""


class Ranks:
    """This process's rank, the world size, its compute device, and its collectives.

    Every collective takes tensors on `device` only; with one rank they are checked
    the same way and return at once.
    """

    OPS = ("sum", "max", "min")

    def __init__(self, rank: int, world: int, device: torch.device, *, owns_group: bool = False):
        self.rank, self.world, self.device = int(rank), int(world), torch.device(device)
        self.owns_group = owns_group  # init_distributed made the group (a caller's group is the caller's to end)

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, world={self.world}, device={self.device})"

    def _check(self, what: str, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device != self.device:
            where = t.device if isinstance(t, torch.Tensor) else type(t).__name__
            raise CollectiveDeviceError(
                f"{what}: a tensor on {where} was handed to a collective of rank {self.rank}, whose device is "
                f"{self.device} (NCCL takes no host tensors: create it on the rank's device)")

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over all ranks (op: sum, max or min); returns `t`."""
        self._check(f"all_reduce({op})", t)
        if op not in self.OPS:
            raise ValueError(f"all_reduce op must be one of {self.OPS}, not {op!r}")
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                   "min": dist.ReduceOp.MIN}[op])
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In place from rank `src`; returns `t`."""
        self._check("broadcast", t)
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast(t, src=src)
        return t

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """A small picklable value from rank `src` (its bytes travel in a tensor on the rank's device)."""
        if self.world == 1:
            return obj
        data = pickle.dumps(obj) if self.rank == src else b""
        size = self.broadcast(torch.tensor([len(data)], dtype=torch.int64, device=self.device), src)
        n = int(size.item())
        buf = torch.zeros(n, dtype=torch.uint8, device=self.device)
        if self.rank == src:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self.broadcast(buf, src)
        return obj if self.rank == src else pickle.loads(buf.cpu().numpy().tobytes())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the process group after the run's last collective. A group left to the interpreter's
        exit is torn down with its threads still running: a 2-node CPU run's second rank aborted
        there ("terminate called without an active exception", SIGABRT after a finished run), and
        NCCL warns of leaked resources. A group of one stays (a sweep trains many heads in one process),
        and so does a group the caller made (bench/gpu_check_rank.py goes on using its own)."""
        import torch.distributed as dist

        if self.owns_group and self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_inference_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op with ninja when the group
    is made: 26 s on 2 cores, again for every new venv (the build is keyed by its include paths).
    Only inference tensor parallelism calls it (inference_all_reduce); training's collectives go
    through torch.distributed. Marking the op incompatible skips the build."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def init_distributed() -> Ranks:
    """Join the launcher's process group (torchrun, the deepspeed launcher), or make a group of one."""
    import deepspeed
    import torch.distributed as dist

    # The rank's GPU first: NCCL's communicator and the first barrier bind to the current device
    # (else torch guesses it from the global rank, wrong on nodes with other rank-to-GPU maps).
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    made = not dist.is_initialized()
    if made:
        if "WORLD_SIZE" not in os.environ:  # no launcher: a group of one (else DeepSpeed tries MPI)
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                               "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
                               "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port()))})
        _skip_inference_shm_op()
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    return Ranks(dist.get_rank(), dist.get_world_size(), device, owns_group=made)
