"""The assistant-only loss mask, derived from each tokenizer's own chat template."""
import copy
import itertools
import json

import numpy as np
import pytest

from stage1_extract.tokenize import (TemplateError, TemplateRenderError, build_samples, spans_to_mask,
                                     tokenize_conversation)
from schemas.config import load_config
from tiny import TEMPLATES, tiny_tokenizer, write_jsonl

CONV = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "Hello! How can I help you today?"},
    # The answer repeats the user's text: the span must be found after the prompt, not in it.
    {"role": "assistant", "content": "Hello! How can I help you today?"},
    {"role": "user", "content": "Solve 12 * 7"},
    {"role": "assistant", "content": "Solve 12 * 7 = 84.\nThe answer is 84."},
]


@pytest.fixture(scope="module")
def toks():
    return {t: tiny_tokenizer(t) for t in TEMPLATES}


def masked_runs(tok, ids, mask):
    runs = [list(g) for k, g in itertools.groupby(zip(ids, mask), key=lambda x: x[1]) if k]
    return [tok.decode([i for i, _ in r]) for r in runs]


def expected_runs(messages, eot):
    return [m["content"] + eot for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("turns", [1, 3])
@pytest.mark.parametrize("system", [True, False])
def test_mask_exact_on_template_families(toks, template, turns, system):
    tok = toks[template]
    eot = TEMPLATES[template][1]
    msgs = CONV[: 1 + 2 * turns] if system else CONV[1: 1 + 2 * turns]
    ts = tokenize_conversation(tok, msgs, max_length=4096)
    assert not ts.truncated and len(ts.input_ids) == len(ts.loss_mask)
    assert masked_runs(tok, ts.input_ids, ts.loss_mask) == expected_runs(msgs, eot)
    # The token after each end-of-turn token (a newline or the next turn) is not masked.
    eot_id = tok.convert_tokens_to_ids(eot)
    for t, (i, m) in enumerate(zip(ts.input_ids, ts.loss_mask)):
        if i == eot_id and m:
            assert t + 1 == len(ts.input_ids) or ts.loss_mask[t + 1] == 0


def test_smollm2_alpaca_eval_masks(smollm2_target, shared_data):
    from stage1_extract.conversations import load_conversations
    from stage1_extract.target import load_tokenizer

    tok = load_tokenizer(smollm2_target)
    convs, _ = load_conversations([str(shared_data / "alpaca_eval" / "train_llama3_8b_instruct.sharegpt.jsonl")],
                                  max_samples=50)
    assert len(convs) == 50
    # Multi-turn with a system prompt too (SmolLM2's template adds a default one otherwise).
    extra = [{"role": "system", "content": "Be kind."}] + [m for c in convs[:2] for m in c.messages]
    for msgs in [c.messages for c in convs] + [extra]:
        ts = tokenize_conversation(tok, msgs, max_length=100_000)
        assert masked_runs(tok, ts.input_ids, ts.loss_mask) == expected_runs(msgs, "<|im_end|>")
    # The SmolLM2 end-of-turn is followed by a newline token that stays unmasked.
    ts = tokenize_conversation(tok, convs[0].messages, max_length=100_000)
    last = max(i for i, m in enumerate(ts.loss_mask) if m)
    assert tok.decode(ts.input_ids[last:]) == "<|im_end|>\n"


def test_spans_to_mask_boundaries():
    # tokens: [0,3) [3,5) [5,5) zero-width, [5,9) [9,10) [10,12) [12,14)
    offs = [(0, 3), (3, 5), (5, 5), (5, 9), (9, 10), (10, 12), (12, 14)]
    # span [4, 9): token [3,5) straddles its start -> masked; [5,5) zero width -> never; [9,10) touches only.
    assert spans_to_mask(offs, [(4, 9)]) == [0, 1, 0, 1, 0, 0, 0]
    # span [9, 11): [10,12) straddles its end -> masked; two spans at once.
    assert spans_to_mask(offs, [(0, 1), (9, 11)]) == [1, 0, 0, 0, 1, 1, 0]
    assert spans_to_mask(offs, [(3, 5), (5, 9)]) == [0, 1, 0, 1, 0, 0, 0]
    assert spans_to_mask(offs, []) == [0] * 7


def test_straddling_start_token_mistral(toks):
    """' the' is one BPE token covering the template's space and the content's first letter: masked."""
    tok = toks["mistral"]
    msgs = [{"role": "user", "content": "Write a poem"}, {"role": "assistant", "content": "the sea and the sky"}]
    ts = tokenize_conversation(tok, msgs, max_length=512)
    first = ts.loss_mask.index(1)
    assert tok.convert_ids_to_tokens(ts.input_ids[first]) == "Ġthe"
    assert masked_runs(tok, ts.input_ids, ts.loss_mask) == [" the sea and the sky</s>"]


def test_straddling_end_token_without_end_of_turn_marker(smollm2_target):
    """A template with no special end-of-turn token: the span is the content; the merged
    newline token covering its last character and the template's newline is masked."""
    from stage1_extract.target import load_tokenizer

    tok = copy.deepcopy(load_tokenizer(smollm2_target))
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello.\n"},
            {"role": "user", "content": "x"}]
    ts = tokenize_conversation(tok, msgs, max_length=512)
    toks_ = tok.convert_ids_to_tokens(ts.input_ids)
    masked = [t for t, m in zip(toks_, ts.loss_mask) if m]
    assert masked == ["ĠHello", ".", "ĊĊ"]              # 'ĊĊ' = content's '\n' + template's first '\n'
    assert masked_runs(tok, ts.input_ids, ts.loss_mask) == [" Hello.\n\n"]


def test_history_rewriting_template_is_refused(toks):
    tok = copy.deepcopy(toks["chatml"])
    # Drops the reasoning of earlier assistant turns (as reasoning models' templates do).
    tok.chat_template = (
        "{% for m in messages %}{% set c = m['content'] %}"
        "{% if m['role'] == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1] %}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>hmm</think>a"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(TemplateError, match="up to assistant turn 1 differently when later turns follow "
                                            r"\(it rewrites history"):
        tokenize_conversation(tok, msgs, max_length=512)
    # One turn: nothing is rewritten, the mask is fine.
    ts = tokenize_conversation(tok, msgs[:2], max_length=512)
    assert masked_runs(tok, ts.input_ids, ts.loss_mask) == ["<think>hmm</think>a<|im_end|>"]


def test_template_refusal_and_build_samples_policies(toks, tmp_path):
    tok = copy.deepcopy(toks["chatml"])
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(TemplateRenderError, match="System role not supported"):
        tokenize_conversation(tok, CONV[:3], max_length=512)
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONV[1:3]}, {"messages": CONV[:3]}, {"messages": CONV[1:5]}])
    cfg = load_config(raw={"target": {"path": "x"}, "data": {"train": [str(data)], "on_error": "skip"}})
    samples, stats = build_samples(cfg, tok)
    assert [s.sample_index for s in samples] == [0, 2]
    assert stats.skipped == {"chat template refused": 1} and stats.kept == 2
    assert stats.errors[0].startswith(f"{data}:2: the chat template refused the conversation")
    cfg.data.on_error = "raise"
    with pytest.raises(TemplateRenderError, match=rf"{data}:2: the chat template refused"):
        build_samples(cfg, tok)


def test_truncation_policies(toks, tmp_path):
    tok = toks["chatml"]
    msgs = CONV[1:5]
    full = tokenize_conversation(tok, msgs, max_length=4096)
    n = len(full.input_ids)
    cut = tokenize_conversation(tok, msgs, max_length=n - 5)
    assert cut.truncated and cut.full_length == n
    assert cut.input_ids == full.input_ids[: n - 5] and cut.loss_mask == full.loss_mask[: n - 5]
    kept = tokenize_conversation(tok, msgs, max_length=n - 5, truncation="skip")
    assert kept.truncated and kept.input_ids == full.input_ids
    exact = tokenize_conversation(tok, msgs, max_length=n)
    assert not exact.truncated and exact.input_ids == full.input_ids

    first_loss = full.loss_mask.index(1)
    short = {"messages": CONV[1:3]}
    long_ = {"messages": msgs}
    data = write_jsonl(tmp_path / "t.jsonl", [short, long_, short])
    ns = len(tokenize_conversation(tok, CONV[1:3], max_length=4096).input_ids)
    assert ns < n - 5
    cfg = load_config(raw={"target": {"path": "x"}, "data": {"train": [str(data)], "max_length": n - 5}})
    samples, stats = build_samples(cfg, tok)
    assert [len(s.input_ids) for s in samples] == [ns, n - 5, ns]
    assert samples[1].input_ids.dtype == np.int32 and samples[1].loss_mask.dtype == np.uint8
    assert stats.truncated == 1 and stats.kept == 3 and stats.skipped == {}
    assert stats.tokens == 2 * ns + n - 5
    assert stats.loss_tokens == sum(int(s.loss_mask.sum()) for s in samples)
    cfg.data.truncation = "skip"
    samples, stats = build_samples(cfg, tok)
    assert [s.sample_index for s in samples] == [0, 2]
    assert stats.skipped == {"too long": 1} and stats.truncated == 0 and stats.kept == 2
    assert stats.errors == [f"{data}:2: {n} tokens > data.max_length {n - 5}"]
    # drop_tail that cuts off every assistant token: nothing to learn, counted.
    cfg.data.truncation, cfg.data.max_length = "drop_tail", first_loss
    data2 = write_jsonl(tmp_path / "t2.jsonl", [long_, {"messages": [{"role": "user", "content": "q"},
                                                                      {"role": "assistant", "content": "a"}]}])
    samples, stats = build_samples(cfg, tok, [str(data2)])
    assert [s.sample_index for s in samples] == [1]
    assert stats.skipped == {"no loss tokens after truncation": 1}
    pct = stats.percentiles()
    assert pct["max"] == len(samples[0].input_ids) and json.dumps(stats.to_dict())


def test_content_also_inside_header_without_generation_prompt(toks):
    """No add_generation_prompt support and a plain-text header that contains the content:
    the span is the rendered content at the end of the turn, not the copy in the header."""
    from stage1_extract.tokenize import assistant_char_spans

    tok = copy.deepcopy(toks["chatml"])
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}### User: {{ m['content'] }}\n"
                         "{% else %}### Assistant: {{ m['content'] }}</s>\n{% endif %}{% endfor %}")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"},
            {"role": "user", "content": "r"}, {"role": "assistant", "content": "User"}]
    text, spans = assistant_char_spans(tok, msgs)
    assert text == "### User: q\n### Assistant: A</s>\n### User: r\n### Assistant: User</s>\n"
    assert [text[a:b] for a, b in spans] == ["A</s>", "User</s>"]
    assert spans[0][0] == text.index("Assistant: A") + len("Assistant: ")


@pytest.mark.parametrize("template", ["llama3", "gemma", "chatml"])
def test_trimmed_content_and_assistant_first(toks, template):
    """Templates that trim the content (llama3, gemma) mask the trimmed text; an assistant
    turn that opens the conversation is found too."""
    tok, eot = toks[template], TEMPLATES[template][1]
    msgs = [{"role": "assistant", "content": "Hello! How can I help you today?"},
            {"role": "user", "content": "  What is the capital of France?\n"},
            {"role": "assistant", "content": "  Paris is the capital.\n\n"}]
    ts = tokenize_conversation(tok, msgs, max_length=4096)
    last = "Paris is the capital." if template != "chatml" else "  Paris is the capital.\n\n"
    assert masked_runs(tok, ts.input_ids, ts.loss_mask) == ["Hello! How can I help you today?" + eot, last + eot]


@pytest.mark.parametrize("template, first", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"),
                                             ("mistral", " </s>")])
def test_empty_answer_masks_only_end_of_turn(toks, template, first):
    from stage1_extract.tokenize import assistant_char_spans

    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""},
            {"role": "user", "content": "r"}, {"role": "assistant", "content": "ok"}]
    text, spans = assistant_char_spans(toks[template], msgs)
    assert [text[a:b] for a, b in spans] == [first, "ok" + TEMPLATES[template][1]]
