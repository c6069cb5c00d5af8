"""A one-token target pass (plain greedy decoding, the baseline of every speed-up) on a bf16 CPU target with
grouped kv heads reaches SDPA packed, the group's query heads as rows of one kv head, instead of as the single
query row that PyTorch's CPU kernel runs ~4x slower in bf16 (stage3_eval.target_runner); the logits are
those of the unpacked pass. fp32 targets and targets with sliding-window layers keep the plain call."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from stage3_eval.target_runner import TargetRunner, check_tolerance

PROMPT = [5, 17, 33, 60, 61, 9, 100, 101]


def _load(tiny_llama_dir, dtype):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=dtype, attn_implementation="sdpa").eval()


def _one_token_pass(runner: TargetRunner, monkeypatch) -> tuple[torch.Tensor, list[tuple]]:
    """Logits of the pass after an 8-token prefill, and the query shapes SDPA saw in it."""
    cache = runner.new_cache()
    ids = torch.tensor(PROMPT)
    runner.forward(cache, ids[:-1], torch.arange(len(PROMPT) - 1), want_logits=False, want_aux=False)
    seen, real = [], F.scaled_dot_product_attention

    def spy(q, *a, **kw):
        seen.append(tuple(q.shape))
        return real(q, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(F, "scaled_dot_product_attention", spy)
        out = runner.forward(cache, ids[-1:], torch.tensor([len(PROMPT) - 1]), want_aux=False)
    return out.logits, seen


def test_a_one_token_bf16_pass_reaches_sdpa_packed_with_the_logits_of_the_plain_call(tiny_llama_dir, monkeypatch):
    model = _load(tiny_llama_dir, torch.bfloat16)
    cfg = model.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    assert group > 1
    runner = TargetRunner(model)
    assert runner.pack_one_token
    packed, seen = _one_token_pass(runner, monkeypatch)
    assert seen and all(s[1:3] == (cfg.num_key_value_heads, group) for s in seen), seen
    runner.pack_one_token = False
    plain, seen_plain = _one_token_pass(runner, monkeypatch)
    assert all(s[1:3] == (cfg.num_attention_heads, 1) for s in seen_plain), seen_plain
    assert float((packed - plain).abs().max()) <= check_tolerance(torch.bfloat16) * float(plain.abs().max())
    assert int(packed.argmax()) == int(plain.argmax())


def test_fp32_and_sliding_window_targets_keep_the_plain_call(tiny_llama_dir):
    assert not TargetRunner(_load(tiny_llama_dir, torch.float32)).pack_one_token
    model = _load(tiny_llama_dir, torch.bfloat16)
    model.config.layer_types = ["sliding_attention"] + ["full_attention"] * (model.config.num_hidden_layers - 1)
    assert not TargetRunner(model).pack_one_token


def test_plain_decoding_with_packed_passes_matches_hf_generate(tiny_llama_dir):
    from stage3_eval.spec_decode import DecodeSettings, generate

    model = _load(tiny_llama_dir, torch.bfloat16)
    runner = TargetRunner(model)
    got = generate(runner, None, PROMPT, DecodeSettings(method="plain", max_new_tokens=12), eos_ids=set()).tokens
    with torch.no_grad():
        want = model.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False,
                              eos_token_id=[], pad_token_id=0)[0, len(PROMPT):].tolist()
    assert got == want
