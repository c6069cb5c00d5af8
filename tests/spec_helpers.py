"""Helpers for the stage-3 tests: tiny heads, a briefly fitted head, oracle drafters."""
from __future__ import annotations

import torch

from schemas.head import make_head_config
from stage2_train.model import Eagle3Draft


def tiny_layer_ids(model) -> list[int]:
    L = model.config.num_hidden_layers
    return [2, L // 2, L - 3]


def make_head(model, seed: int = 0) -> Eagle3Draft:
    """An untrained head over the full target vocab (identity d2t)."""
    V = model.config.vocab_size
    cfg = make_head_config(model.config.to_dict(), draft_vocab_size=V, layer_ids=tiny_layer_ids(model))
    torch.manual_seed(seed)
    head = Eagle3Draft(cfg, embed_weight=model.get_input_embeddings().weight.detach())
    head.set_vocab_map(torch.zeros(V, dtype=torch.long), torch.ones(V, dtype=torch.bool))
    return head.eval()


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """prompt + n greedy tokens, by full recomputation (no cache: an independent reference)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def fit_head(model, sequences: list[list[int]], steps: int = 150, seed: int = 0) -> Eagle3Draft:
    """Fit step 0 and one TTT step of a head to the target's greedy choices on `sequences`."""
    head = make_head(model, seed)
    layer_ids = tiny_layer_ids(model)
    data = []
    with torch.no_grad():
        for seq in sequences:
            out = model(input_ids=torch.tensor([seq]), output_hidden_states=True)
            aux = torch.cat([out.hidden_states[i][0] for i in layer_ids], -1)
            data.append((torch.tensor(seq), aux, out.logits[0].argmax(-1)))
    params = [p for n, p in head.named_parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    head.train()
    for it in range(steps):
        ids, aux, nxt = data[it % len(data)]
        T = ids.numel() - 2
        pos = torch.arange(T)[None]
        fused = head.fuse(aux[:T])[None]
        cache: list = []
        h0 = head.ttt_step(fused, ids[1:T + 1][None], pos, cache)
        loss = torch.nn.functional.cross_entropy(head.logits(h0)[0], nxt[1:T + 1])
        # one TTT step: own hidden + the next token, teacher one further ahead
        h1 = head.ttt_step(h0, ids[2:T + 2][None], pos, cache)
        loss = loss + 0.8 * torch.nn.functional.cross_entropy(head.logits(h1)[0], nxt[2:T + 2])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


class OracleDrafter:
    """Drafter interface; proposes the reference continuation (or, when wrong=True, never it)."""

    def __init__(self, ref: list[int], vocab: int, wrong: bool = False, seed: int = 0):
        self.ref, self.V, self.wrong = ref, vocab, wrong
        g = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(vocab, generator=g)  # distinct non-oracle children
        self.vocab_size = vocab
        self.target_vocab = vocab
        self.reset()

    def reset(self):
        self.last_pos = -1
        self.ready_flag = False

    @property
    def ready(self):
        return self.ready_flag

    def commit(self, aux, next_ids, positions):
        pos = positions.tolist()
        assert next_ids.tolist() == self.ref[pos[0] + 1: pos[-1] + 2], "committed tokens differ from the reference"
        self.last_pos = pos[-1]
        self.ready_flag = True

    def _logits(self, depth_done: int, path_ok: bool) -> torch.Tensor:
        lg = self.noise.clone()
        i = self.last_pos + 2 + depth_done  # index in ref of the token to predict
        if path_ok and i < len(self.ref):
            lg[self.ref[i]] = -1e9 if self.wrong else 20.0
        return lg

    def root_logits(self):
        return self._logits(0, True)

    def to_target(self, ids):
        return ids.clone()

    def probs_to_target(self, q):
        return q.clone()

    def begin_tree(self, build):
        pass

    def end_tree(self):
        pass

    def expand(self, build, frontier):
        rows = []
        for f in frontier.tolist():
            path = build.anc[f, : build.n].nonzero().flatten()
            path = path[build.depth[path].argsort()]
            toks = build.tokens[path].tolist()
            start = self.last_pos + 2
            rows.append(self._logits(len(toks), toks == self.ref[start:start + len(toks)]))
        return torch.stack(rows)
