"""The device guard for training runs in tests: a host tensor fails on CPU where it fails on a GPU.

Python imports `sitecustomize` at start-up in every process whose path holds this
directory, launchers' workers included, so a test runs the very commands of the README
and of `eagle3 submit` under the guard: it puts this directory on PYTHONPATH and sets
EAGLE3_DEVICE_GUARD=1 (tests/guard.py does both). In such a process:

* `stage2_train.trainer.run_train` runs with torch's default device set to `meta`, the
  main thread only (the loader's threads make host tensors by design): every tensor our
  training code makes without an explicit device is a meta tensor, which cannot be read
  and which the collectives below refuse, where on a GPU it would be a host tensor;
* library code called from there runs with the host default again: DeepSpeed (process
  group, initialize, backward, step, checkpoints, grad norm, lr), torch's optimizer and
  scheduler constructors, and the head's nn.Module constructor (modules put their
  parameters where the default says; the trainer moves the head to its device);
* every torch.distributed collective (ours and DeepSpeed's) refuses a tensor that is not
  on the rank's device (the CPU here), as NCCL refuses one that is not on the GPU; gloo
  alone would accept a meta tensor and carry on.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys

if os.environ.get("EAGLE3_DEVICE_GUARD") == "1":
    COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter",
                   "reduce_scatter_tensor", "all_to_all_single", "send", "recv", "isend", "irecv")
    ENGINE_METHODS = ("backward", "step", "save_checkpoint", "load_checkpoint", "get_global_grad_norm", "get_lr",
                      "destroy")

    def _host_default(fn):
        """Run `fn` with the host as the default device (library code inside the guarded trainer)."""
        import torch

        @functools.wraps(fn)
        def wrapper(*a, **k):
            with torch.device("cpu"):
                return fn(*a, **k)
        return wrapper

    def _on_rank_device(name, fn):
        import torch

        def tensors(x):
            if isinstance(x, torch.Tensor):
                yield x
            elif isinstance(x, (list, tuple)):
                for y in x:
                    yield from tensors(y)

        @functools.wraps(fn)
        def wrapper(*a, **k):
            for t in tensors(list(a) + list(k.values())):
                if t.device.type != "cpu":
                    raise RuntimeError(f"device guard: torch.distributed.{name} got a tensor on {t.device}; the "
                                       f"rank's device is cpu (NCCL refuses a tensor off the rank's GPU the same way)")
            return fn(*a, **k)
        return wrapper

    def _guard_trainer(module) -> None:
        import deepspeed
        import torch
        import torch.distributed as dist
        from deepspeed.runtime.engine import DeepSpeedEngine

        from stage2_train import model as head_model

        for name in COLLECTIVES:
            for ns in (dist, dist.distributed_c10d):
                if hasattr(ns, name):
                    setattr(ns, name, _on_rank_device(name, getattr(ns, name)))
        deepspeed.initialize = _host_default(deepspeed.initialize)
        deepspeed.init_distributed = _host_default(deepspeed.init_distributed)
        for name in ENGINE_METHODS:
            setattr(DeepSpeedEngine, name, _host_default(getattr(DeepSpeedEngine, name)))
        torch.optim.Optimizer.__init__ = _host_default(torch.optim.Optimizer.__init__)
        torch.optim.lr_scheduler.LRScheduler.__init__ = _host_default(torch.optim.lr_scheduler.LRScheduler.__init__)
        head_model.Eagle3Draft.__init__ = _host_default(head_model.Eagle3Draft.__init__)
        run_train = module.run_train

        @functools.wraps(run_train)
        def guarded_run_train(*a, **k):
            print("[device guard] stage 2 runs with default device meta", flush=True)
            with torch.device("meta"):
                head = run_train(*a, **k)
            print(f"[device guard] process group left: {not dist.is_initialized()}", flush=True)
            return head
        module.run_train = guarded_run_train

    class _AfterImport(importlib.abc.MetaPathFinder):
        """Patches stage2_train.trainer right after it is imported."""

        def find_spec(self, name, path, target=None):
            if name != "stage2_train.trainer":
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            exec_module = spec.loader.exec_module

            def exec_and_guard(module):
                exec_module(module)
                _guard_trainer(module)
            spec.loader.exec_module = exec_and_guard
            return spec

    sys.meta_path.insert(0, _AfterImport())
