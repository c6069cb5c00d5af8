"""Stage 1 on the GPU path, checked on the CPU: hooks keep only the configured hidden
states (never the full output_hidden_states tuple), and multi-GPU workers set their own
device and record the copy-done event on the stream that copies."""
from __future__ import annotations

import contextlib

import pytest
import torch

from schemas.config import TargetConfig, load_config
from stage1_extract.extract import Extractor, pad_batch, run_extract
from stage1_extract.workers import Worker
from tiny import sharegpt_rows, tiny_target, write_jsonl


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _batch():
    seqs = [torch.arange(3, 40) % 200, torch.arange(50, 71), torch.arange(7, 19)]
    return pad_batch([s.numpy() for s in seqs], 0)


@pytest.mark.parametrize("family", ["llama", "qwen3", "minicpm3", "gemma"])
def test_hooks_give_hf_hidden_states_bit_for_bit(tmp_path, family):
    """Ids 0 (embedding output, scaled by MiniCPM/Gemma), a middle one and L (the normed
    last state HF puts at the end of the tuple) equal output_hidden_states exactly."""
    from transformers import AutoModelForCausalLM

    from stage1_extract.capture import LayerCapture

    model = AutoModelForCausalLM.from_pretrained(str(tiny_target(tmp_path / "t", family)),
                                                 dtype=torch.float32).eval()
    L = model.config.num_hidden_layers
    ids, mask = _batch()
    for layers in ([0, L // 2, L], [1, 3, L - 1]):
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            with LayerCapture(model, layers) as cap:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
        for i in layers:
            assert torch.equal(cap.get(i), ref[i]), (family, i)
        ext = Extractor(model, layers, 5, chunk_tokens=11)
        got = ext(ids, mask)
        assert ext.capture == "hooks" and ext.capture_check == {"path": "hooks", "why": None}
        want = Extractor(model, layers, 5, chunk_tokens=11, capture="hidden_states")(ids, mask)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_extraction_never_asks_for_every_hidden_state(tmp_path):
    """Batches run without output_hidden_states; only the short probes (<= 64 tokens) ask."""
    from transformers import AutoModelForCausalLM

    tdir = tiny_target(tmp_path / "t", "llama")
    data = write_jsonl(tmp_path / "d.jsonl", sharegpt_rows(8, seed=1, turns=2))
    cfg = load_config(raw={"target": {"path": str(tdir)}, "data": {"train": [str(data)], "max_length": 96},
                           "extract": {"cache": str(tmp_path / "c"), "samples_per_shard": 4, "topk": 4,
                                       "max_tokens_per_batch": 200, "layers": [0, 3, 6]}})
    model = AutoModelForCausalLM.from_pretrained(str(tdir), dtype=torch.float32).eval()
    from schemas.target import load_tokenizer

    calls = []
    orig = model.forward

    def spy(*a, **kw):
        ids = kw.get("input_ids", a[0] if a else None)
        calls.append((bool(kw.get("output_hidden_states")), int(ids.numel())))
        return orig(*a, **kw)

    model.forward = spy
    rep = {}
    run_extract(cfg, progress=False, target=(model, load_tokenizer(cfg.target), tdir), report=rep)
    big = [n for all_hs, n in calls if all_hs and n > 64]
    assert big == [], f"forward passes with output_hidden_states over {big} tokens"
    assert rep["capture"] == "hooks"
    assert sum(n for _, n in calls) > 300  # the batches did run


# ---------------------------------------------------------------------------- W2: streams


class FakeStream:
    def __init__(self, device):
        self.device = str(device)


class FakeCuda:
    """torch.cuda's surface that extraction uses, recording what happens on which device."""

    def __init__(self, current="cuda:0"):
        self.current = current
        self.log: list = []
        self.active = None  # stream set by `with cuda.stream(s)`
        fake = self

        class Event:
            def record(self, stream=None):
                s = stream if stream is not None else fake.current_stream()
                fake.log.append(("record", s.device))

        self.Event = Event

    def is_available(self):
        return True

    def set_device(self, d):
        self.current = str(d)
        self.log.append(("set_device", str(d)))

    def current_stream(self, device=None):
        if self.active is not None and device is None:
            return self.active
        return FakeStream(device if device is not None else self.current)

    @contextlib.contextmanager
    def stream(self, s):
        prev, self.active = self.active, s
        self.log.append(("stream", s.device))
        try:
            yield
        finally:
            self.active = prev


def test_copy_done_event_is_recorded_on_the_copying_stream():
    """Rank 1's tensors live on cuda:1 while the current device is still cuda:0: the event
    must be recorded on cuda:1's stream (where the copy runs), not on the current device's."""
    from stage1_extract.extract import start_host_copy

    cuda = FakeCuda(current="cuda:0")
    t = (torch.ones(2, device="cpu"), torch.zeros(3, dtype=torch.int32, device="cpu"))
    host, ready = start_host_copy(t, torch.device("cuda:1"), cuda=cuda)
    assert cuda.log == [("stream", "cuda:1"), ("record", "cuda:1")]
    assert all(torch.equal(a, b) for a, b in zip(host, t))


def test_worker_sets_its_own_device():
    from stage1_extract.extract import worker_target_config

    cuda = FakeCuda()
    w = Worker(3, 4, "torchrun", local_rank=1)
    tcfg = worker_target_config(TargetConfig(path="x"), w, cuda=cuda)
    assert tcfg.device == "cuda:1" and cuda.log == [("set_device", "cuda:1")] and cuda.current == "cuda:1"
    # an explicit device is kept and made current; device_map targets span GPUs: nothing set
    cuda = FakeCuda()
    assert worker_target_config(TargetConfig(path="x", device="cuda:5"), w, cuda=cuda).device == "cuda:5"
    assert cuda.current == "cuda:5"
    cuda = FakeCuda()
    worker_target_config(TargetConfig(path="x", device_map="auto"), w, cuda=cuda)
    assert cuda.log == []
    assert worker_target_config(TargetConfig(path="x"), Worker(0, 1), cuda=cuda).device == "auto"
