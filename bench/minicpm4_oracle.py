"""The native MiniCPM4 (schemas/minicpm4.py) against an independent implementation: vLLM's `minicpm`.

    python bench/minicpm4_oracle.py [--layers 4 --hidden 256 --original 64 --lengths 32 160]

Writes a tiny random MiniCPM4-shaped checkpoint (longrope with a short original length,
so one sequence uses the short factors and one the long ones), runs every sequence
through the native model here and through vLLM's MiniCPMForCausalLM in the oracle venv
(EAGLE3_VLLM_PYTHON or .venv-vllm/bin/python from `make vllm`; a
subprocess, CPU, float32), and prints the max differences of

* the logits of every prompt position (vLLM's compute_logits, hooked),
* the prompt log-probabilities (every id of vLLM's top-K per position, plus top-K order),
* the hidden states the pipeline captures, `extract.layers` = [2, L//2, L-3] as indices
  into HF's output_hidden_states (index i = the output of decoder layer i-1; vLLM's
  decoder layers are hooked through LLM.apply_model).

vLLM picks the longrope factor set by max_model_len (long when it exceeds the original
length) where the native model picks it by the sequence's own length, so each sequence
runs in a vLLM instance whose max_model_len is on the same side as its length.
Exit status 1 when a difference exceeds --tol. Entries marked * in the output are the
captured layers; every hidden state below the final norm is compared.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The oracle gets the checkpoint plus this config-only class (vLLM's transformers has no
# `minicpm` config); it stores the fields as given, the model is vLLM's own.
ORACLE_CONFIG_PY = '''from transformers import PretrainedConfig


class MiniCPMConfig(PretrainedConfig):
    model_type = "minicpm"

    def __init__(self, **kwargs):
        self.max_position_embeddings = kwargs.get("max_position_embeddings", 2048)
        self.hidden_size = kwargs.get("hidden_size")
        self.num_attention_heads = kwargs.get("num_attention_heads")
        super().__init__(**kwargs)
'''


def oracle_python() -> str | None:
    for p in (os.environ.get("EAGLE3_VLLM_PYTHON"), str(ROOT / ".venv-vllm/bin/python")):
        if p and Path(p).is_file():
            return p
    return None


# ---------------------------------------------------------------- the vLLM side (oracle venv)

def vllm_side(ckpt: str, max_model_len: int, tokens_file: str, out_file: str, topk: int) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # hooks live in this process
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt  # noqa: I001

    seqs = json.loads(Path(tokens_file).read_text())
    llm = LLM(model=ckpt, dtype="float32", max_model_len=max_model_len, enforce_eager=True,
              gpu_memory_utilization=0.2, skip_tokenizer_init=True, trust_remote_code=True, max_num_seqs=1,
              max_num_batched_tokens=max(512, max_model_len), enable_prefix_caching=False, seed=0)
    captured: dict[int, torch.Tensor] = {}

    def install(model):
        layers = model.model.layers
        def pre0(_m, args, kwargs):  # the scaled embeddings entering layer 0 (HF index 0)
            captured[0] = (kwargs.get("hidden_states", args[1] if len(args) > 1 else None)).detach().clone()
        layers[0].register_forward_pre_hook(pre0, with_kwargs=True)
        for i, layer in enumerate(layers):
            def post(_m, _a, out, i=i):  # (hidden_states, residual=None): the full residual stream
                captured[i + 1] = out[0].detach().clone()
            layer.register_forward_hook(post)
        def logits_hook(_m, _a, out):  # compute_logits: every prompt row (prompt_logprobs) and the last
            if out is not None and out.dim() == 2 and out.shape[0] > captured.get("logits_rows", 0):
                captured["logits_rows"] = out.shape[0]
                captured["logits"] = out.detach().clone()
        model.logits_processor.register_forward_hook(logits_hook)
        return len(layers)

    llm.apply_model(install)
    results = []
    for toks in seqs:
        captured.clear()
        out = llm.generate([TokensPrompt(prompt_token_ids=toks)],
                           SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=topk, detokenize=False),
                           use_tqdm=False)[0]
        plp = [None if d is None else {int(k): float(v.logprob) for k, v in d.items()} for d in out.prompt_logprobs]
        hidden = {str(i): captured[i][: len(toks)].float().tolist() for i in sorted(k for k in captured
                                                                             if isinstance(k, int))}
        logits = captured["logits"].float().tolist() if "logits" in captured else None
        results.append({"prompt_logprobs": plp, "hidden": hidden, "logits": logits})
    Path(out_file).write_text(json.dumps(results))


# ---------------------------------------------------------------- the native side (project venv)

def write_checkpoint(d: Path, args) -> dict:
    from tiny import minicpm4_config_dict, write_minicpm4

    cfg = minicpm4_config_dict(args.vocab, layers=args.layers, hidden=args.hidden, heads=args.heads,
                               kv_heads=args.kv_heads, max_pos=args.max_pos, original=args.original, seed=args.seed)
    write_minicpm4(d, cfg, seed=args.seed)
    return cfg


def native(ckpt: Path, seqs: list[list[int]], attn: str):
    import torch

    from transformers import AutoModelForCausalLM

    from schemas import minicpm4

    assert minicpm4.prepare_load(ckpt, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32, attn_implementation=attn).eval()
    assert type(model) is minicpm4.MiniCPM4ForCausalLM
    outs = []
    with torch.no_grad():
        for toks in seqs:
            o = model(input_ids=torch.tensor([toks]), output_hidden_states=True, use_cache=False)
            lg = o.logits[0].float()
            outs.append((torch.log_softmax(lg, -1), [h[0].float() for h in o.hidden_states], lg))
    return outs


def compare(native_out, oracle, layers: list[int], L: int) -> dict:
    import torch

    lp, hs, native_logits = native_out
    plps = [None if d is None else {int(k): v for k, v in d.items()} for d in oracle["prompt_logprobs"]]
    d_lp, order_ok, n = 0.0, True, 0
    for t, ref in enumerate(plps):
        if ref is None:
            continue
        row = lp[t - 1]
        for tok, v in ref.items():
            d_lp = max(d_lp, abs(float(row[tok]) - v))
            n += 1
    res = {"logprob_max_abs": d_lp, "logprob_entries": n}
    if oracle.get("logits") is not None:  # raw logits of every prompt position (vLLM's compute_logits)
        ref = torch.tensor(oracle["logits"])
        ours = native_logits[: ref.shape[0]]
        res["logits_rows"] = int(ref.shape[0])
        res["logits_max_abs"] = (ours - ref).abs().max().item()
    # every hidden state up to L-1 (HF's entry L is after the final norm, vLLM's hook sees it
    # before); the captured ones ([2, L//2, L-3]) are marked
    for i in range(L):
        ref = torch.tensor(oracle["hidden"][str(i)])
        diff = (hs[i] - ref).abs().max().item()
        tag = f"hidden[{i}]" + ("*" if i in layers else "")
        res[f"{tag}_max_abs"] = diff
        res[f"{tag}_max_rel"] = diff / max(ref.abs().max().item(), 1e-12)
    # top-K order: vLLM's top-K ids (minus the prompt token when it is outside the top-K) vs ours
    for t, ref in enumerate(plps):
        if ref is None:
            continue
        k = min(len(ref), 5)
        ours = torch.topk(lp[t - 1], k).indices.tolist()
        theirs = [tok for tok, _ in sorted(ref.items(), key=lambda kv: -kv[1])][:k]
        order_ok &= ours[:k - 1] == theirs[:k - 1]
    res["top_order_equal"] = order_ok
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--original", type=int, default=64)
    ap.add_argument("--max-pos", type=int, default=256)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 160])
    ap.add_argument("--topk", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--force-max-model-len", type=int,
                    help="run vLLM with this max_model_len for every length (shows the oracle sees a wrong factor set)")
    ap.add_argument("--vllm-side", nargs=4, metavar=("CKPT", "MAX_MODEL_LEN", "TOKENS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="hidden 128, lengths 16 and 48 (the test suite)")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.hidden, args.heads, args.kv_heads = 4, 128, 2, 1  # head_dim 64 (vLLM CPU kernels)
        args.original, args.max_pos, args.lengths = 32, 128, [16, 48]
    if args.vllm_side:
        c, m, t, o = args.vllm_side
        return vllm_side(c, int(m), t, o, args.topk)

    py = oracle_python()
    if py is None:
        sys.exit("no oracle venv: run `make vllm` (creates .venv-vllm) or set EAGLE3_VLLM_PYTHON")
    import random

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout, not an installed copy
    tmp = Path(tempfile.mkdtemp(prefix="minicpm4-oracle-"))
    try:
        ckpt = tmp / "native"
        cfg = write_checkpoint(ckpt, args)
        oracle_ckpt = tmp / "oracle"
        oracle_ckpt.mkdir()
        for f in ckpt.iterdir():
            shutil.copy(f, oracle_ckpt / f.name)
        (oracle_ckpt / "configuration_minicpm.py").write_text(ORACLE_CONFIG_PY)
        ocfg = dict(cfg, auto_map={"AutoConfig": "configuration_minicpm.MiniCPMConfig"})
        (oracle_ckpt / "config.json").write_text(json.dumps(ocfg, indent=1))

        rnd = random.Random(args.seed)
        seqs = [[rnd.randrange(3, args.vocab) for _ in range(n)] for n in args.lengths]
        nat = native(ckpt, seqs, args.attn)
        L = args.layers
        layers = sorted({2, L // 2, L - 3})
        report = {"config": {k: cfg[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                  "num_key_value_heads", "vocab_size", "max_position_embeddings")},
                  "original_max_position_embeddings": args.original, "layers": layers, "attn": args.attn,
                  "lengths": {}}
        worst = 0.0
        for n, toks, out in zip(args.lengths, seqs, nat):
            mml = args.force_max_model_len or (args.original if n <= args.original else args.max_pos)
            (tmp / "tokens.json").write_text(json.dumps([toks]))
            env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH="")
            r = subprocess.run([py, __file__, "--topk", str(args.topk), "--vllm-side", str(oracle_ckpt), str(mml),
                                str(tmp / "tokens.json"), str(tmp / "oracle.json")], env=env, cwd=str(tmp),
                               capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"vLLM oracle failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
            oracle = json.loads((tmp / "oracle.json").read_text())[0]
            res = compare(out, oracle, layers, L)
            res["rope"] = "long" if n > args.original else "short"
            res["vllm_max_model_len"] = mml
            report["lengths"][str(n)] = res
            worst = max([worst, res["logprob_max_abs"], res.get("logits_max_abs", 0.0)]
                        + [v for k, v in res.items() if k.endswith("_max_rel")])
        print(json.dumps(report, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
        if worst > args.tol:
            sys.exit(f"max difference {worst:.3g} exceeds --tol {args.tol}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
