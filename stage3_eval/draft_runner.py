"""The draft side: an EAGLE-3 head with its own KV cache over accepted tokens.

Step 0 at index t reads the fused target features f_t and the embedding of
x_{t+1} (DESIGN.md section 3). `commit` appends those step-0 entries for every
newly accepted index (features from the target's verification pass), so the
persistent cache only ever holds step-0 keys of accepted tokens, as in training.
Tree drafting (`expand`) keeps its keys in a scratch cache dropped after the cycle.

Positions (DESIGN.md section 3, schemas.head.POSITION_RULE): a drafted node at depth
d is rotated at position t + d, t the last committed index, exactly as TTT step d of
training and as SGLang/vLLM serve the head. There is no other mode; `load_draft`
refuses heads whose config does not record that rule.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from schemas.head import HeadError, check_servable, hf_layer_ids, load_head
from stage2_train.model import Eagle3Draft


class DraftRunError(RuntimeError):
    pass


def load_draft(head_dir: str | Path, target_model, *, device=None, dtype=None) -> Eagle3Draft:
    """The head in `head_dir`, with the target's embedding, checked against the target."""
    config, tensors = load_head(head_dir)
    tcfg = target_model.config
    for key, want in (("vocab_size", tcfg.vocab_size), ("target_hidden_size", tcfg.hidden_size)):
        got = config.get(key, config.get("hidden_size") if key == "target_hidden_size" else None)
        if got is not None and int(got) != int(want):
            raise HeadError(f"{Path(head_dir) / 'config.json'}: {key} {got} does not match the target's {want}")
    layer_ids = check_servable(config, str(Path(head_dir) / "config.json"))  # rule + HF ids, either flavour
    L = int(tcfg.num_hidden_layers)
    if any(not 0 <= int(i) <= L for i in layer_ids):
        raise HeadError(f"{Path(head_dir) / 'config.json'}: layer ids {layer_ids} outside 0..{L} "
                        f"(the target has {L} layers)")
    emb = target_model.get_input_embeddings().weight.detach()
    model = Eagle3Draft(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not m.startswith(("embed_tokens.", "rotary."))]
    if missing or unexpected:
        raise HeadError(f"{head_dir}: weights do not fit the head config (missing {missing}, unexpected {unexpected})")
    dev = device if device is not None else emb.device
    # Drop the freshly initialised [V, h] matrix before converting, then share the target's.
    model.embed_tokens.weight = torch.nn.Parameter(torch.empty(0, device=torch.device("cpu")), requires_grad=False)
    # The head computes in the target's dtype (bf16 where that is the fast one); RoPE stays fp32.
    rotary = model.rotary_buffers()
    model.to(device=dev, dtype=dtype or emb.dtype).eval()
    model.restore_rotary_buffers(rotary)
    share_target_embedding(model, emb, dev)
    return model


def share_target_embedding(model: Eagle3Draft, emb: torch.Tensor, device) -> None:
    """Point the head's frozen embedding at the target's matrix, in the target's dtype.

    A [V, h] matrix is ~1 GB at 8B scale in fp32: the head reads the target's own
    tensor (no copy when it sits on the head's device) and casts the looked-up rows to
    the head's dtype (Eagle3Draft.embed), which gives the values an fp32 copy would.
    The parameter is a new object over the same storage, so a later `model.to(...)`
    replaces the head's reference and never converts the target's weight.
    """
    model.embed_tokens.weight = torch.nn.Parameter(emb.detach().to(device), requires_grad=False)


def head_layer_ids(model: Eagle3Draft) -> list[int]:
    """HF hidden_states indices the target must capture (our heads and exported ones)."""
    return hf_layer_ids(model.config)


class DraftRunner:
    """Implements the drafter interface used by tree.build_tree and spec_decode."""

    def __init__(self, model: Eagle3Draft):
        self.model = model
        self.vocab_size = int(model.lm_head.weight.shape[0])
        self.target_vocab = int(model.t2d.numel())
        self.device = model.fc.weight.device
        self.target_ids = model.draft_to_target(torch.arange(self.vocab_size, device=self.device))
        self.reset()

    # -- persistent cache of accepted tokens ----------------------------------------
    def reset(self) -> None:
        self.past: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.root_hidden: Optional[torch.Tensor] = None  # [h]: output of step 0 at the last index
        self.last_pos = -1

    @property
    def ready(self) -> bool:
        return self.root_hidden is not None

    @property
    def cache_len(self) -> int:
        return 0 if self.past is None else int(self.past[0].shape[2])

    @torch.no_grad()
    def commit(self, aux: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor) -> None:
        """Step 0 over newly accepted indices: aux [T, 3H], next_ids [T] (x_{t+1}), positions [T]."""
        m = self.model
        fused = m.fuse(aux.to(self.device))[None]
        out, self.past = m.step(fused, next_ids.to(self.device)[None], positions.to(self.device)[None], past=self.past)
        self.root_hidden = out[0, -1]
        self.last_pos = int(positions[-1])

    @torch.no_grad()
    def root_logits(self) -> torch.Tensor:
        return self.model.logits(self.root_hidden)

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Target-vocab ids, on the drafter's device (where the tree is built)."""
        return self.target_ids[draft_ids.to(self.device)]

    def probs_to_target(self, q: torch.Tensor) -> torch.Tensor:
        """Draft-vocab probabilities [..., Vd] -> target vocab [..., V] (zeros outside the draft vocab)."""
        out = torch.zeros(*q.shape[:-1], self.target_vocab, dtype=torch.float32, device=self.device)
        out[..., self.target_ids] = q.float().to(self.device)
        return out

    # -- tree drafting ---------------------------------------------------------------
    def begin_tree(self, build) -> None:
        h = self.root_hidden.shape[-1]
        self._hid = torch.empty(build.cap + 1, h, dtype=self.root_hidden.dtype, device=self.device)
        self._hid[0] = self.root_hidden  # row 0: root, row i+1: node i's output
        self._tk: list[torch.Tensor] = []
        self._tv: list[torch.Tensor] = []
        self._slots: list[torch.Tensor] = []

    def end_tree(self) -> None:
        self._hid = None
        self._tk, self._tv, self._slots = [], [], []

    @torch.no_grad()
    def expand(self, build, frontier: torch.Tensor) -> torch.Tensor:
        """Run the layer on the frontier nodes; returns their draft-vocab logits [F, Vd]."""
        m = self.model
        F_ = int(frontier.numel())
        hidden_in = self._hid[build.parents[frontier] + 1][None]        # parents' outputs
        ids = build.tokens[frontier].to(self.device)[None]
        pos = (self.last_pos + build.depth[frontier]).to(self.device)[None]  # depth d at t + d
        S = self.cache_len
        # The mask is built where the tree lives (the drafter's device): no host round trip per level.
        slots = torch.cat(self._slots) if self._slots else frontier.new_zeros(0)
        anc = build.anc[frontier]
        mask = torch.cat((torch.ones(F_, S, dtype=torch.bool, device=anc.device), anc[:, slots], anc[:, frontier]),
                         dim=1)
        past = self.past
        if self._tk:
            past = (torch.cat((self.past[0], *self._tk), dim=2), torch.cat((self.past[1], *self._tv), dim=2))
        out, (k, v) = m.step(hidden_in, ids, pos, past=past, attn_mask=mask[None, None])
        self._tk.append(k[:, :, -F_:])
        self._tv.append(v[:, :, -F_:])
        self._slots.append(frontier.clone())
        self._hid[frontier + 1] = out[0]
        return m.logits(out[0])
