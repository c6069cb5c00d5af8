"""SpecForge's EAGLE-3 TTT training step, for bench/bench_train_step.py (runs INSIDE a SpecForge venv).

    python specforge_step_worker.py REQUEST.json RESULT.json

Imports torch, transformers and SpecForge only, never this project. SpecForge (PyPI `specforge`
0.2.0) is used as a measuring stick: its draft model `LlamaForCausalLMEagle3` (attention backend
"sdpa", the one that runs without CUDA) unrolled the way its `OnlineEagle3Model.forward` does
(fc projection, then per TTT step: embed, `backbone` with its `cache_hidden` key/value lists and
its additive causal mask, `compute_logits`), then backward and AdamW. Its own loss,
`LogSoftmaxLoss`, is a Triton GPU kernel (specforge/core/loss.py imports triton, which has no CPU
backend): the step uses the same soft cross-entropy in plain torch instead, against the per-step
teacher views the orchestrator computed with our stage2_train.teacher.step_view, so both
implementations see the same inputs and targets at every step, and the same initial weights.

Request: {"batch": PATH (torch.save: hidden, ids [S][B,T], idx [S][B,T,K], prob [S], mask [S]),
          "weights": PATH (state dict, EAGLE-3 layout + embed_tokens), "config": {LlamaConfig fields},
          "ttt", "steps", "decay", "dtype": float32|bfloat16, "threads", "compile": bool}
Result: {"specforge_version", "tokens", "seconds": [per timed step], "losses": [per step, first = the
         given weights], "saved_mib", "peak_rss_delta_mib" (VmHWM over the RSS before the timed steps), "compile"}
"""
import contextlib
import json
import os
import sys
import time
from pathlib import Path


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def saved_bytes_hooks(params):
    """saved_tensors_hooks that sum the distinct storages autograd keeps for backward (no params)."""
    import torch

    seen, total = set(), [0]

    def pack(t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in params and key not in seen:
            seen.add(key)
            total[0] += st.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), total


def ttt_loss(model, batch, ttt, decay):
    """SpecForge's unroll (OnlineEagle3Model.forward, sdpa backend) with a plain-torch soft CE."""
    import torch
    import torch.nn.functional as F

    hidden = model.project_hidden_states(batch["hidden"].to(model.fc.weight.dtype))
    B, T, _ = hidden.shape
    pos = torch.arange(T, device=hidden.device).unsqueeze(0).expand(B, T)
    mask = model.prepare_decoder_attention_mask(
        attention_mask=torch.ones(B, T, dtype=torch.bool, device=hidden.device), hidden_states=hidden,
        batch_size=B, seq_length=T, past_key_values_length=0)
    cache_hidden = [[], []]
    total = hidden.new_zeros((), dtype=torch.float32)
    losses = []
    for k in range(ttt):
        emb = model.embed_input_ids(batch["ids"][k]).to(hidden.dtype)
        hidden = model.backbone(input_embeds=emb, hidden_states=hidden, cache_hidden=cache_hidden,
                                attention_mask=mask, position_ids=pos, past_key_values=None, use_cache=True)
        logp = F.log_softmax(model.compute_logits(hidden).float(), dim=-1)
        ce = -(batch["prob"][k] * logp.gather(-1, batch["idx"][k])).sum(-1)
        lm = batch["mask"][k].to(ce.dtype)
        loss_k = (ce * lm).sum() / lm.sum().clamp_min(1.0)
        total = total + decay ** k * loss_k
        losses.append(loss_k.detach())
    return total


def main(req_path, res_path):
    req = json.loads(Path(req_path).read_text())
    if not req.get("compile", True):
        os.environ["TORCH_COMPILE_DISABLE"] = "1"
    import torch
    from importlib.metadata import version
    from transformers import LlamaConfig

    from specforge.modeling.draft.llama3_eagle import LlamaForCausalLMEagle3

    torch.set_num_threads(int(req["threads"]))
    cfg = LlamaConfig(**req["config"])
    model = LlamaForCausalLMEagle3(cfg, attention_backend="sdpa")
    missing, unexpected = model.load_state_dict(torch.load(req["weights"]), strict=False)
    if missing or unexpected:
        raise SystemExit(f"weights do not fit SpecForge's draft model: missing {missing}, unexpected {unexpected}")
    model.embed_tokens.weight.requires_grad_(False)
    batch = torch.load(req["batch"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    amp = torch.bfloat16 if req["dtype"] == "bfloat16" else None
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}

    def step(measure=False):
        hooks, total = saved_bytes_hooks(params)
        with hooks if measure else contextlib.nullcontext():
            with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                loss = ttt_loss(model, batch, int(req["ttt"]), float(req["decay"]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss), total[0]

    loss0, saved = step(measure=True)       # warm-up (compile, allocator), and the memory kept for backward
    seconds, losses = [], [loss0]
    rss0 = rss_mib()
    with open("/proc/self/clear_refs", "w") as f:   # VmHWM := RSS now (ru_maxrss survives fork + exec)
        f.write("5")
    for _ in range(int(req["steps"])):
        t = time.perf_counter()
        losses.append(step()[0])
        seconds.append(time.perf_counter() - t)
    peak = peak_rss_mib()
    tokens = int(batch["hidden"].shape[0] * batch["hidden"].shape[1])
    out = {"specforge_version": version("specforge"), "tokens": tokens, "seconds": seconds, "losses": losses,
           "saved_mib": saved / 2**20, "peak_rss_delta_mib": peak - rss0, "compile": req.get("compile", True)}
    tmp = Path(res_path + ".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(res_path)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python specforge_step_worker.py REQUEST.json RESULT.json")
    main(sys.argv[1], sys.argv[2])
