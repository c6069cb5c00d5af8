"""Draft trees in the EAGLE-2/3 style, their attention masks, and acceptance.

Greedy (temperature 0): from the root, take the `top_k` best children; at each of
the next `depth - 1` steps expand the `top_k` best frontier nodes (by cumulative
draft log-probability) by their `top_k` best children; finally keep the
`total_tokens` best of all generated nodes. A child's score is never above its
parent's, and a stable sort keeps a parent ahead of a child with an equal score, so
the kept nodes always form a tree. A chain of k tokens is top_k=1, depth=k.

Sampling (temperature > 0): each expanded node's children are drawn *without
replacement* from the draft distribution q (Gumbel-top-k, in draw order). The
node budget is applied by whole sibling groups in creation (breadth-first) order,
so whether a node's children are kept never depends on the values drawn for them:
that is what keeps recursive rejection sampling exact (see `sample_accept`).

Node i of a tree is row i+1 of the verification batch; row 0 is the root (the last
accepted token, already known).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class DraftTree:
    tokens: torch.Tensor             # [N] target token ids
    parents: torch.Tensor            # [N] parent node index, -1 = root
    depth: torch.Tensor              # [N] 1 = child of the root
    scores: torch.Tensor             # [N] cumulative draft log-prob
    anc: torch.Tensor                # [N, N] bool: anc[i, j] = j is i or an ancestor of i
    q: dict = field(default_factory=dict)  # sampling: node (-1 = root) -> draft probs over the target vocab

    @property
    def size(self) -> int:
        return int(self.tokens.numel())

    @property
    def is_chain(self) -> bool:
        n = self.size
        return bool((self.parents == torch.arange(-1, n - 1)).all())

    @staticmethod
    def from_parents(tokens, parents, scores=None) -> "DraftTree":
        """A tree from parent indices (each parent listed before its children)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        parents = torch.as_tensor(parents, dtype=torch.long)
        n = int(tokens.numel())
        anc = torch.eye(n, dtype=torch.bool)
        depth = torch.ones(n, dtype=torch.long)
        for i in range(n):
            p = int(parents[i])
            if p >= i:
                raise ValueError(f"node {i}: parent {p} must come before it")
            if p >= 0:
                anc[i] |= anc[p]
                depth[i] = depth[p] + 1
        sc = torch.zeros(n) if scores is None else torch.as_tensor(scores, dtype=torch.float32)
        return DraftTree(tokens, parents, depth, sc, anc)

    def children(self, node: int) -> list[int]:
        return (self.parents == node).nonzero().flatten().tolist()


def empty_tree() -> DraftTree:
    z = torch.zeros(0, dtype=torch.long)
    return DraftTree(z, z.clone(), z.clone(), torch.zeros(0), torch.zeros(0, 0, dtype=torch.bool))


def verify_mask(tree: DraftTree) -> torch.Tensor:
    """[N+1, N+1] bool over the verification rows (root first): ancestors and self."""
    n = tree.size
    m = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    m[:, 0] = True
    m[1:, 1:] = tree.anc
    return m


def verify_positions(tree: DraftTree, root_pos: int) -> torch.Tensor:
    return torch.cat((torch.tensor([root_pos]), root_pos + tree.depth))


class TreeBuild:
    """Grows the candidate tree; the drafter reads `tokens`, `parents`, `anc`, `depth`."""

    def __init__(self, cap: int):
        self.cap = cap
        self.tokens = torch.zeros(cap, dtype=torch.long)
        self.parents = torch.full((cap,), -1, dtype=torch.long)
        self.depth = torch.zeros(cap, dtype=torch.long)
        self.scores = torch.zeros(cap)
        self.anc = torch.zeros(cap, cap, dtype=torch.bool)
        self.n = 0

    def add(self, tokens, parents, scores, depth: int) -> torch.Tensor:
        k = int(tokens.numel())
        a, b = self.n, self.n + k
        self.tokens[a:b] = tokens
        self.parents[a:b] = parents
        self.scores[a:b] = scores
        self.depth[a:b] = depth
        has_parent = parents >= 0
        if bool(has_parent.any()):
            rows = torch.arange(a, b)[has_parent]
            self.anc[rows] = self.anc[parents[has_parent]]
        idx = torch.arange(a, b)
        self.anc[idx, idx] = True
        self.n = b
        return idx


def _gumbel_topk(logq: torch.Tensor, k: int, gen: Optional[torch.Generator]) -> torch.Tensor:
    """k draws without replacement from softmax(logq), in draw order (rows independent)."""
    u = torch.rand(logq.shape, generator=gen).clamp_(1e-20, 1.0)
    keys = logq - torch.log(-torch.log(u))
    return keys.topk(k, dim=-1).indices


def build_tree(drafter, *, top_k: int, depth: int, total_tokens: int, temperature: float = 0.0,
               gen: Optional[torch.Generator] = None) -> DraftTree:
    """Draft a tree from the drafter's current root (see the module docstring)."""
    if not drafter.ready or depth < 1 or total_tokens < 1:
        return empty_tree()
    sampling = temperature > 0
    k = min(top_k, drafter.vocab_size)
    cap = k + (depth - 1) * k * k
    b = TreeBuild(cap)
    drafter.begin_tree(b)
    qs: dict[int, torch.Tensor] = {}

    logits = drafter.root_logits().float()  # [Vd]
    if sampling:
        logq = torch.log_softmax(logits / temperature, dim=-1)
        ids = _gumbel_topk(logq, k, gen)
        qs[-1] = drafter.probs_to_target(logq.exp())
    else:
        logq = torch.log_softmax(logits, dim=-1)
        ids = logq.topk(k).indices
    frontier = b.add(drafter.to_target(ids), torch.full((k,), -1, dtype=torch.long), logq[ids], 1)
    groups = [frontier]  # sibling groups in creation order (for the sampling budget)

    for d in range(2, depth + 1):
        # Sampling: whole groups only, in creation order; stop once the budget is used.
        if sampling and b.n + frontier.numel() * k > total_tokens:
            break
        logits = drafter.expand(b, frontier).float()  # [F, Vd]
        if sampling:
            logq = torch.log_softmax(logits / temperature, dim=-1)
            ids = _gumbel_topk(logq, k, gen)                         # [F, k] in draw order
            for r, node in enumerate(frontier.tolist()):
                qs[node] = drafter.probs_to_target(logq[r].exp())
        else:
            logq = torch.log_softmax(logits, dim=-1)
            ids = logq.topk(k, dim=-1).indices                       # [F, k]
        child_scores = b.scores[frontier][:, None] + logq.gather(1, ids)
        parents = frontier[:, None].expand(-1, k).reshape(-1)
        new = b.add(drafter.to_target(ids.reshape(-1)), parents, child_scores.reshape(-1), d)
        for r in range(frontier.numel()):
            groups.append(new[r * k:(r + 1) * k])
        # EAGLE-2: the next frontier is the top_k children by cumulative score.
        frontier = new[child_scores.reshape(-1).topk(min(k, new.numel())).indices]
        # keep creation order inside the frontier so groups stay in a fixed order
        frontier = frontier.sort().values
    drafter.end_tree()

    n = b.n
    if sampling:
        keep = torch.cat(groups)[: (total_tokens // k) * k] if n > total_tokens else torch.arange(n)
        if keep.numel() == 0:  # budget below one group: keep a prefix of the root's draws
            keep = torch.arange(min(total_tokens, n))
        keep = keep.sort().values
    elif n > total_tokens:
        order = torch.sort(b.scores[:n], descending=True, stable=True).indices[:total_tokens]
        keep = order.sort().values
    else:
        keep = torch.arange(n)
    return _subtree(b, keep, qs)


def _subtree(b: TreeBuild, keep: torch.Tensor, qs: dict) -> DraftTree:
    remap = torch.full((b.n + 1,), -1, dtype=torch.long)  # last slot maps parent -1 -> -1
    remap[keep] = torch.arange(keep.numel())
    par = b.parents[keep]
    new_par = torch.where(par >= 0, remap[par.clamp(min=0)], torch.full_like(par, -1))
    if bool(((par >= 0) & (new_par < 0)).any()):
        raise AssertionError("tree selection dropped a parent of a kept node")
    anc = b.anc[keep][:, keep]
    q = {}
    if qs:
        q = {(-1 if old == -1 else int(remap[old])): v for old, v in qs.items() if old == -1 or remap[old] >= 0}
    return DraftTree(b.tokens[keep], new_par, b.depth[keep], b.scores[keep], anc, q)


# ----------------------------------------------------------------------------- acceptance


def greedy_accept(tree: DraftTree, target_next: torch.Tensor) -> tuple[list[int], int]:
    """Longest path whose tokens equal the target's greedy choice at their parent.

    target_next [N+1]: argmax of the target at the root row and at each node row.
    Returns (accepted node indices root-to-leaf, bonus token).
    """
    n = tree.size
    if n == 0:
        return [], int(target_next[0])
    correct = tree.tokens == target_next[tree.parents + 1]
    ok = ~(tree.anc & ~correct[None, :]).any(dim=1)
    if not bool(ok.any()):
        return [], int(target_next[0])
    depth = torch.where(ok, tree.depth, torch.zeros_like(tree.depth))
    best = int(depth.argmax())
    path = tree.anc[best].nonzero().flatten()
    path = path[tree.depth[path].argsort()].tolist()
    return path, int(target_next[best + 1])


def target_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The distribution the target samples from (temperature, then nucleus filtering)."""
    p = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = p.sort(dim=-1, descending=True)
        drop = (sp.cumsum(-1) - sp) >= top_p  # keep the smallest prefix reaching top_p
        sp = sp.masked_fill(drop, 0.0)
        p = torch.zeros_like(p).scatter_(-1, si, sp)
        p = p / p.sum(-1, keepdim=True)
    return p


def _sample(p: torch.Tensor, gen: Optional[torch.Generator]) -> int:
    return int(torch.multinomial(p, 1, generator=gen))


def sample_accept(tree: DraftTree, p_rows: torch.Tensor, gen: Optional[torch.Generator]) -> tuple[list[int], int]:
    """Recursive rejection sampling over siblings (drawn without replacement).

    At a node with target distribution p and draft distribution q, children c_1..c_m
    (drawn from q without replacement, in draw order): accept c_i with probability
    min(1, p(c_i)/q(c_i)); on rejection p <- norm(max(0, p - q)) and q <- q without
    c_i, renormalised. If every child is rejected the bonus token is drawn from the
    residual p. The output token is then distributed exactly as p (for m = 1 this
    is the standard speculative sampling rule), whatever m is, as long as m does not
    depend on the children's values (tree.py's budget guarantees that).
    p_rows [N+1, V]: target distributions at the root row and each node row.
    """
    path: list[int] = []
    cur = -1
    p = p_rows[0].clone()
    while True:
        kids = tree.children(cur)
        q = tree.q.get(cur)
        accepted = None
        if kids and q is not None:
            q = q.clone()
            for c in kids:
                x = int(tree.tokens[c])
                px, qx = float(p[x]), float(q[x])
                r = float(torch.rand((), generator=gen))
                if qx > 0 and r * qx < px:  # r < p/q without dividing
                    accepted = c
                    break
                p = (p - q).clamp_(min=0.0)
                s = float(p.sum())
                if s <= 0:  # p == q: rejection had probability 0; keep p as it was
                    p = q.clone()
                else:
                    p /= s
                q[x] = 0.0
                qs = float(q.sum())
                if qs <= 0:
                    break
                q /= qs
        if accepted is None:
            return path, _sample(p, gen)
        path.append(accepted)
        cur = accepted
        p = p_rows[accepted + 1].clone()
