"""Small feature caches for stage-2 tests, built from a tiny random target by stage 1's
own `run_extract` (the real writer)."""
from __future__ import annotations

import shutil
from pathlib import Path

from tiny import sharegpt_rows, tiny_target, write_jsonl


def _make_peaked(tdir: Path, residual_scale: float = 0.03, logit_scale: float = 4.0) -> None:
    """Make a random target behave a little like a language model.

    A random target's next-token distribution is nearly uniform and a chaotic function of
    the context (top-1 prob ~5%), so nothing can learn it. Shrinking what each layer adds
    to the residual stream and sharpening the logits gives a target whose top-1 depends
    mostly on the current token and partly on the context: learnable, not trivial.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tdir), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(residual_scale)
        model.get_output_embeddings().weight.mul_(logit_scale)
    model.save_pretrained(str(tdir))


def build_cache(root: str | Path, *, n_samples: int = 48, samples_per_shard: int = 16, topk: int = 8,
                family: str = "llama", layers: list[int] | None = None, hidden: int = 64, num_layers: int = 6,
                seed: int = 0, turns: int = 1, target_dir: str | Path | None = None,
                peaked: bool = True) -> tuple[Path, Path]:
    """Build a cache under root/cache from a tiny random target saved in root/target. Returns (cache, target).

    Always stage 1's own `run_extract`: an import error there is an error of every test
    that uses this fixture, never a reason to fall back to another writer.
    """
    from schemas.config import load_config
    from stage1_extract.extract import run_extract

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tdir = Path(target_dir) if target_dir else tiny_target(root / "target", family, hidden=hidden, layers=num_layers,
                                                           seed=seed)
    if target_dir is None and peaked:
        _make_peaked(tdir)
    data = write_jsonl(root / "train.jsonl", sharegpt_rows(n_samples, seed=seed, turns=turns))
    cache = root / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # stage 1 resumes: a fixture always starts fresh
    cfg = load_config(raw={"target": {"path": str(tdir), "dtype": "float32", "device": "cpu"},
                           "data": {"train": [str(data)], "max_length": 512},
                           "extract": {"cache": str(cache), "layers": layers or "auto", "topk": topk,
                                       "samples_per_shard": samples_per_shard}})
    return Path(run_extract(cfg, progress=False)), tdir
