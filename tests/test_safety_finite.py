"""Bad-input corpus, non-finite values (issue 22, case 3): they stop the stage that meets them.

Stage 1 fails naming sample, token and layer; readers, `shards verify` and the training
loader refuse inf/NaN in hidden states, fp8 scales and top-K log-probs written with valid
checksums (as a target that overflows writes them); stage 3 and export refuse a NaN head;
the training-side watch folds loss / grad norm into a device flag without host syncs."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from schemas.cache import CacheError, CacheReader, ShardReader, committed_shards, shard_name, shards_dir, write_shard
from schemas.config import load_config
from schemas.finite import FORMATS, FiniteWatch, NonFiniteError, has_nonfinite, nonfinite_mask
from stage1_extract.extract import ExtractError, run_extract
from tiny import sharegpt_rows, write_jsonl

runner = CliRunner()
LAYERS = [1, 3, 5]


# --------------------------------------------------------------------------- the bit tests, exhaustively


@pytest.mark.parametrize("fmt,tdtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                        ("e4m3", torch.float8_e4m3fn)])
def test_bit_test_agrees_with_torch_on_every_pattern(fmt, tdtype):
    unsigned, signed, _mask, _sign = FORMATS[fmt]
    n = 1 << (8 * np.dtype(unsigned).itemsize)
    bits = np.arange(n, dtype=np.int64).astype(unsigned)
    ref = ~torch.isfinite(torch.from_numpy(bits.view(signed)).view(tdtype).float()).numpy()
    assert np.array_equal(nonfinite_mask(bits, fmt), ref)
    fast = np.array([has_nonfinite(bits[i:i + 1], fmt) for i in range(n)])
    assert np.array_equal(fast, ref) and ref.any()
    assert not has_nonfinite(bits[~ref], fmt) and has_nonfinite(np.concatenate([bits[~ref], bits[ref][:1]]), fmt)


# --------------------------------------------------------------------------- stage 1


@dataclass
class S:
    sample_index: int
    input_ids: np.ndarray
    loss_mask: np.ndarray


def _samples(V: int, bad_token: int) -> list[S]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(6):
        ids = rng.integers(5, V, 12 + 2 * i)
        ids[ids == bad_token] = bad_token + 1
        if i == 4:
            ids[7] = bad_token  # only sample 4 holds it, at token 7
        out.append(S(i, ids.astype(np.int32), (np.arange(len(ids)) > 4).astype(np.uint8)))
    return out


def _extract(tmp_path, model, tok, tdir, **extract):
    cfg = load_config(raw={"target": {"path": str(tdir), "dtype": "float32", "device": "cpu"},
                           "data": {"train": ["unused.jsonl"]},
                           "extract": {"cache": str(tmp_path / "cache"), "samples_per_shard": 3, "topk": 4,
                                       "layers": LAYERS, **extract}})
    return run_extract(cfg, progress=False, samples=_samples(len(tok), 40), target=(model, tok, tdir))


@pytest.fixture()
def target(tiny_llama_dir):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    return model, tf.AutoTokenizer.from_pretrained(str(tiny_llama_dir)), tiny_llama_dir


def test_stage1_stops_on_a_nonfinite_hidden_state_naming_sample_token_and_layer(target, tmp_path):
    model, tok, tdir = target
    with torch.no_grad():
        model.get_input_embeddings().weight[40] = float("nan")
    with pytest.raises(ExtractError) as e:
        _extract(tmp_path, model, tok, tdir)
    # NaN at token 7 reaches every position of its sample (the attention mask is additive: NaN + -inf = NaN)
    assert str(e.value).startswith("extract: non-finite hidden state in sample 4 (shard 1, token 0 of 20), "
                                   "layer 1 (HF hidden_states index): the target overflows in float32"), str(e.value)
    assert committed_shards(tmp_path / "cache") == [0]  # shard 0 is sound; shard 1 was never committed


def test_stage1_stops_on_an_fp8_scale_beyond_fp16(target, tmp_path):
    model, tok, tdir = target
    with torch.no_grad():  # finite everywhere in bf16, but amax / 448 overflows the fp16 scale
        model.get_input_embeddings().weight[40] = 1e30
    with pytest.raises(ExtractError, match=r"non-finite fp8 scale .* in sample 4 \(shard 1, token 7 of 20\), layer 1"):
        _extract(tmp_path, model, tok, tdir, hidden_dtype="fp8")
    assert committed_shards(tmp_path / "cache") == [0]


def test_stage1_stops_on_nonfinite_topk_logprobs(target, tmp_path):
    model, tok, tdir = target
    with torch.no_grad():
        model.get_output_embeddings().weight[7] = float("nan")
    with pytest.raises(ExtractError, match=r"non-finite top-K log-probability in sample \d+ \(shard 0, token 0 of"):
        _extract(tmp_path, model, tok, tdir)
    assert committed_shards(tmp_path / "cache") == []


# --------------------------------------------------------------------------- readers


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("nf")
    data = write_jsonl(tmp / "d.jsonl", sharegpt_rows(8, seed=3))
    out = {}
    for dt in ("bf16", "fp8"):
        cfg = load_config(raw={"target": {"path": str(tiny_llama_dir), "dtype": "float32", "device": "cpu"},
                               "data": {"train": [str(data)]},
                               "extract": {"cache": str(tmp / dt), "samples_per_shard": 4, "topk": 4, "layers": LAYERS,
                                           "chunk_rows": 16, "hidden_dtype": dt}})
        out[dt] = run_extract(cfg, progress=False)
    return out


def rewrite_shard(cache: Path, k: int, edit) -> None:
    """Shard k written again, through the writer, with edited arrays: valid checksums, edited values."""
    meta = json.loads((cache / "cache.json").read_text())
    p = shards_dir(cache) / shard_name(k)
    sh = ShardReader(p, meta.get("hidden_dtype", "bfloat16"))
    arrays = {n: sh.read(n, 0, sh.array(n).shape[0]) for n in sh.layout}
    edit(arrays)
    info = sh.info
    extra = {key: info[key] for key in ("sample_range", "hidden_size", "topk", "layers") if key in info}
    shutil.rmtree(p)
    write_shard(cache, k, arrays, compressor=info["compressor"], chunk_rows=info["chunk_rows"], extra=extra,
                hidden_dtype=meta.get("hidden_dtype", "bfloat16"))


def _nan_bits(a: np.ndarray, where) -> None:
    a[where] = 0x7FC0  # bf16 NaN


def _damaged(caches, tmp_path, dt, edit) -> Path:
    c = tmp_path / "c"
    shutil.copytree(caches[dt], c)
    rewrite_shard(c, 1, edit)
    return c


def _read_everything(c: Path) -> None:
    r = CacheReader(c)
    for i in range(len(r)):
        r.sample(i)


CASES = {
    "hidden": ("bf16", lambda a: _nan_bits(a["hidden"], (5, 2, 3)),
               "array 'hidden': chunk 0 (rows 0..16): 1 non-finite value (first at row 5, layer slot 2",
               "hidden: non-finite hidden states: 1 non-finite value (first at row 5, layer 5, column 3: nan)"),
    "topk_logprobs": ("bf16", lambda a: a["topk_logprobs"].__setitem__((20, 1), np.inf),
                      "array 'topk_logprobs': chunk 1 (rows 16..32): 1 non-finite value (first at row 20, column 1: inf)",
                      "topk_logprobs: non-finite top-K log-probs: 1 non-finite value (first at row 20, column 1: inf)"),
    "fp8 scale": ("fp8", lambda a: a["hidden_scale"].__setitem__((3, 1), np.inf),
                  "array 'hidden_scale': chunk 0 (rows 0..16): 1 non-finite value (first at row 3, column 1: inf)",
                  "hidden_scale: non-finite fp8 scales: 1 (first at row 3, layer 3)"),
    "fp8 hidden": ("fp8", lambda a: a["hidden"].__setitem__((9, 0, 0), 0x7F),
                   "array 'hidden': chunk 0 (rows 0..16): 1 non-finite value (first at row 9, layer slot 0",
                   "hidden: non-finite hidden states: 1 non-finite value (first at row 9, layer 1, column 0: nan)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_readers_and_verify_refuse_nonfinite_values_with_valid_checksums(caches, tmp_path, case):
    dt, edit, read_msg, verify_msg = CASES[case]
    c = _damaged(caches, tmp_path, dt, edit)
    with pytest.raises(CacheError) as e:
        _read_everything(c)
    assert "00001.zarr" in str(e.value) and read_msg in str(e.value), str(e.value)
    res = runner.invoke(app, ["shards", "verify", str(c)])
    assert res.exit_code == 1, res.output
    assert f"BAD 00001.zarr: {verify_msg}" in " ".join(res.output.split()), res.output


def test_training_loader_refuses_nonfinite_rows(caches, tmp_path):
    from stage2_train.loader import CacheLoader

    c = _damaged(caches, tmp_path, "bf16", CASES["hidden"][1])
    r = CacheReader(c)
    n = len(r)
    loader = CacheLoader(r, np.arange(n), [[i] for i in range(n)], np.arange(r.vocab_size), threads=1)
    with pytest.raises(CacheError, match=r"00001\.zarr: array 'hidden': chunk 0 .*non-finite"):
        for _ in loader:
            pass


# --------------------------------------------------------------------------- heads


def test_stage3_and_export_refuse_a_head_with_nonfinite_weights(tiny_llama_fp32, tmp_path):
    from schemas.head import HeadError
    from spec_helpers import make_head
    from stage2_train.export import write_head
    from stage3_eval.draft_runner import load_draft

    head = make_head(tiny_llama_fp32, seed=1)
    head.config["target_num_hidden_layers"] = int(tiny_llama_fp32.config.num_hidden_layers)
    with torch.no_grad():
        head.fc.weight[0, :3] = float("nan")
    d = write_head(head, tmp_path / "head")
    with pytest.raises(HeadError, match=r"model.safetensors: non-finite weights \(inf/NaN\) in fc.weight \(3 of"):
        load_draft(d, tiny_llama_fp32)
    res = runner.invoke(app, ["export", str(d), str(tmp_path / "out")])
    assert res.exit_code == 1 and "non-finite weights (inf/NaN) in fc.weight" in res.output, res.output
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the training watch (part B calls it)


def test_finite_watch_folds_values_on_the_device_and_names_the_first_bad_step(monkeypatch):
    w = FiniteWatch("cpu")
    calls = []
    for name in ("item", "tolist", "__bool__", "cpu", "numpy"):  # no host sync per micro-batch
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _o=orig, **k: (calls.append(_n),
                                                                                            _o(self, *a, **k))[1])
    for step in range(5):
        w.observe(step, loss=torch.tensor(1.0 / (step + 1)), grad_norm=torch.tensor(0.5))
    w.observe(5, loss=torch.tensor(2.0), grad_norm=torch.tensor(float("inf")))
    w.observe(6, loss=torch.tensor(float("nan")), grad_norm=torch.tensor(float("nan")))
    w.observe(7, loss=torch.tensor(1.0), grad_norm=3.0)  # a host float (DeepSpeed's norm) is fine too
    assert calls == []
    monkeypatch.undo()
    with pytest.raises(NonFiniteError, match=r"training: the gradient norm became non-finite \(inf/NaN\) at step 5"):
        w.check()
    ok = FiniteWatch("cpu")
    ok.observe(0, loss=torch.tensor(1.0))
    ok.check()
    bad = FiniteWatch("cpu")
    bad.observe(3, loss=torch.tensor([1.0, float("-inf")]), grad_norm=float("nan"))
    with pytest.raises(NonFiniteError, match=r"the loss and the gradient norm became non-finite .* at step 3"):
        bad.check()


def test_finite_watch_agrees_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    from finite_ranks import watch_rank

    mp.spawn(watch_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    states = [json.loads((tmp_path / f"r{r}").read_text()) for r in range(2)]
    assert states == [[4, FiniteWatch.LOSS]] * 2  # every rank stops at the same check, naming the first bad step
