"""Tiny tokenizers and random targets built in seconds, for tests (no downloads).

`tiny_tokenizer(template)` trains a small byte-level BPE with `tokenizers` and
attaches one of the chat templates below. `tiny_target(dir, family)` saves a random
HF model (llama, qwen2, qwen3, minicpm3, gemma) plus the tokenizer: an HF model
directory that `target.path` can point at.
"""
from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "def add(a, b):\n    return a + b\n",
    "Solve 12 * 7 = 84. The answer is 84.",
    "Hello! How can I help you today? I am a helpful assistant.",
    "Write a short poem about the sea and the sky and the wind.",
    "system user assistant model human gpt",
] * 20

SPECIAL = ["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>",
           "[INST]", "[/INST]", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<pad>"]

TEMPLATES = {
    # MiniCPM4 / Qwen style ChatML
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        "<|im_end|>"),
    # SmolLM2 style: ChatML with a default system prompt
    "chatml_default_system": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        "<|im_end|>"),
    "llama3": (
        "{{ '<|begin_of_text|>' }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        "<|eot_id|>"),
    "gemma": (
        "{{ '<bos>' }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
        "<end_of_turn>"),
    "mistral": (
        "{{ '<s>' }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + '</s>' }}{% endif %}{% endfor %}",
        "</s>"),
    "phi3": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
        "<|end|>"),
}


def tiny_tokenizer(template: str = "chatml", vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    chat, eos = TEMPLATES[template]
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token="<pad>")
    tok.chat_template = chat
    return tok


def tiny_target(out_dir: str | Path, family: str = "llama", template: str = "chatml",
                layers: int = 6, hidden: int = 64, seed: int = 0) -> Path:
    """Save a random `family` model + tiny tokenizer to out_dir; returns the dir."""
    import torch
    import transformers as tf

    out = Path(out_dir)
    tok = tiny_tokenizer(template)
    V = len(tok)
    common = dict(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                  tie_word_embeddings=False)
    if family == "llama":
        cfg = tf.LlamaConfig(**common)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=16)
    elif family == "gemma":
        cfg = tf.GemmaConfig(**common, head_dim=16)
    elif family == "minicpm3":
        # MiniCPM family: scaled embeddings (scale_emb) and logits (dim_model_base), MLA attention.
        cfg = tf.MiniCPM3Config(**{k: v for k, v in common.items() if k != "num_key_value_heads"},
                                num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
                                qk_rope_head_dim=8, v_head_dim=16, scale_emb=12, dim_model_base=32,
                                scale_depth=1.4)
    else:
        raise ValueError(f"unknown family {family}")
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    # Random init with small std makes every logit ~equal; scale up so top-k is informative.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def write_jsonl(path: str | Path, rows: list) -> Path:
    p = Path(path)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def sharegpt_rows(n: int, seed: int = 0, turns: int = 1) -> list[dict]:
    """n small synthetic ShareGPT conversations (no third-party text)."""
    import random

    rnd = random.Random(seed)
    words = "the quick brown fox jumps over lazy dog what is capital of france paris answer help poem sea sky".split()
    rows = []
    for i in range(n):
        conv = []
        for _ in range(turns):
            conv.append({"from": "human", "value": " ".join(rnd.choices(words, k=rnd.randint(3, 12)))})
            conv.append({"from": "gpt", "value": " ".join(rnd.choices(words, k=rnd.randint(5, 30)))})
        rows.append({"id": f"s{i}", "conversations": conv})
    return rows


# ---- MiniCPM4 (model_type `minicpm`, native model in schemas/minicpm4.py) ----------------

# MiniCPM4's special-token layout: <unk> <s> </s> at 0, 1, 2 and the chat tokens at the
# END of the vocabulary (<|im_end|> = 73440 of 73448 in the real one; here len - 8).
MINICPM4_LEADING = ["<unk>", "<s>", "</s>"]
MINICPM4_TRAILING = ["<|im_end|>", "<|im_start|>", "<|tool_call|>", "<|execute_start|>", "<|execute_end|>",
                     "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
# ChatML as MiniCPM4 renders it: no default system prompt, no BOS in the template (the
# tokenizer adds <s> itself when asked for special tokens), `<|im_end|>` ends each turn.
MINICPM4_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def minicpm4_tokenizer(vocab_size: int = 320):
    """Tiny byte-level BPE with MiniCPM4's special ids: eos <|im_end|> = len - 8, </s> = 2, bos <s> = 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=MINICPM4_LEADING,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": MINICPM4_TRAILING})
    tok.chat_template = MINICPM4_TEMPLATE
    assert tok.convert_tokens_to_ids("</s>") == 2 and tok.convert_tokens_to_ids("<|im_end|>") == len(tok) - 8
    return tok


def minicpm4_config_dict(vocab_size: int, *, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                         max_pos: int = 1024, original: int = 1024, seed: int = 0, eos=(2,)) -> dict:
    """config.json in the public MiniCPM4 checkpoints' own format (rope_scaling, rope_theta, muP fields)."""
    import random

    rnd = random.Random(seed)
    half = hidden // heads // 2
    return {
        "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm",
        "bos_token_id": 1, "eos_token_id": list(eos), "hidden_act": "silu", "initializer_range": 0.1,
        "hidden_size": hidden, "intermediate_size": 3 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": {"rope_type": "longrope",
                         "short_factor": [round(1.0 + 0.5 * rnd.random() * i / half, 6) for i in range(half)],
                         "long_factor": [round(1.0 + 6.0 * rnd.random() * i / half, 6) for i in range(half)],
                         "original_max_position_embeddings": original},
        "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": max(1, hidden // 4),
        "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True, "vocab_size": vocab_size,
    }


def write_minicpm4(out_dir: str | Path, cfg: dict, tok=None, seed: int = 0) -> Path:
    """Random weights for `cfg` (a MiniCPM4 config.json dict) saved under the checkpoint's
    own names, the config.json exactly as given, and the tokenizer (if any)."""
    import torch
    from safetensors.torch import save_file

    from schemas.minicpm4 import MiniCPM4Config, MiniCPM4ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = MiniCPM4ForCausalLM(MiniCPM4Config(**{k: v for k, v in cfg.items() if k not in ("architectures",)}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15 if "embed" not in name else 0.05)
            else:  # norms: not all ones, so a missing norm weight shows
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False}, indent=2))
    if tok is not None:
        tok.save_pretrained(str(out))
    return out


def tiny_minicpm4(out_dir: str | Path, layers: int = 6, hidden: int = 64, seed: int = 0, **kw) -> Path:
    """A tiny random MiniCPM4 HF directory with the MiniCPM4 tokenizer; eos [</s>, <|im_end|>]."""
    tok = minicpm4_tokenizer()
    cfg = minicpm4_config_dict(len(tok), layers=layers, hidden=hidden, seed=seed,
                               eos=(2, tok.convert_tokens_to_ids("<|im_end|>")), **kw)
    return write_minicpm4(out_dir, cfg, tok, seed=seed)


def load_tiny_target(tmp_path: Path, family: str):
    """A tiny random target of `family` (minicpm4 through its own writer), loaded fp32 on the CPU the way
    stage 1 loads targets."""
    from schemas.config import TargetConfig
    from stage1_extract.target import load_target

    if family == "minicpm4":
        d = write_minicpm4(tmp_path / "t", minicpm4_config_dict(200), tok=minicpm4_tokenizer())
    else:
        d = tiny_target(tmp_path / "t", family)
    model, _, _ = load_target(TargetConfig(path=str(d), dtype="float32", device="cpu"))
    return model
