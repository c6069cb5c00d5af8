"""Capture only the configured hidden states of the target, with forward hooks.

`output_hidden_states=True` makes the model keep all L+1 hidden states of a batch
([L+1, B, T, H]: ~8.8 GB at 32k tokens for an 8B model) when three are needed.
`LayerCapture` hooks the decoder instead and keeps exactly the configured ids.

Layer ids follow HF's `output_hidden_states` tuple (DESIGN.md section 3):
* id i < L is the input of decoder layer i (id 0: the embedding output, after any
  scaling the model applies, such as MiniCPM's scale_emb), i.e. the output of layer i-1;
* id L is the decoder's `last_hidden_state`, which HF puts last in the tuple: the
  final norm's output for Llama-like models (transformers 5 ties hidden_states[-1]
  to it; older code appended the normed state), not the raw output of layer L-1.

The extractor checks the hooks against `output_hidden_states` on a short probe
before the first batch and falls back to the full tuple if they ever disagree.
"""
from __future__ import annotations

from typing import Optional


class CaptureError(RuntimeError):
    pass


def decoder_parts(model):
    """(decoder module, its list of decoder layers) or (None, None) when not found."""
    from torch import nn

    L = int(getattr(model.config, "num_hidden_layers", -1))
    base = getattr(model, "base_model", None)
    candidates = [base] if base is not None and base is not model else []
    candidates += [m for name, m in model.named_children() if m is not base]
    for dec in candidates:
        layers = getattr(dec, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) == L:
            return dec, layers
    return None, None


def _first_tensor(args, kwargs, key: str):
    if args:
        return args[0]
    return kwargs.get(key)


def _last_hidden(out):
    h = getattr(out, "last_hidden_state", None)
    if h is None and isinstance(out, (tuple, list)) and out:
        h = out[0]
    return h


class LayerCapture:
    """Context manager: while active, every forward of the model stores hidden states `ids`.

    `captured[i]` is the tensor of id i from the latest forward ([B, T, H], the model's
    own tensor, not a copy).
    """

    def __init__(self, model, ids: list[int]):
        self.dec, self.blocks = decoder_parts(model)
        if self.dec is None:
            raise CaptureError(f"{type(model).__name__}: no decoder with a `layers` list of "
                               f"num_hidden_layers modules; cannot hook individual layers")
        self.L = len(self.blocks)
        bad = [i for i in ids if not 0 <= int(i) <= self.L]
        if bad:
            raise CaptureError(f"layer ids {bad} outside 0..{self.L}")
        self.ids = sorted({int(i) for i in ids})
        self.captured: dict[int, object] = {}
        self._handles: list = []

    def __enter__(self) -> "LayerCapture":
        self.captured = {}
        for i in self.ids:
            if i < self.L:
                self._handles.append(self.blocks[i].register_forward_pre_hook(self._pre(i), with_kwargs=True))
            else:
                self._handles.append(self.dec.register_forward_hook(self._post(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre(self, i: int):
        def hook(module, args, kwargs):
            self.captured[i] = _first_tensor(args, kwargs, "hidden_states")
        return hook

    def _post(self, i: int):
        def hook(module, args, output):
            self.captured[i] = _last_hidden(output)
        return hook

    def get(self, i: int):
        t = self.captured.get(int(i))
        if t is None:
            raise CaptureError(f"hidden state {i} was not captured (the hook never ran)")
        return t


def compare_with_hidden_states(cap: LayerCapture, hidden_states) -> Optional[str]:
    """None when every captured id equals HF's tuple entry bit for bit, else what differs."""
    import torch

    if hidden_states is None:
        return "the model returned no hidden_states"
    for i in cap.ids:
        if i >= len(hidden_states):
            return f"the model returned only {len(hidden_states)} hidden states (id {i} asked for)"
        a, b = cap.captured.get(i), hidden_states[i]
        if a is None or a.shape != b.shape or not torch.equal(a, b.to(a.device)):
            return f"hidden state {i}: the hooked tensor differs from output_hidden_states[{i}]"
    return None
