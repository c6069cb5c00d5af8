"""Issue 13's bf16 fast paths: `auto` follows the CPU's native bf16, the head trains under bf16
autocast over fp32 weights, and stage 3's head computes in the target's dtype with fp32 RoPE."""
import copy

import pytest
import torch

from schemas.config import TargetConfig
from schemas.target import TargetError, cpu_native_bf16, pick_dtype
from stage2_train.losses import ttt_forward
from stage2_train.precision import compute_context, resolve_compute_dtype
from test_train_unit import tiny_model

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("flag,want", [("1", torch.bfloat16), ("0", torch.float32)])
def test_auto_target_dtype_follows_the_cpu(monkeypatch, flag, want):
    monkeypatch.setenv("EAGLE3_CPU_BF16", flag)
    assert pick_dtype(TargetConfig(path="x"), CPU) == want
    assert pick_dtype(TargetConfig(path="x", dtype="float32"), CPU) == torch.float32
    assert pick_dtype(TargetConfig(path="x"), torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("avx512_bf16,amx", [(False, False), (True, False), (False, True), (True, True)])
def test_the_probe_reads_avx512_bf16_and_amx(monkeypatch, avx512_bf16, amx):
    """Either feature alone makes bf16 native; neither means fp32 for `auto`."""
    monkeypatch.delenv("EAGLE3_CPU_BF16", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    native = avx512_bf16 or amx
    assert cpu_native_bf16() is native
    assert pick_dtype(TargetConfig(path="x"), CPU) == (torch.bfloat16 if native else torch.float32)


def test_a_bad_override_is_named(monkeypatch):
    monkeypatch.setenv("EAGLE3_CPU_BF16", "yes")
    with pytest.raises(TargetError, match=r"^EAGLE3_CPU_BF16='yes': expected 0 or 1$"):
        pick_dtype(TargetConfig(path="x"), CPU)


def test_compute_dtype_resolution(monkeypatch):
    monkeypatch.setenv("EAGLE3_CPU_BF16", "1")
    assert resolve_compute_dtype("auto", CPU, "float32") == torch.bfloat16
    assert resolve_compute_dtype("float32", CPU, "float32") is None
    assert resolve_compute_dtype("auto", CPU, "bfloat16") is None      # bf16 DeepSpeed weights: no autocast
    monkeypatch.setenv("EAGLE3_CPU_BF16", "0")
    assert resolve_compute_dtype("auto", CPU, "float32") is None
    assert resolve_compute_dtype("bfloat16", CPU, "float32") == torch.bfloat16


def random_batch(L=48, n_draft=16, K=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    t_idx = torch.randint(0, n_draft, (1, L, K), generator=g)
    t_prob = torch.softmax(torch.randn(1, L, K, generator=g) * 2, -1)
    mask = torch.rand(1, L, generator=g) < 0.8
    return {"input_ids": torch.randint(100, 100 + n_draft, (1, L), generator=g), "loss_mask": mask,
            "valid": torch.ones(1, L, dtype=torch.bool), "t_idx": t_idx, "t_prob": t_prob,
            "t_valid": torch.ones(1, L, K, dtype=torch.bool), "t_logp": t_prob.log(), "t_top1": t_idx[..., 0], "hidden": torch.randn(1, L, 3 * 32, generator=g).to(torch.bfloat16), "K": K}


def test_bf16_autocast_step_matches_fp32():
    """The whole TTT step under compute_context(bf16) stays close to fp32 (loss, gradients) and
    really runs in bf16 (the loss differs from the fp32 one)."""
    m32 = tiny_model()
    mbf = copy.deepcopy(m32)
    b = random_batch()
    o32 = ttt_forward(m32, b, 3)
    o32.loss.backward()
    with compute_context(CPU, torch.bfloat16):
        obf = ttt_forward(mbf, b, 3)
    obf.loss.backward()
    assert obf.loss.item() != o32.loss.item()
    assert obf.loss.item() == pytest.approx(o32.loss.item(), rel=2e-2)
    for (n, p32), (_, pbf) in zip(m32.named_parameters(), mbf.named_parameters()):
        if p32.grad is None:
            continue
        cos = torch.nn.functional.cosine_similarity(p32.grad.flatten(), pbf.grad.flatten(), dim=0)
        assert cos > 0.99, (n, float(cos))


def test_bf16_autocast_rounds_only_the_logits_not_the_log_softmax():
    """stage2_train.precision's promise for the loss: under bf16 autocast the lm_head's logits
    are bf16, but the log-softmax and the soft cross-entropy are computed in fp32 from them
    (autocast leaves log_softmax of a bf16 tensor in bf16 on CPU; losses.py upcasts first).
    Reference: the same bf16 logits, CE in float64."""
    from stage2_train.losses import chunked_terms
    from stage2_train.teacher import StepView

    m = tiny_model()
    g = torch.Generator().manual_seed(3)
    out = torch.randn(1, 40, 32, generator=g)
    idx = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(40)])[None]
    prob = torch.softmax(torch.randn(1, 40, 4, generator=g), -1)
    v = StepView(input_ids=None, idx=idx, prob=prob, valid=torch.ones(1, 40, 4, dtype=torch.bool), logp=prob.log(),
                 top1=None, counted=None, loss_mask=None)
    with torch.no_grad(), compute_context(CPU, torch.bfloat16):
        logits = m.logits(out)
        ce, top = chunked_terms(m, out, v)[:2]
    assert logits.dtype == torch.bfloat16
    logp = torch.log_softmax(logits.double(), -1)
    want = -(prob.double() * logp.gather(-1, idx)).sum(-1)
    assert ce.dtype == torch.float32
    assert (ce.double() - want).abs().max() < 1e-5          # fp32 accuracy; a bf16 log-softmax is off by ~1e-2
    assert torch.equal(top, logits.float().argmax(-1))


def test_ttt_attention_log_sum_exp_accumulates_in_fp32_under_autocast():
    """precision.py: 'the TTT attention accumulates its log-sum-exp in fp32, so only the matmul
    inputs are rounded'. Reference: float64 over the bf16-rounded q and k."""
    from stage2_train.ttt_attention import causal_lse

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 64, 16, generator=g), torch.randn(1, 4, 64, 16, generator=g)
    qb, kb = q.bfloat16().double(), k.bfloat16().double()
    s = (qb @ kb.transpose(-1, -2)) * 0.25
    want = torch.logsumexp(s.masked_fill(torch.ones(64, 64, dtype=torch.bool).triu(1), float("-inf")), -1)
    with compute_context(CPU, torch.bfloat16):
        got = causal_lse(q, k, 0.25)
    assert (got.double() - want).abs().max() < 1e-4


def test_stage3_head_computes_in_the_target_dtype_with_fp32_rope(tmp_path, tiny_llama_dir):
    import transformers as tf

    from schemas.head import save_head
    from spec_helpers import make_head
    from stage3_eval.draft_runner import load_draft

    tgt = tf.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.bfloat16).eval()
    head = make_head(tgt.float())
    tgt = tgt.to(torch.bfloat16)
    d = save_head(tmp_path / "head", head.head_state_dict(), head.config)
    mbf = load_draft(d, tgt)
    m32 = load_draft(d, tgt, dtype=torch.float32)
    assert mbf.fc.weight.dtype == mbf.lm_head.weight.dtype == torch.bfloat16
    assert {b.dtype for b in mbf.rotary.buffers()} == {torch.float32}
    H = tgt.config.hidden_size
    g = torch.Generator().manual_seed(0)
    hid = torch.randn(1, 6, 3 * H, generator=g)
    ids = torch.randint(0, tgt.config.vocab_size, (1, 6), generator=g)
    pos = torch.arange(200, 206)[None]                           # far positions: a bf16 RoPE would drift
    with torch.no_grad():
        o32, _ = m32.step(m32.fuse(hid), ids, pos)
        obf, _ = mbf.step(mbf.fuse(hid.to(torch.bfloat16)), ids, pos)
        l32, lbf = m32.logits(o32), mbf.logits(obf).float()
    assert (lbf - l32).abs().max() < 0.1 * l32.abs().max()
    assert (lbf.argmax(-1) == l32.argmax(-1)).float().mean() >= 0.8
