"""The preallocated KV cache of regeneration (stage1_extract/kv_slab.py): batched greedy generation with
it gives the same tokens as transformers' own DynamicCache, for every target family, and a sequence
longer than announced still decodes right (the layer falls back to growing). Rows that stop leave the
batch and the slabs (regenerate.decode_evicting) without changing any row's tokens."""
from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from stage1_extract import regenerate
from stage1_extract.kv_slab import SlabLayer, slab_cache
from tiny import load_tiny_target

NEW = 12


def _batch(vocab: int, lengths=(9, 5, 2)):
    """Prompts of `lengths` tokens, LEFT padded as regeneration pads them."""
    g = torch.Generator().manual_seed(0)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    att = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        att[i, width - n:] = 1
    return ids, att


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma", "minicpm3", "minicpm4"])
def test_generation_with_the_slab_cache_equals_the_dynamic_cache(tmp_path, family):
    model = load_tiny_target(tmp_path, family)
    ids, att = _batch(model.config.vocab_size)
    kw = dict(attention_mask=att, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=[])
    with torch.no_grad():
        want = model.generate(input_ids=ids, **kw)
        for capacity in (ids.shape[1] + NEW, ids.shape[1] + 4):  # announced / too short (falls back)
            cache = slab_cache(model.config, capacity)
            got = model.generate(input_ids=ids, cache=cache, **kw)
            assert torch.equal(got, want), (family, capacity)
            layers = [layer for layer in cache.layers if isinstance(layer, DynamicLayer)]
            assert layers and all(isinstance(layer, SlabLayer) for layer in layers)
            assert {layer.get_seq_length() for layer in layers} == {ids.shape[1] + NEW - 1}


def test_a_slab_layer_returns_views_of_one_allocation():
    layer = SlabLayer(capacity=8)
    k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 6)
    k1, v1 = layer.update(k, v)
    k2, v2 = layer.update(k[:, :, :1] + 1, v[:, :, :1] + 1)
    assert k2.shape == (2, 3, 6, 4) and v2.shape == (2, 3, 6, 6)
    assert k2.untyped_storage().data_ptr() == k1.untyped_storage().data_ptr()   # no copy of what was there
    torch.testing.assert_close(k2, torch.cat((k, k[:, :, :1] + 1), dim=-2), rtol=0, atol=0)
    torch.testing.assert_close(v2, torch.cat((v, v[:, :, :1] + 1), dim=-2), rtol=0, atol=0)
    k3, _ = layer.update(torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 6))      # 9 > 8: grows by copying
    assert k3.shape == (2, 3, 9, 4) and torch.equal(k3[:, :, :6], k2)


def _stop_for_some_rows(free: torch.Tensor) -> int:
    """A token one row generates early and another row never does: with it as the stop, rows end at
    different steps and at least one runs to max_new_tokens."""
    for row in free:
        for t in row[1:len(row) // 2].tolist():
            if any(t not in other.tolist() for other in free):
                return t
    raise AssertionError(f"the tiny model's rows share every token: {free.tolist()}")


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma", "minicpm3", "minicpm4"])
def test_evicting_stopped_rows_gives_the_tokens_of_one_generate_call(tmp_path, family, monkeypatch):
    model = load_tiny_target(tmp_path, family)
    ids, att = _batch(model.config.vocab_size, lengths=(9, 5, 2, 7, 3, 8))
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        free = model.generate(input_ids=ids, attention_mask=att, eos_token_id=[], **kw)[:, ids.shape[1]:]
        stop = _stop_for_some_rows(free)
        want = model.generate(input_ids=ids, attention_mask=att, eos_token_id=[stop], **kw)[:, ids.shape[1]:]
        monkeypatch.setattr(regenerate, "EVICT_EVERY", 2)
        cache = slab_cache(model.config, ids.shape[1] + NEW)
        got = regenerate.decode_evicting(model, ids, att, dict(kw, eos_token_id=[stop], cache=cache))
    assert got.shape == (len(ids), NEW)
    assert torch.equal(got[:, :want.shape[1]], want), family
    assert (got[:, want.shape[1]:] == 0).all()
    running = sum(1 for row in want if stop not in row.tolist())  # rows that never stopped
    assert 1 <= running < len(ids)
    assert {layer.keys.shape[0] for layer in cache.layers} == {running}  # the stopped rows left the cache


def test_a_slab_layer_keeps_the_rows_selected_and_goes_on_writing_into_its_slabs():
    layer = SlabLayer(capacity=8)
    k, v = torch.randn(4, 3, 5, 2), torch.randn(4, 3, 5, 6)
    layer.update(k, v)
    keep = torch.tensor([3, 1])
    layer.batch_select_indices(keep)
    k2, v2 = layer.update(k[keep, :, :2] + 1, v[keep, :, :2] + 1)
    assert k2.shape == (2, 3, 7, 2) and k2.untyped_storage().nbytes() == 2 * 3 * 8 * 2 * 4  # still one slab
    torch.testing.assert_close(k2, torch.cat((k[keep], k[keep, :, :2] + 1), dim=-2), rtol=0, atol=0)
    torch.testing.assert_close(v2, torch.cat((v[keep], v[keep, :, :2] + 1), dim=-2), rtol=0, atol=0)
