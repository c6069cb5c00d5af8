"""Device mistakes caught without a GPU.

* Stage 3 runs with `torch.set_default_device("meta")` while the target and the head
  live on the CPU: any tensor made without an explicit device lands on `meta`, and
  mixing it with a real tensor (or reading it) raises. On a GPU the same mistake
  is a CPU tensor meeting CUDA logits.
* Tree drafting with the head itself on `meta`: growing a tree must never read a
  value back to the host (int()/bool()/.item() on a meta tensor raise), which on
  CUDA is a device sync per tree level.
* `load_draft` shares the target's embedding instead of keeping an fp32 copy.
"""
from __future__ import annotations

import pytest
import torch

from spec_helpers import fit_head, greedy_reference, make_head, tiny_layer_ids
from stage3_eval.draft_runner import DraftRunner, load_draft
from stage3_eval.spec_decode import DecodeSettings, generate
from stage3_eval.target_runner import TargetRunner
from stage3_eval.tree import build_tree

PROMPT = [5, 17, 33, 60, 61, 9, 100, 101]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def target(tiny_llama_fp32):
    return tiny_llama_fp32


@pytest.fixture(scope="module")
def head(target):
    ref = greedy_reference(target, PROMPT, 24)
    return fit_head(target, [ref], steps=60)


class default_device:
    def __init__(self, dev):
        self.dev = dev

    def __enter__(self):
        torch.set_default_device(self.dev)

    def __exit__(self, *exc):
        torch.set_default_device(None)


SETTINGS = [dict(method="plain"), dict(method="chain", draft_tokens=3),
            dict(method="tree", top_k=3, depth=3, total_tokens=8),
            dict(method="tree", top_k=3, depth=3, total_tokens=8, temperature=0.8, top_p=0.9),
            dict(method="chain", draft_tokens=2, temperature=1.0)]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: f"{kw['method']}-T{kw.get('temperature', 0)}")
def test_stage3_makes_no_tensor_without_a_device(target, head, kw):
    runner = TargetRunner(target, tiny_layer_ids(target))
    drafter = DraftRunner(head) if kw["method"] != "plain" else None
    s = DecodeSettings(max_new_tokens=12, **kw)
    want = generate(runner, drafter, PROMPT, s, eos_ids=set(), gen=torch.Generator(device=CPU).manual_seed(7))
    with default_device("meta"):
        got = generate(runner, drafter, PROMPT, s, eos_ids=set(), gen=torch.Generator(device=CPU).manual_seed(7))
    assert got.tokens == want.tokens and got.accept_lengths == want.accept_lengths
    if not kw.get("temperature"):
        assert got.tokens == greedy_reference(target, PROMPT, 12)[len(PROMPT):]


def test_tree_verify_check_makes_no_tensor_without_a_device(target):
    runner = TargetRunner(target, None)
    with default_device("meta"):
        res = runner.check_tree_verify(PROMPT)
    assert res["ok"] and res["rel_diff"] < 1e-4


@pytest.mark.parametrize("top_k,depth,total", [(1, 5, 5), (3, 4, 10), (4, 5, 24)])
def test_growing_a_tree_reads_nothing_back_from_the_device(target, head, top_k, depth, total):
    """The head on `meta`: every draft value is unreadable, so any per-level host read raises."""
    dr_meta = DraftRunner(make_head(target).to("meta"))
    H = target.config.hidden_size
    n = len(PROMPT) - 1
    dr_meta.commit(torch.zeros(n, 3 * H, device="meta"), torch.zeros(n, dtype=torch.long, device="meta"),
                   torch.arange(n, device=CPU))
    tree = build_tree(dr_meta, top_k=top_k, depth=depth, total_tokens=total)
    assert tree.tokens.device.type == "meta" and tree.size == min(total, top_k + (depth - 1) * top_k * top_k)


def test_load_draft_shares_the_target_embedding(tmp_path, tiny_llama_dir, head):
    """No [V, h] fp32 copy: the head reads the bf16 target's own matrix; outputs as with a copy."""
    import transformers as tf

    from schemas.head import save_head

    d = save_head(tmp_path / "head", head.head_state_dict(), head.config)
    tgt = tf.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.bfloat16).eval()
    emb = tgt.get_input_embeddings().weight
    m = load_draft(d, tgt, dtype=torch.float32)
    assert m.embed_tokens.weight.dtype == torch.bfloat16
    assert m.embed_tokens.weight.data_ptr() == emb.data_ptr()
    big = [k for k, t in m.state_dict().items() if t.shape == emb.shape and t.dtype == torch.float32]
    assert big == ["lm_head.weight"]  # full-vocab head in this test; no embedding copy
    assert m.fc.weight.dtype == torch.float32  # the head itself stays in the dtype asked for
    # the target's weight is untouched by moving the head
    m.to(torch.float64)
    assert emb.dtype == torch.bfloat16 and m.embed_tokens.weight.dtype == torch.float64
    ids = torch.tensor([[3, 9, 27]])
    m2 = load_draft(d, tgt, dtype=torch.float32)
    want = (emb.detach().float()[ids] * m2.embed_scale).to(torch.float32)
    torch.testing.assert_close(m2.embed(ids), want, rtol=0, atol=0)


def test_training_step_makes_no_tensor_without_a_device():
    """The TTT unroll, its loss and backward on a collated batch, with the default device on meta."""
    import numpy as np

    from schemas.head import make_head_config
    from stage2_train.data import collate
    from stage2_train.losses import ttt_forward
    from stage2_train.model import Eagle3Draft

    tcfg = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256, "vocab_size": 200,
            "hidden_act": "silu", "model_type": "llama"}
    torch.manual_seed(0)
    m = Eagle3Draft(make_head_config(tcfg, draft_vocab_size=16, layer_ids=[2, 3, 4]), torch.randn(200, 32))
    ids = torch.arange(100, 116)
    m.set_vocab_map(ids - torch.arange(16), torch.zeros(200, dtype=torch.bool).index_fill_(0, ids, True))
    rng = np.random.default_rng(0)
    samples = [{"input_ids": rng.integers(100, 116, n).astype(np.int32), "loss_mask": np.ones(n, np.uint8),
                "hidden": rng.integers(0x3c00, 0x3e00, (n, 3, 32)).astype(np.uint16),
                "topk_ids": rng.integers(100, 116, (n, 4)).astype(np.int32),
                "topk_logprobs": np.log(np.full((n, 4), 0.25)).astype(np.float16)} for n in (9, 6)]
    t2d = np.full(200, -1, dtype=np.int64)
    t2d[100:116] = np.arange(16)
    batch = collate(samples, t2d)

    def step():
        m.zero_grad()
        o = ttt_forward(m, batch, 3)
        o.loss.backward()
        return float(o.loss.detach()), m.fc.weight.grad.clone()

    want_loss, want_grad = step()
    with default_device("meta"):
        got_loss, got_grad = step()
    assert got_loss == want_loss and torch.equal(got_grad, want_grad)


@pytest.mark.parametrize("family", ["llama", "minicpm3", "gemma"])
def test_target_keeps_only_the_heads_hidden_states(tmp_path, family):
    """Verification asks the target for the three aux states only, and gets HF's own values."""
    import transformers as tf

    from tiny import tiny_target

    m = tf.AutoModelForCausalLM.from_pretrained(str(tiny_target(tmp_path / "t", family)),
                                                dtype=torch.float32).eval()
    L = m.config.num_hidden_layers
    layers = [0, L // 2, L]
    runner = TargetRunner(m, layers)
    seen = []
    orig = m.forward

    def spy(*a, **kw):
        out = orig(*a, **kw)
        seen.append(sum(h is not None for h in out.hidden_states))
        return out

    m.forward = spy
    ids = torch.tensor(PROMPT, device=CPU)
    o = runner.forward(runner.new_cache(), ids, torch.arange(len(PROMPT), device=CPU))
    with torch.no_grad():
        hs = orig(input_ids=ids[None], output_hidden_states=True).hidden_states
    torch.testing.assert_close(o.aux, torch.cat([hs[i][0] for i in layers], -1), rtol=1e-5, atol=1e-5)
    assert seen == [3]
