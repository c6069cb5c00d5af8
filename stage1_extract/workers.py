"""Which slice of the shards this process extracts: worker r of W takes shards k with k mod W == r.

Sources, first match wins:
1. an explicit `--worker r/W` (or a (r, W) tuple),
2. torchrun: RANK / WORLD_SIZE (LOCAL_RANK picks the GPU),
3. a Slurm array: SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (ids counted from SLURM_ARRAY_TASK_MIN),
4. otherwise the single worker 0/1.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional, Union


class WorkerError(ValueError):
    pass


@dataclass(frozen=True)
class Worker:
    rank: int
    world: int
    source: str = "single"
    local_rank: Optional[int] = None  # GPU index on this node (torchrun), None = let the target pick

    def owns(self, shard: int) -> bool:
        return shard % self.world == self.rank

    def __str__(self) -> str:
        return f"{self.rank}/{self.world}"


def parse_worker(spec: str) -> tuple[int, int]:
    """'r/W' -> (r, W) with 0 <= r < W."""
    parts = spec.strip().split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise WorkerError(f"--worker '{spec}': expected r/W with integers, e.g. --worker 0/4")
    r, w = int(parts[0]), int(parts[1])
    _check(r, w, f"--worker {spec}")
    return r, w


def _check(r: int, w: int, where: str) -> None:
    if w < 1:
        raise WorkerError(f"{where}: the number of workers must be >= 1 (got {w})")
    if not 0 <= r < w:
        raise WorkerError(f"{where}: worker index {r} is outside 0..{w - 1}")


def _int_env(env: Mapping[str, str], key: str) -> int:
    v = env[key]
    try:
        return int(v)
    except ValueError:
        raise WorkerError(f"environment variable {key}={v!r} is not an integer") from None


def resolve_worker(worker: Union[str, tuple[int, int], None] = None,
                   env: Optional[Mapping[str, str]] = None) -> Worker:
    env = os.environ if env is None else env
    if worker is not None:
        r, w = parse_worker(worker) if isinstance(worker, str) else (int(worker[0]), int(worker[1]))
        _check(r, w, f"worker {r}/{w}")
        return Worker(r, w, "explicit", _local_rank(env))
    if "RANK" in env and "WORLD_SIZE" in env:
        r, w = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
        _check(r, w, "torchrun RANK/WORLD_SIZE")
        return Worker(r, w, "torchrun", _local_rank(env))
    if "SLURM_ARRAY_TASK_ID" in env:
        tid = _int_env(env, "SLURM_ARRAY_TASK_ID")
        lo = _int_env(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        if "SLURM_ARRAY_TASK_COUNT" not in env:
            raise WorkerError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not "
                              "(submit with --array=0-N, or pass --worker r/W)")
        w = _int_env(env, "SLURM_ARRAY_TASK_COUNT")
        _check(tid - lo, w, f"Slurm array task {tid} (min {lo}, count {w})")
        return Worker(tid - lo, w, "slurm-array", None)
    return Worker(0, 1, "single", None)


def _local_rank(env: Mapping[str, str]) -> Optional[int]:
    return _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else None
