"""Tiny inputs for the benchmarks' --quick modes (the test suite runs every bench script with
--quick, tests/test_bench_quick.py): a random tiny target and synthetic conversations from
tests/tiny.py, and a cache extracted from them. Seconds, no downloads, no real data."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def tiny_inputs(work: Path, n: int = 12, *, hidden: int = 64, layers: int = 6, turns: int = 1) -> tuple[Path, Path]:
    """(HF dir of a random tiny llama with a ChatML tokenizer, ShareGPT jsonl of n conversations)."""
    from tiny import sharegpt_rows, tiny_target, write_jsonl

    work.mkdir(parents=True, exist_ok=True)
    target = work / "tiny-target"
    if not (target / "config.json").is_file():
        tiny_target(target, "llama", hidden=hidden, layers=layers)
    return target, write_jsonl(work / "tiny-data.jsonl", sharegpt_rows(n, seed=1, turns=turns))


def tiny_cache(work: Path, n: int = 12, *, hidden_dtype: str = "bf16", per_shard: int = 4) -> Path:
    """A cache extracted (stage 1) from tiny_inputs."""
    from schemas.config import load_config
    from stage1_extract.extract import run_extract

    target, data = tiny_inputs(work, n)
    cfg = load_config(raw={"target": {"path": str(target), "dtype": "float32", "device": "cpu"},
                           "data": {"train": [str(data)], "max_length": 256},
                           "extract": {"cache": str(work / f"cache-{hidden_dtype}"), "topk": 8,
                                       "samples_per_shard": per_shard, "hidden_dtype": hidden_dtype}})
    return Path(run_extract(cfg, progress=False))
