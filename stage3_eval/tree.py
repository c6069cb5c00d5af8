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

Devices: a tree lives on the device of the drafter's logits, and growing it never
reads a value back to the host (no .item()/int()/bool() per level), so a CUDA
drafter queues all levels without waiting. Acceptance reads the result once per
cycle. Random draws come from the caller's generator on the generator's own
device (`rand_on`), so a CPU generator works with CUDA logits and vice versa.
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
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def is_chain(self) -> bool:
        n = self.size
        return bool((self.parents == torch.arange(-1, n - 1, device=self.device)).all())

    @staticmethod
    def from_parents(tokens, parents, scores=None, device=None) -> "DraftTree":
        """A tree from parent indices (each parent listed before its children); built on the host."""
        cpu = torch.device("cpu")
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=cpu)
        parents = torch.as_tensor(parents, dtype=torch.long, device=cpu)
        n = int(tokens.numel())
        anc = torch.eye(n, dtype=torch.bool, device=cpu)
        depth = torch.ones(n, dtype=torch.long, device=cpu)
        for i in range(n):
            p = int(parents[i])
            if p >= i:
                raise ValueError(f"node {i}: parent {p} must come before it")
            if p >= 0:
                anc[i] |= anc[p]
                depth[i] = depth[p] + 1
        sc = torch.zeros(n, device=cpu) if scores is None else torch.as_tensor(scores, dtype=torch.float32, device=cpu)
        dev = cpu if device is None else device
        return DraftTree(tokens.to(dev), parents.to(dev), depth.to(dev), sc.to(dev), anc.to(dev))

    def children(self, node: int) -> list[int]:
        return (self.parents == node).nonzero().flatten().tolist()


def empty_tree(device=None) -> DraftTree:
    device = torch.device("cpu") if device is None else device
    z = torch.zeros(0, dtype=torch.long, device=device)
    return DraftTree(z, z.clone(), z.clone(), torch.zeros(0, device=device),
                     torch.zeros(0, 0, dtype=torch.bool, device=device))


def verify_mask(tree: DraftTree) -> torch.Tensor:
    """[N+1, N+1] bool over the verification rows (root first): ancestors and self."""
    n = tree.size
    m = torch.zeros(n + 1, n + 1, dtype=torch.bool, device=tree.device)
    m[:, 0] = True
    m[1:, 1:] = tree.anc
    return m


def verify_positions(tree: DraftTree, root_pos: int) -> torch.Tensor:
    """[N+1] positions of the verification rows: the root at root_pos, a node at depth d at root_pos + d."""
    root = torch.zeros(1, dtype=torch.long, device=tree.device)
    return root_pos + torch.cat((root, tree.depth))


class TreeBuild:
    """Grows the candidate tree; the drafter reads `tokens`, `parents`, `anc`, `depth`."""

    def __init__(self, cap: int, device=None):
        self.cap = cap
        self.device = torch.device("cpu") if device is None else torch.device(device)
        dev = self.device
        self.tokens = torch.zeros(cap, dtype=torch.long, device=dev)
        self.parents = torch.full((cap,), -1, dtype=torch.long, device=dev)
        self.depth = torch.zeros(cap, dtype=torch.long, device=dev)
        self.scores = torch.zeros(cap, device=dev)
        self.anc = torch.zeros(cap, cap, dtype=torch.bool, device=dev)
        self.n = 0

    def add(self, tokens, parents, scores, depth: int) -> torch.Tensor:
        """Append k nodes, all at `depth` (1 = children of the root, whose parents are -1)."""
        k = int(tokens.numel())  # a shape, not a value: no device sync
        a, b = self.n, self.n + k
        self.tokens[a:b] = tokens
        self.parents[a:b] = parents
        self.scores[a:b] = scores
        self.depth[a:b] = depth
        if depth > 1:  # every node below depth 1 has a real parent: known without looking
            self.anc[a:b] = self.anc[parents]
        idx = torch.arange(a, b, device=self.device)
        self.anc[idx, idx] = True
        self.n = b
        return idx


def rand_on(shape, gen: Optional[torch.Generator], device) -> torch.Tensor:
    """Uniform [0, 1) draws on `device` from `gen`, which may live on another device.

    Drawn where the generator lives (a generator only serves its own device) and then
    moved, so the same CPU seed gives the same draws whatever device computes."""
    if gen is None:
        return torch.rand(shape, device=device)
    u = torch.rand(shape, generator=gen, device=gen.device)
    return u.to(device)


def _gumbel_topk(logq: torch.Tensor, k: int, gen: Optional[torch.Generator]) -> torch.Tensor:
    """k draws without replacement from softmax(logq), in draw order (rows independent)."""
    u = rand_on(logq.shape, gen, logq.device).clamp_(1e-20, 1.0)
    keys = logq - torch.log(-torch.log(u))
    return keys.topk(k, dim=-1).indices


def build_tree(drafter, *, top_k: int, depth: int, total_tokens: int, temperature: float = 0.0,
               gen: Optional[torch.Generator] = None) -> DraftTree:
    """Draft a tree from the drafter's current root (see the module docstring)."""
    if not drafter.ready or depth < 1 or total_tokens < 1:
        return empty_tree(getattr(drafter, "device", None))
    sampling = temperature > 0
    k = min(top_k, drafter.vocab_size)
    cap = k + (depth - 1) * k * k
    logits = drafter.root_logits().float()  # [Vd]
    dev = logits.device
    b = TreeBuild(cap, dev)
    drafter.begin_tree(b)
    qs: list[tuple[Optional[torch.Tensor], torch.Tensor]] = []  # sampling: (nodes or None = root, q rows)

    if sampling:
        logq = torch.log_softmax(logits / temperature, dim=-1)
        ids = _gumbel_topk(logq, k, gen)
        qs.append((None, drafter.probs_to_target(logq.exp())))
    else:
        logq = torch.log_softmax(logits, dim=-1)
        ids = logq.topk(k).indices
    frontier = b.add(drafter.to_target(ids), torch.full((k,), -1, dtype=torch.long, device=dev), logq[ids], 1)
    groups = [frontier]  # sibling groups in creation order (for the sampling budget)

    for d in range(2, depth + 1):
        # Sampling: whole groups only, in creation order; stop once the budget is used.
        if sampling and b.n + frontier.numel() * k > total_tokens:
            break
        logits = drafter.expand(b, frontier).float()  # [F, Vd]
        if sampling:
            logq = torch.log_softmax(logits / temperature, dim=-1)
            ids = _gumbel_topk(logq, k, gen)                         # [F, k] in draw order
            qs.append((frontier, drafter.probs_to_target(logq.exp())))
        else:
            logq = torch.log_softmax(logits, dim=-1)
            ids = logq.topk(k, dim=-1).indices                       # [F, k]
        child_scores = b.scores[frontier][:, None] + logq.gather(1, ids)
        parents = frontier[:, None].expand(-1, k).reshape(-1)
        new = b.add(drafter.to_target(ids.reshape(-1)), parents, child_scores.reshape(-1), d)
        groups.extend(new.view(-1, k).unbind(0))
        # EAGLE-2: the next frontier is the top_k children by cumulative score.
        frontier = new[child_scores.reshape(-1).topk(min(k, new.numel())).indices]
        # keep creation order inside the frontier so groups stay in a fixed order
        frontier = frontier.sort().values
    drafter.end_tree()

    n = b.n
    if sampling:
        keep = torch.cat(groups)[: (total_tokens // k) * k] if n > total_tokens else torch.arange(n, device=dev)
        if keep.numel() == 0:  # budget below one group: keep a prefix of the root's draws
            keep = torch.arange(min(total_tokens, n), device=dev)
        keep = keep.sort().values
    elif n > total_tokens:
        order = torch.sort(b.scores[:n], descending=True, stable=True).indices[:total_tokens]
        keep = order.sort().values
    else:
        keep = torch.arange(n, device=dev)
    return _subtree(b, keep, qs)


def _subtree(b: TreeBuild, keep: torch.Tensor, qs: list) -> DraftTree:
    dev = b.device
    remap = torch.full((b.n + 1,), -1, dtype=torch.long, device=dev)  # last slot maps parent -1 -> -1
    remap[keep] = torch.arange(keep.numel(), device=dev)
    par = b.parents[keep]
    new_par = torch.where(par >= 0, remap[par.clamp(min=0)], torch.full_like(par, -1))
    anc = b.anc[keep][:, keep]
    q = {}
    if qs:  # sampling only: one read-back per tree to key the draft distributions by kept node
        for nodes, rows in qs:
            if nodes is None:
                q[-1] = rows
                continue
            for r, new_id in enumerate(remap[nodes].tolist()):
                if new_id >= 0:
                    q[new_id] = rows[r]
    return DraftTree(b.tokens[keep], new_par, b.depth[keep], b.scores[keep], anc, q)


# ----------------------------------------------------------------------------- acceptance


def greedy_accept(tree: DraftTree, target_next: torch.Tensor) -> tuple[list[int], int]:
    """Longest path whose tokens equal the target's greedy choice at their parent.

    target_next [N+1]: argmax of the target at the root row and at each node row (any
    device). Returns (accepted node indices root-to-leaf, bonus token); the answer is
    read back from the device once.
    """
    n = tree.size
    target_next = target_next.to(tree.device)
    if n == 0:
        return [], int(target_next[0])
    correct = tree.tokens == target_next[tree.parents + 1]
    ok = ~(tree.anc & ~correct[None, :]).any(dim=1)
    depth = torch.where(ok, tree.depth, torch.zeros_like(tree.depth))
    best = depth.argmax()
    found = depth[best] > 0
    # A node's ancestors have smaller indices (parents come first), so the path in index
    # order is root-to-leaf.
    on_path = tree.anc[best] & found
    bonus = target_next[torch.where(found, best + 1, torch.zeros_like(best))]
    packed = torch.cat((bonus.view(1), on_path.long())).tolist()
    return [i for i, f in enumerate(packed[1:]) if f], int(packed[0])


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


def sample_from(p: torch.Tensor, gen: Optional[torch.Generator]) -> int:
    """One draw from the distribution p [V], with a generator on any device."""
    if gen is not None and gen.device != p.device:
        p = p.to(gen.device)
    return int(torch.multinomial(p, 1, generator=gen))




def accept_draft(px: float, qx: float, r: float) -> bool:
    """The speculative sampling rule: accept a token drawn from q with probability min(1, p/q)."""
    return qx > 0 and r * qx < px  # r < p/q without dividing


def sample_accept(tree: DraftTree, p_rows: torch.Tensor, gen: Optional[torch.Generator],
                  accept=accept_draft) -> tuple[list[int], int]:
    """Recursive rejection sampling over siblings (drawn without replacement).

    At a node with target distribution p and draft distribution q, children c_1..c_m
    (drawn from q without replacement, in draw order): accept c_i with probability
    min(1, p(c_i)/q(c_i)); on rejection p <- norm(max(0, p - q)) and q <- q without
    c_i, renormalised. If every child is rejected the bonus token is drawn from the
    residual p. The output token is then distributed exactly as p (for m = 1 this
    is the standard speculative sampling rule), whatever m is, as long as m does not
    depend on the children's values (tree.py's budget guarantees that).
    p_rows [N+1, V]: target distributions at the root row and each node row. `accept(p(x), q(x), r)`
    with r ~ U(0, 1) is the rule (tests inject wrong ones to show the sampling check catches them).
    """
    path: list[int] = []
    cur = -1
    dev = p_rows.device
    p = p_rows[0].clone()
    while True:
        kids = tree.children(cur)
        q = tree.q.get(cur)
        accepted = None
        if kids and q is not None:
            q = q.to(dev, copy=True)
            for c in kids:
                x = int(tree.tokens[c])
                px, qx = float(p[x]), float(q[x])
                r = float(rand_on((), gen, dev))
                if accept(px, qx, r):
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
            return path, sample_from(p, gen)
        path.append(accepted)
        cur = accepted
        p = p_rows[accepted + 1].clone()
