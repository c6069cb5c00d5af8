"""TTT rotary positions t + k, memory-linear TTT attention, stage-3 drafting with the same rule.

The reference below is written here, independently of stage2_train.model's ttt_step:
own RMSNorm, own rotary (explicit cos/sin at position t + k), own attention over the
explicit [T, (k+1)T] mask.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from schemas.head import POSITION_RULE, POSITION_RULE_KEY, HeadError, make_head_config
from stage2_train.losses import ttt_forward
from stage2_train.model import Eagle3Draft

from test_train_unit import TARGET_CFG


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def tiny_head(n_draft=16, seed=0, target=TARGET_CFG) -> Eagle3Draft:
    torch.manual_seed(seed)
    V = target["vocab_size"]
    m = Eagle3Draft(make_head_config(target, draft_vocab_size=n_draft, layer_ids=[2, 3, 4]), torch.randn(V, 32))
    ids = torch.arange(V - n_draft, V)
    m.set_vocab_map(ids - torch.arange(n_draft), torch.zeros(V, dtype=torch.bool).index_fill_(0, ids, True))
    with torch.no_grad():  # non-trivial norm weights, so a norm mix-up would show
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return m


# ---------------------------------------------------------------------------- the reference


def rms(x, w, eps):
    # fp32 statistics like the model's RMSNorm, so float64 runs agree to 1e-10
    y = x.float()
    return w * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x, pos, theta):
    """x [B, H, T, d] rotated at integer positions pos [T] (half-split rotary, as Llama).

    Angles in fp32 like the model's rotary buffers (so float64 runs agree to 1e-10)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos.to(torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cat((ang.cos(), ang.cos()), -1).to(x.dtype), torch.cat((ang.sin(), ang.sin()), -1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat((-x2, x1), -1) * sin


def reference_unroll(m: Eagle3Draft, hidden, ids_per_step, rule=lambda t, k: t + k):
    """Outputs (pre-norm hidden [B,T,h]) of TTT steps 0..S-1, by explicit masked attention."""
    L, A = m.midlayer, m.midlayer.self_attn
    eps, theta = m.config["rms_norm_eps"], m.config["rope_theta"]
    B, T, _ = hidden.shape
    nh, nkv, d = A.num_heads, A.num_kv, A.head_dim
    t = torch.arange(T)
    keys, vals, outs, h = [], [], [], hidden
    for k, ids in enumerate(ids_per_step):
        emb = F.embedding(ids, m.embed_tokens.weight)
        x = torch.cat((rms(emb, L.input_layernorm.weight, eps), rms(h, L.hidden_norm.weight, eps)), -1)
        q = F.linear(x, A.q_proj.weight).view(B, T, nh, d).transpose(1, 2)
        kk = F.linear(x, A.k_proj.weight).view(B, T, nkv, d).transpose(1, 2)
        vv = F.linear(x, A.v_proj.weight).view(B, T, nkv, d).transpose(1, 2)
        pos = rule(t, k)
        q, kk = rotate(q, pos, theta), rotate(kk, pos, theta)
        keys.append(kk.repeat_interleave(nh // nkv, dim=1))
        vals.append(vv.repeat_interleave(nh // nkv, dim=1))
        mask = torch.zeros(T, (k + 1) * T, dtype=torch.bool)
        for i in range(T):
            mask[i, : i + 1] = True                      # step-0 keys, causal
            for j in range(1, k + 1):
                mask[i, j * T + i] = True                # own row's key of step j
        s = q @ torch.cat(keys, 2).transpose(-1, -2) / d ** 0.5
        o = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ torch.cat(vals, 2)
        a = h + F.linear(o.transpose(1, 2).reshape(B, T, nh * d), A.o_proj.weight)
        y = rms(a, L.post_attention_layernorm.weight, eps)
        mlp = L.mlp
        out = a + F.linear(F.silu(F.linear(y, mlp.gate_proj.weight)) * F.linear(y, mlp.up_proj.weight),
                           mlp.down_proj.weight)
        outs.append(out)
        h = out
    return outs


def model_unroll(m, hidden, ids_per_step):
    cache, outs, h = [], [], hidden
    pos = torch.arange(hidden.shape[1]).expand(hidden.shape[0], -1)
    for ids in ids_per_step:
        h = m.ttt_step(h, ids, pos, cache)
        outs.append(h)
    return outs


def _inputs(B=2, T=9, S=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, 32, generator=g, dtype=torch.float64)
    return hidden, [torch.randint(0, 200, (B, T), generator=g) for _ in range(S)]


@pytest.mark.parametrize("block_rows", [None, 2])   # one score block, or blocks of 2 query rows (T = 9)
def test_ttt_steps_and_gradients_match_reference_at_t_plus_k(block_rows, monkeypatch):
    import stage2_train.ttt_attention as ta

    m = tiny_head().double()
    hidden, ids = _inputs()
    if block_rows:
        B, T = hidden.shape[:2]
        monkeypatch.setattr(ta, "SCORE_BLOCK_ELEMENTS", B * m.midlayer.self_attn.num_heads * T * block_rows)
        assert ta._chunk_rows(torch.zeros(B, m.midlayer.self_attn.num_heads, T, 8)) == block_rows
    weights = [torch.randn_like(hidden) for _ in ids]
    results = []
    for fn in (model_unroll, reference_unroll):
        m.zero_grad()
        h = hidden.clone().requires_grad_(True)
        outs = fn(m, h, ids)
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results.append(([o.detach() for o in outs], h.grad.clone(), grads))
    (mo, mh, mg), (ro, rh, rg) = results
    for k in range(len(ids)):  # k = 0..3
        torch.testing.assert_close(mo[k], ro[k], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(mh, rh, rtol=1e-9, atol=1e-10)
    assert set(mg) == set(rg) and len(mg) >= 10
    for n in mg:
        torch.testing.assert_close(mg[n], rg[n], rtol=1e-8, atol=1e-10, msg=n)


def test_step0_unchanged_and_later_steps_moved_by_the_rule():
    """Step 0 is what the old rule (every step at t) gave; steps >= 1 differ from it."""
    m = tiny_head().double()
    hidden, ids = _inputs()
    with torch.no_grad():
        new = model_unroll(m, hidden, ids)
        old = reference_unroll(m, hidden, ids, rule=lambda t, k: t)
    torch.testing.assert_close(new[0], old[0], rtol=1e-9, atol=1e-10)
    for k in range(1, len(ids)):
        assert (new[k] - old[k]).abs().max() > 1e-3


def test_position_rule_recorded_in_head_config():
    cfg = make_head_config(TARGET_CFG, draft_vocab_size=16, layer_ids=[2, 3, 4])
    assert cfg[POSITION_RULE_KEY] == POSITION_RULE == "t+k"


# ---------------------------------------------------------------------------- memory


def _batch(B, L, V, n_draft, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = 3
    b = {"input_ids": torch.randint(0, V, (B, L), generator=g), "loss_mask": torch.ones(B, L, dtype=torch.bool),
         "valid": torch.ones(B, L, dtype=torch.bool),
         "t_idx": torch.randint(0, n_draft, (B, L, K), generator=g),
         "t_prob": torch.softmax(torch.randn(B, L, K, generator=g), -1),
         "t_top1": torch.randint(0, n_draft, (B, L), generator=g),
         "hidden": torch.randn(B, L, 3 * 32, generator=g)}
    return {**b, "t_valid": torch.ones(B, L, K, dtype=torch.bool), "t_logp": b["t_prob"].log()}


def test_unroll_keeps_no_T_by_T_scores_and_no_full_logits_for_backward():
    """Autograd keeps tensors linear in T, and at most a chunk of [positions, N] logits."""
    V, N, T = 1024, 512, 64
    m = tiny_head(n_draft=N, target={**TARGET_CFG, "vocab_size": V})
    batch = _batch(1, T, V, N)
    params = {p.data_ptr() for p in m.parameters()} | {b.data_ptr() for b in m.buffers()}
    sizes = []

    def pack(t):
        if t.data_ptr() not in params:
            sizes.append((t.numel(), tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ttt_forward(m, batch, 4, loss_chunk_tokens=16)
    out.loss.backward()
    nh = m.midlayer.self_attn.num_heads
    biggest = max(sizes)
    assert biggest[0] < nh * T * T and biggest[0] < T * N, biggest
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad)


def test_chunked_loss_and_gradients_equal_unchunked_reference():
    """ttt_forward (SDPA + lse, checkpointed loss chunks) == the reference unroll with a plain full-logit loss."""
    V, N, T, S = 200, 16, 12, 3
    m = tiny_head(n_draft=N).double()
    batch = _batch(2, T, V, N, seed=3)
    batch["hidden"] = batch["hidden"].double()
    batch["t_prob"] = batch["t_prob"].double()
    m.zero_grad()
    out = ttt_forward(m, batch, S, 0.8, loss_chunk_tokens=6)   # 3 positions per chunk with B = 2
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    from stage2_train.teacher import step_view
    m.zero_grad()
    views = [step_view(batch, k) for k in range(S)]
    outs = reference_unroll(m, m.fuse(batch["hidden"]), [v.input_ids for v in views])
    total = 0.0
    for k, (o, v) in enumerate(zip(outs, views)):
        logp = torch.log_softmax(F.linear(rms(o, m.norm.weight, m.config["rms_norm_eps"]), m.lm_head.weight), -1)
        ce = -(v.prob * logp.gather(-1, v.idx)).sum(-1)
        lm = v.loss_mask.double()
        total = total + 0.8 ** k * (ce * lm).sum() / lm.sum().clamp_min(1)
    total.backward()
    torch.testing.assert_close(out.loss.detach(), total.detach(), rtol=1e-10, atol=1e-12)
    for n, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-8, atol=1e-11, msg=n)


# ---------------------------------------------------------------------------- stage 3


def _tiny_target(tiny_llama_dir):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()


def test_chain_draft_logits_equal_ttt_unroll_steps(tiny_llama_dir):
    """DraftRunner's depth-d logits == TTT step d at the last accepted row, for the same prefix."""
    from spec_helpers import make_head, tiny_layer_ids
    from stage3_eval.draft_runner import DraftRunner
    from stage3_eval.tree import build_tree

    tgt = _tiny_target(tiny_llama_dir)
    head = make_head(tgt, seed=5)
    ids = torch.tensor([5, 17, 33, 60, 61, 9, 44, 12])
    with torch.no_grad():
        hs = tgt(input_ids=ids[None], output_hidden_states=True).hidden_states
    aux = torch.cat([hs[i][0] for i in tiny_layer_ids(tgt)], -1)
    T = ids.numel() - 1
    dr = DraftRunner(head)
    dr.commit(aux[:T], ids[1:], torch.arange(T))
    captured = {}
    orig = dr.expand

    def spy(b, frontier):
        lg = orig(b, frontier)
        for r, f in enumerate(frontier.tolist()):
            captured[int(b.depth[f])] = (lg[r].clone(), int(b.tokens[f]))
        return lg

    dr.expand = spy
    seen_pos = []
    step = head.step

    def step_spy(hidden, input_ids, position_ids, **kw):
        seen_pos.append(position_ids.flatten().tolist())
        return step(hidden, input_ids, position_ids, **kw)

    head.step = step_spy
    depth = 3
    build_tree(dr, top_k=1, depth=depth, total_tokens=depth)
    head.step = step
    assert sorted(captured) == list(range(1, depth))  # the last node is drafted, not expanded
    assert seen_pos == [[T - 1 + d] for d in range(1, depth)]  # depth d at t + d, t = last accepted index
    # TTT inputs: step 0 reads x_{t+1}; step d's last row reads the chain token at depth d
    step_ids = [ids[1:][None]]
    for d in range(1, depth):
        x = torch.zeros(1, T, dtype=torch.long)
        x[0, -1] = captured[d][1]
        step_ids.append(x)
    with torch.no_grad():
        outs = model_unroll(head, head.fuse(aux[:T])[None], step_ids)
        torch.testing.assert_close(head.logits(outs[0][0, -1]), dr.root_logits(), rtol=1e-5, atol=1e-5)
        for d in range(1, depth):
            torch.testing.assert_close(head.logits(outs[d][0, -1]), captured[d][0], rtol=1e-5, atol=1e-5)


def _write(head, out):
    from stage2_train.export import write_head

    return write_head(head, out)


def test_stage3_refuses_head_without_position_rule(tiny_llama_dir, tmp_path):
    from spec_helpers import make_head
    from stage3_eval.draft_runner import load_draft

    tgt = _tiny_target(tiny_llama_dir)
    d = _write(make_head(tgt), tmp_path / "head")
    assert load_draft(d, tgt) is not None
    cfg = json.loads((d / "config.json").read_text())
    del cfg[POSITION_RULE_KEY]   # what heads trained before the t + k rule look like
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HeadError, match=r"config.json: ttt_position_rule has none; this version drafts TTT step k "
                                        r"at position t \+ k"):
        load_draft(d, tgt)
    cfg[POSITION_RULE_KEY] = "t"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HeadError, match="ttt_position_rule is 't'"):
        load_draft(d, tgt)
    cfg[POSITION_RULE_KEY] = POSITION_RULE
    cfg["eagle_config"] = {}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HeadError, match=r"must list 3 layer ids, got \[\]"):
        load_draft(d, tgt)


# ---------------------------------------------------------------------------- biases


def test_head_has_no_biases_even_when_the_target_has_them(tmp_path):
    from schemas.head import load_head
    from stage2_train.export import write_head

    target = {**TARGET_CFG, "attention_bias": True, "mlp_bias": True}
    cfg = make_head_config(target, draft_vocab_size=16, layer_ids=[2, 3, 4])
    assert cfg["attention_bias"] is False and cfg["mlp_bias"] is False
    with pytest.raises(HeadError, match="model override attention_bias: true is not supported"):
        make_head_config(target, draft_vocab_size=16, layer_ids=[2, 3, 4], overrides={"attention_bias": True})
    m = tiny_head(target=target)
    assert not [n for n, _ in m.named_parameters() if "bias" in n]
    # an older config that still says true builds no biases either
    old = Eagle3Draft({**cfg, "attention_bias": True, "mlp_bias": True})
    assert not [n for n, _ in old.named_parameters() if "bias" in n]
    # one training step, then save and load back
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    before = m.lm_head.weight.detach().clone()
    ttt_forward(m, _batch(2, 8, 200, 16), 2).loss.backward()
    opt.step()
    assert not torch.equal(before, m.lm_head.weight)
    d = write_head(m, tmp_path / "head")
    config, tensors = load_head(d)
    m2 = Eagle3Draft(config)
    missing, unexpected = m2.load_state_dict(tensors, strict=False)
    assert not unexpected and all(k.startswith(("embed_tokens.", "rotary.")) for k in missing)
    torch.testing.assert_close(m2.lm_head.weight, m.lm_head.weight)
