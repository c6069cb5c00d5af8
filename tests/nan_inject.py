"""`eagle3` with a NaN loss injected at one training step: `python -m nan_inject STEP RANK eagle3-args...`.

Used by tests/test_safety_train_nonfinite.py (also under torchrun). The training loss of the
first micro-batch of optimizer step STEP (counted from 1) on rank RANK is multiplied by NaN,
as an overflowing forward would make it; everything else is the real command."""
import dataclasses
import os
import sys

import stage2_train.trainer as trainer

STEP, RANK = int(sys.argv[1]), int(sys.argv[2])
real_forward, calls = trainer.ttt_forward, [0]


def poisoned_forward(*args, **kwargs):
    o = real_forward(*args, **kwargs)
    calls[0] += 1
    grad_accum = int(os.environ.get("NAN_INJECT_GRAD_ACCUM", "1"))
    if int(os.environ.get("RANK", "0")) == RANK and calls[0] == (STEP - 1) * grad_accum + 1:
        o = dataclasses.replace(o, loss=o.loss * float("nan"))
    return o


trainer.ttt_forward = poisoned_forward

if __name__ == "__main__":
    from pipeline.cli import main

    sys.argv = ["eagle3", *sys.argv[3:]]
    main()
