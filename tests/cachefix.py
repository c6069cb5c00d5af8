"""Small feature caches for stage-2 tests, built from a tiny random target.

Uses stage 1's `run_extract` when it is importable (the real writer); otherwise
writes the documented layout (DESIGN.md section 4) itself with schemas.cache.write_shard:
the target runs forward with output_hidden_states, rows keep the layer ids' hidden
states (bf16 bits), the top-K log-probs of the full-vocab softmax and the loss mask of
the assistant turns.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from tiny import sharegpt_rows, tiny_target, write_jsonl


def _conversation_rows(tok, conv: list[dict]) -> tuple[list[int], list[int]]:
    """ChatML ids + loss mask (assistant content and its <|im_end|>), segment by segment."""
    ids, mask = [], []
    for turn in conv:
        role = "user" if turn["from"] == "human" else "assistant"
        head = tok.encode(f"<|im_start|>{role}\n", add_special_tokens=False)
        body = tok.encode(turn["value"], add_special_tokens=False) + tok.encode("<|im_end|>", add_special_tokens=False)
        tail = tok.encode("\n", add_special_tokens=False)
        ids += head + body + tail
        m = 1 if role == "assistant" else 0
        mask += [0] * len(head) + [m] * len(body) + [0] * len(tail)
    return ids, mask


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
    """Build a cache under root/cache from a tiny random target saved in root/target. Returns (cache, target)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from schemas.cache import CACHE_JSON, EMBED_FILE, SCHEMA_ID, TARGET_DIR, bf16_to_bits, build_manifest, write_shard

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tdir = Path(target_dir) if target_dir else tiny_target(root / "target", family, hidden=hidden, layers=num_layers,
                                                           seed=seed)
    if target_dir is None and peaked:
        _make_peaked(tdir)
    rows = sharegpt_rows(n_samples, seed=seed, turns=turns)
    data = write_jsonl(root / "train.jsonl", rows)
    cache = root / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # stage 1 resumes: a fixture always starts fresh
    try:  # the real stage 1, when it exists
        from stage1_extract.extract import run_extract  # noqa: F401
        from schemas.config import load_config

        cfg = load_config(raw={"target": {"path": str(tdir), "dtype": "float32", "device": "cpu"},
                               "data": {"train": [str(data)], "max_length": 512},
                               "extract": {"cache": str(cache), "layers": layers or "auto", "topk": topk,
                                           "samples_per_shard": samples_per_shard}})
        return Path(run_extract(cfg, progress=False)), tdir
    except ImportError:
        pass

    tok = AutoTokenizer.from_pretrained(str(tdir))
    model = AutoModelForCausalLM.from_pretrained(str(tdir), dtype=torch.float32).eval()
    L = model.config.num_hidden_layers
    layer_ids = layers or [2, L // 2, L - 3]
    V = model.config.vocab_size
    embed_scale = float(getattr(model.config, "scale_emb", 1.0) or 1.0)
    shutil.rmtree(cache, ignore_errors=True)
    (cache / TARGET_DIR).mkdir(parents=True)
    shutil.copy(tdir / "config.json", cache / TARGET_DIR / "config.json")
    save_file({"weight": model.get_input_embeddings().weight.detach().clone().contiguous()},
              str(cache / TARGET_DIR / EMBED_FILE))
    samples = [_conversation_rows(tok, r["conversations"]) for r in rows]
    for k in range(0, -(-len(samples) // samples_per_shard)):
        part = samples[k * samples_per_shard:(k + 1) * samples_per_shard]
        cols = {n: [] for n in ("input_ids", "loss_mask", "hidden", "topk_ids", "topk_logprobs")}
        counts = np.zeros(V, dtype=np.int64)
        for ids, mask in part:
            x = torch.tensor([ids])
            with torch.no_grad():
                out = model(x, output_hidden_states=True)
            hs = torch.stack([out.hidden_states[i][0] for i in layer_ids], dim=1)  # [T, 3, H]
            lp = torch.log_softmax(out.logits[0].float(), dim=-1)
            tv, ti = lp.topk(topk, dim=-1)
            cols["input_ids"].append(np.array(ids, dtype=np.int32))
            cols["loss_mask"].append(np.array(mask, dtype=np.uint8))
            cols["hidden"].append(bf16_to_bits(hs.to(torch.bfloat16)))
            cols["topk_ids"].append(ti.numpy().astype(np.int32))
            cols["topk_logprobs"].append(tv.numpy().astype(np.float16))
            np.add.at(counts, np.array(ids)[np.array(mask, dtype=bool)], 1)
        arrays = {n: np.concatenate(v) for n, v in cols.items()}
        lens = [len(i) for i, _ in part]
        arrays["offsets"] = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        arrays["sample_index"] = np.arange(k * samples_per_shard, k * samples_per_shard + len(part), dtype=np.int64)
        arrays["token_counts"] = counts
        write_shard(cache, k, arrays, chunk_rows=256)
    meta = {
        "schema": SCHEMA_ID,
        "target": {"name": tdir.name, "path": str(tdir), "model_type": model.config.model_type,
                   "num_hidden_layers": L, "hidden_size": model.config.hidden_size, "vocab_size": V,
                   "dtype": "float32"},
        "layers": layer_ids, "topk": topk, "max_length": 512, "samples_per_shard": samples_per_shard,
        "embed_scale": embed_scale, "tool_version": "tests.cachefix",
    }
    (cache / CACHE_JSON).write_text(json.dumps(meta, indent=1))
    build_manifest(cache)
    return cache, tdir
