"""Stage 2 pieces without DeepSpeed: the shift, the teacher, the TTT attention, vocab, batching."""
import math

import numpy as np
import pytest
import torch

from schemas.head import make_head_config
from stage2_train.data import make_batches, rank_schedule, split_indices
from stage2_train.losses import simulated_tau, ttt_forward
from stage2_train.model import Eagle3Draft, apply_rope
from stage2_train.teacher import build_teacher, step_view
from stage2_train.vocab import VocabError, build_draft_vocab

TARGET_CFG = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256, "vocab_size": 200,
              "hidden_act": "silu", "model_type": "llama"}


@pytest.fixture(autouse=True)
def _one_thread():
    # The CI box is small and shared: OpenMP spin-waiting on 2 busy cores costs 40x.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(n_draft=16, seed=0):
    torch.manual_seed(seed)
    cfg = make_head_config(TARGET_CFG, draft_vocab_size=n_draft, layer_ids=[2, 3, 4])
    m = Eagle3Draft(cfg, torch.randn(200, 32))
    ids = torch.arange(100, 100 + n_draft)
    m.set_vocab_map(ids - torch.arange(n_draft), torch.zeros(200, dtype=torch.bool).index_fill_(0, ids, True))
    return m


# ---------------------------------------------------------------------------- the shift

X = [100, 101, 102, 103, 104, 105]           # x_0..x_5
LM = [0, 0, 1, 1, 0, 1]                      # loss_mask_0..5
TOP1 = [0, 1, 2, -1, 4, 5]                   # teacher top-1 (draft id) of cache rows 0..5; row 3 outside the vocab


def six_token_batch():
    K = 2
    t_idx = torch.tensor([[[r, (r + 1) % 6] for r in range(6)]])      # row r's teacher names draft ids r, r+1
    t_prob = torch.tensor([[[0.75, 0.25]] * 6])
    return {"input_ids": torch.tensor([X]), "loss_mask": torch.tensor([LM], dtype=torch.bool),
            "valid": torch.ones(1, 6, dtype=torch.bool), "t_idx": t_idx, "t_prob": t_prob,
            "t_valid": torch.ones(1, 6, K, dtype=torch.bool), "t_logp": t_prob.log(), "t_top1": torch.tensor([TOP1]), "hidden": torch.randn(1, 6, 3 * 32).to(torch.bfloat16),
            "K": K}


# Hand-written (not computed): at step k, index t meets embedding x_{t+k+1}, teacher row t+k+1,
# mask loss_mask[t+k+2]; positions past the end carry pad 0 / no teacher / mask 0.
EXPECTED = {
    0: dict(ids=[101, 102, 103, 104, 105, 0], row=[1, 2, 3, 4, 5, None], counted=[1, 1, 0, 1, 0, 0],
            loss=[1, 1, 0, 1, 0, 0]),
    1: dict(ids=[102, 103, 104, 105, 0, 0], row=[2, 3, 4, 5, None, None], counted=[1, 0, 1, 0, 0, 0],
            loss=[1, 0, 1, 0, 0, 0]),
    2: dict(ids=[103, 104, 105, 0, 0, 0], row=[3, 4, 5, None, None, None], counted=[0, 1, 0, 0, 0, 0],
            loss=[0, 1, 0, 0, 0, 0]),
}


def test_step_view_six_tokens():
    b = six_token_batch()
    for k, e in EXPECTED.items():
        v = step_view(b, k)
        assert v.input_ids[0].tolist() == e["ids"], k
        assert v.counted[0].int().tolist() == e["counted"], k
        assert v.loss_mask[0].int().tolist() == e["loss"], k
        for t, row in enumerate(e["row"]):
            if row is None:
                assert v.top1[0, t] == -1 and v.prob[0, t].sum() == 0
            else:
                assert v.top1[0, t] == TOP1[row]
                assert v.idx[0, t].tolist() == [row, (row + 1) % 6]


def test_ttt_forward_feeds_the_right_hidden_and_ids():
    """Through the real unroll: step 0 reads fused f_t at t, step k the draft's step-(k-1) output at t."""
    m = tiny_model()
    b = six_token_batch()
    seen = []
    orig = m.ttt_step

    def spy(hidden, input_ids, position_ids, cache):
        o = orig(hidden, input_ids, position_ids, cache)
        seen.append((hidden.detach().clone(), input_ids.clone(), position_ids.clone(), o.detach().clone()))
        return o

    m.ttt_step = spy
    out = ttt_forward(m, b, 3)
    assert torch.equal(seen[0][0], m.fuse(b["hidden"]).detach())
    for k in range(3):
        assert seen[k][1][0].tolist() == EXPECTED[k]["ids"]
        assert seen[k][2][0].tolist() == [0, 1, 2, 3, 4, 5]          # rows' own t (ttt_step adds k)
        if k:
            assert torch.equal(seen[k][0], seen[k - 1][3])
    # counts: loss positions and accuracy denominators per step, from the hand-written table
    assert out.loss_n.tolist() == [3.0, 2.0, 1.0]
    assert out.counted.tolist() == [3.0, 2.0, 1.0]
    # loss_0 by hand from the step-0 logits: soft CE over teacher rows 1, 2, 4 at t = 0, 1, 3
    logp = torch.log_softmax(m.logits(seen[0][3]).float(), -1)[0]
    want = [-(0.75 * logp[t, r] + 0.25 * logp[t, (r + 1) % 6]) for t, r in ((0, 1), (1, 2), (3, 4))]
    assert float(out.loss_sum[0].detach()) == pytest.approx(float(sum(want).detach()), rel=1e-5)


def test_teacher_restricted_and_renormalised():
    t2d = np.full(20, -1, dtype=np.int64)
    t2d[[5, 9, 11]] = [0, 1, 2]
    ids = np.array([[5, 7, 9], [7, 9, 11], [3, 4, 6]], dtype=np.int32)
    lp = np.log(np.array([[0.5, 0.3, 0.1], [0.6, 0.2, 0.2], [0.4, 0.3, 0.2]])).astype(np.float16)
    idx, prob, top1 = build_teacher(ids, lp, t2d)
    assert top1.tolist() == [0, -1, -1]                    # row 1: top-1 (7) outside; row 2: nothing inside
    np.testing.assert_allclose(prob[0], [0.5 / 0.6, 0.0, 0.1 / 0.6], rtol=2e-3)
    np.testing.assert_allclose(prob[1], [0.0, 0.5, 0.5], rtol=2e-3)
    assert prob[2].tolist() == [0.0, 0.0, 0.0]
    assert idx[0].tolist() == [0, 0, 1] and idx[1].tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------- TTT attention


def test_reference_mask_pattern():
    want = torch.tensor([[1, 0, 0, 1, 0, 0, 1, 0, 0],
                         [1, 1, 0, 0, 1, 0, 0, 1, 0],
                         [1, 1, 1, 0, 0, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(tiny_model().ttt_reference_mask(3, 2), want)


def test_ttt_step_matches_explicit_masked_softmax():
    torch.manual_seed(1)
    m = tiny_model().double()
    a, layer = m.midlayer.self_attn, m.midlayer
    B, T, S = 2, 5, 4
    hidden = torch.randn(B, T, 32, dtype=torch.float64)
    ids = [torch.randint(0, 200, (B, T)) for _ in range(S)]
    pos = torch.arange(T).expand(B, T)
    cache, outs, h, qkvs, ins = [], [], hidden, [], []
    for k in range(S):
        ins.append(h)
        h = m.ttt_step(h, ids[k], pos, cache)
        outs.append(h)
    for k in range(S):
        x = layer.attn_input(ins[k], m.embed(ids[k]))
        cos, sin = m._rope(x, pos + k)  # step k at t + k
        qkvs.append(a.qkv(x, cos, sin))
        q = qkvs[k][0]
        keys = torch.cat([a._expand(qkvs[j][1]) for j in range(k + 1)], dim=2)    # [B, nh, (k+1)T, d]
        vals = torch.cat([a._expand(qkvs[j][2]) for j in range(k + 1)], dim=2)
        scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~m.ttt_reference_mask(T, k), float("-inf"))
        ref = layer.finish(ins[k], a.out(torch.softmax(scores, -1) @ vals))
        # ttt_step takes its softmax in fp32 (bf16 training): agreement to fp32 rounding
        torch.testing.assert_close(outs[k], ref, rtol=1e-5, atol=1e-6)
        if k:  # a wrong pattern (causal over the later steps' keys too) is far off: the check has teeth
            wrong = torch.ones(T, T, dtype=torch.bool).tril().repeat(1, k + 1)
            s2 = (q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~wrong, float("-inf"))
            bad = layer.finish(ins[k], a.out(torch.softmax(s2, -1) @ vals))
            assert (bad - outs[k]).abs().max() > 1e-3


# ---------------------------------------------------------------------------- vocab, batches, split


def test_draft_vocab_top_n_ties_and_maps():
    counts = np.array([5, 0, 9, 5, 1, 9, 0, 2], dtype=np.int64)
    v = build_draft_vocab(counts, 4)
    assert v.target_ids.tolist() == [0, 2, 3, 5]            # 9, 9, 5, 5: ties to the lower id
    assert v.d2t.tolist() == [0, 1, 1, 2]
    assert v.t2d.tolist() == [True, False, True, True, False, True, False, False]
    assert v.coverage == pytest.approx(28 / 31)
    assert v.target_to_draft().tolist() == [0, -1, 1, 2, -1, 3, -1, -1]
    with pytest.raises(VocabError, match=r"train.draft_vocab_size 9 is larger than the target's vocabulary \(8 tokens\)"):
        build_draft_vocab(counts, 9)


def test_batches_budget_determinism_and_coverage():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=300)
    kw = dict(micro_batch_size=8, max_tokens=600, seed=3)
    b0 = make_batches(lengths, range(300), epoch=0, **kw)
    assert b0 == make_batches(lengths, range(300), epoch=0, **kw)
    assert b0 != make_batches(lengths, range(300), epoch=1, **kw)
    assert sorted(i for b in b0 for i in b) == list(range(300))
    for b in b0:
        assert len(b) <= 8 and (len(b) == 1 or len(b) * max(lengths[b]) <= 600)
    # padding stays small thanks to length bucketing
    padded = sum(len(b) * max(lengths[b]) for b in b0)
    assert padded < 1.25 * lengths.sum()


def test_rank_schedule_gives_one_global_batch():
    batches = [[i] for i in range(10)]
    one = rank_schedule(batches, rank=0, world_size=1, grad_accum=2)
    r0 = rank_schedule(batches, rank=0, world_size=2, grad_accum=1)
    r1 = rank_schedule(batches, rank=1, world_size=2, grad_accum=1)
    for s in range(5):
        assert sorted(one[2 * s] + one[2 * s + 1]) == sorted(r0[s] + r1[s])
    assert rank_schedule(batches, rank=1, world_size=2, grad_accum=1, start_step=3) == [[7], [9]]


def test_split_is_seeded_and_disjoint():
    tr, va = split_indices(100, 0.1, 0)
    assert len(va) == 10 and len(tr) == 90 and not set(tr) & set(va)
    assert np.array_equal(va, split_indices(100, 0.1, 0)[1])
    assert not np.array_equal(va, split_indices(100, 0.1, 1)[1])
    assert len(split_indices(100, 0.0, 0)[1]) == 0


def test_simulated_tau_by_hand():
    assert simulated_tau([0.5, 0.5, 0.0]) == pytest.approx(1.75)
    assert simulated_tau([1.0] * 7) == pytest.approx(8.0)


def test_held_out_split_follows_the_heads_own_record(monkeypatch):
    """The offline table must score the samples the head never trained on, even when
    the eval config's val_fraction differs from the one used in training."""
    from pathlib import Path

    import stage2_train.evaluate as ev
    from schemas.config import load_config

    monkeypatch.setattr(ev, "cache_id", lambda reader: "cache-A")
    reader = type("FakeReader", (), {"root": Path("/nonexistent/cache"), "__len__": lambda self: 200})()
    head_cfg = {"training": {"split": {"val_fraction": 0.1, "seed": 3, "cache_id": "cache-A"}}}
    cfg = load_config(raw={"target": {"path": "x"}, "train": {"val_fraction": 0.05, "seed": 0}})
    got = ev.resolve_split(reader, head_cfg, "val", cfg)
    assert np.array_equal(got, split_indices(200, 0.1, 3)[1])
    # another cache than the one trained on: every sample is held out
    head_cfg["training"]["split"]["cache_id"] = "cache-B"
    assert len(ev.resolve_split(reader, head_cfg, "val", cfg)) == 200
    # no record: the config's split
    assert np.array_equal(ev.resolve_split(reader, {}, "val", load_config(raw={"target": {"path": "x"},
                          "extract": {"cache": "/nonexistent/cache"}, "train": {"val_fraction": 0.05}})),
                          split_indices(200, 0.05, 0)[1])
