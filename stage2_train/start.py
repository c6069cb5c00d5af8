"""How a head starts: train.layer_init / train.lm_head_init.

`target` starts the decoder layer (and fc) from the target's last layer and the lm_head and final
norm from the target's output head, both kept in the cache by stage 1; `random` starts from scratch.
`auto` (the default) is `target` when the cache holds the last layer and `random` when it does not
(a cache written before stage 1 kept it, or a target whose layer is not Llama-shaped). The output
head follows the layer under `auto`: the target's sharp output layer on an untrained decoder layer
trained worse than scratch (README, "Starting the head from the target's output layer").

`resolve_start` turns `auto` into what it does, against the cache on disk; training, the head's
config.json and the pipeline's fingerprints all see the resolved values, so a head trained before
`auto` existed, on a cache without the layer, stays finished.
"""
from __future__ import annotations

import sys
from pathlib import Path

from schemas.cache import LAYER_FILE, TARGET_DIR, CacheReader
from schemas.config import RunConfig


class StartError(RuntimeError):
    """The requested start cannot be made from this cache."""


def cache_has_layer(cache: str | Path) -> bool:
    return (Path(cache) / TARGET_DIR / LAYER_FILE).is_file()


def _no_layer(target_dir: Path) -> str:
    return (f"{target_dir} has no {LAYER_FILE} (a cache written before stage 1 kept it, or a target whose "
            f"layer is not Llama-shaped)")


def resolve_start(cfg: RunConfig) -> RunConfig:
    """cfg with train.layer_init / lm_head_init = auto replaced by target or random (see the module doc)."""
    tc = cfg.train
    if "auto" not in (tc.layer_init, tc.lm_head_init):
        return cfg
    layer = tc.layer_init
    if layer == "auto":
        layer = "target" if cache_has_layer(cfg.train_cache) else "random"
    head = layer if tc.lm_head_init == "auto" else tc.lm_head_init
    return cfg.model_copy(update={"train": tc.model_copy(update={"layer_init": layer, "lm_head_init": head})})


def start_note(cfg: RunConfig) -> str | None:
    """One line for the log when `auto` starts from scratch (the user may expect the target start)."""
    if cfg.train.layer_init == "auto" and not cache_has_layer(cfg.train_cache):
        return (f"[stage 2] note: {_no_layer(Path(cfg.train_cache) / TARGET_DIR)}: the head starts from "
                f"scratch (train.layer_init=auto); re-extract to start from the target's last layer")
    return None


def init_layer(reader: CacheReader, model) -> None:
    """layer_init = target: the head's decoder layer (and fc) from the target's last layer."""
    layer = reader.load_last_layer()
    if layer is None:
        raise StartError(f"train.layer_init=target: {_no_layer(reader.target_dir())}")
    try:
        model.init_layer_from(layer)
    except ValueError as e:
        raise StartError(f"train.layer_init=target: {e}") from None


def init_output_head(reader: CacheReader, model, emb, *, log: bool) -> None:
    """lm_head_init = target: the head's lm_head and final norm from the target's (the cache's
    lm_head.safetensors; a cache written before stage 1 kept it still has the embedding, which is the
    output head of a target with tied embeddings)."""
    head = reader.load_lm_head()
    if head is None and reader.target_config().get("tie_word_embeddings"):
        head = {"weight": emb}
    if head is None:
        if log:
            print(f"[stage 2] note: {reader.target_dir()} has no lm_head.safetensors (a cache written before "
                  f"stage 1 kept the target's output head) and the target's embeddings are not tied: the "
                  f"lm_head starts random (train.lm_head_init=target needs it)", file=sys.stderr, flush=True)
        return
    try:
        model.init_output_from(head["weight"], head.get("norm"))
    except ValueError as e:
        raise StartError(f"train.lm_head_init=target: {e}") from None
