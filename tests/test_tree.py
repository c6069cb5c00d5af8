"""Tree masks, positions, acceptance and selection against hand-built references."""
from __future__ import annotations

import math

import pytest
import torch

from spec_helpers import make_head, tiny_layer_ids
from stage3_eval.tree import DraftTree, _gumbel_topk, build_tree, greedy_accept, sample_accept, verify_mask, \
    verify_positions

#        R
#      /   \
#     0     1
#    / \
#   2   3
#   |
#   4
TOK = [50, 51, 60, 61, 70]
PAR = [-1, -1, 0, 0, 2]


def test_five_node_tree_mask_and_positions():
    t = DraftTree.from_parents(TOK, PAR)
    assert t.depth.tolist() == [1, 1, 2, 2, 3]
    want = torch.tensor([
        # R  0  1  2  3  4
        [1, 0, 0, 0, 0, 0],  # R
        [1, 1, 0, 0, 0, 0],  # 0
        [1, 0, 1, 0, 0, 0],  # 1
        [1, 1, 0, 1, 0, 0],  # 2
        [1, 1, 0, 0, 1, 0],  # 3
        [1, 1, 0, 1, 0, 1],  # 4
    ], dtype=torch.bool)
    assert torch.equal(verify_mask(t), want)
    assert verify_positions(t, 10).tolist() == [10, 11, 11, 12, 12, 13]
    assert not t.is_chain and DraftTree.from_parents([1, 2, 3], [-1, 0, 1]).is_chain
    assert t.children(-1) == [0, 1] and t.children(0) == [2, 3] and t.children(3) == []


@pytest.mark.parametrize("nxt,path,bonus", [
    # rows: R, 0, 1, 2, 3, 4 = the target's greedy token after each row
    ([50, 61, 9, 9, 99, 9], [0, 3], 99),      # R->0 ok, 0->3 ok, then bonus at 3
    ([50, 60, 9, 70, 9, 7], [0, 2, 4], 7),    # the deepest path
    ([51, 60, 9, 70, 9, 7], [1], 9),          # 1 is a leaf: bonus from row of node 1
    ([42, 60, 9, 70, 9, 7], [], 42),          # nothing accepted: bonus from the root row
    ([50, 99, 9, 70, 9, 7], [0], 99),         # 0 accepted, neither child
])
def test_greedy_accept_hand_cases(nxt, path, bonus):
    t = DraftTree.from_parents(TOK, PAR)
    assert greedy_accept(t, torch.tensor(nxt)) == (path, bonus)


class FixedDrafter:
    """Root log-probs `lp`; every expanded node gets the log-probs `lp2` over tokens 0..V-1."""

    def __init__(self, lp, lp2=None):
        self.lp = torch.tensor(lp).log()
        self.lp2 = torch.tensor(lp2 if lp2 is not None else lp).log()
        self.vocab_size = len(lp)
        self.ready = True
        self.expanded = []

    def root_logits(self):
        return self.lp

    def to_target(self, ids):
        return ids + 100

    def probs_to_target(self, q):
        return q

    def begin_tree(self, b):
        pass

    def end_tree(self):
        pass

    def expand(self, b, frontier):
        self.expanded.append(frontier.tolist())
        return self.lp2.expand(frontier.numel(), -1)


def test_eagle2_selection_keeps_best_nodes_and_parents():
    d = FixedDrafter([0.6, 0.3, 0.1], [0.7, 0.2, 0.1])
    t = build_tree(d, top_k=2, depth=3, total_tokens=5)
    # nodes: 0 a .6, 1 b .3 | 2 aa .42, 3 ab .12, 4 ba .21, 5 bb .06 (frontier {aa, ba})
    #        | 6 aaa .294, 7 aab .084, 8 baa .147, 9 bab .042
    # best 5 = a, aa, b, aaa, ba -> nodes 0, 1, 2, 4, 6 in creation order
    assert d.expanded == [[0, 1], [2, 4]]
    assert [round(x, 4) for x in t.scores.exp().tolist()] == [0.6, 0.3, 0.42, 0.21, 0.294]
    assert t.tokens.tolist() == [100, 101, 100, 100, 100]
    assert t.parents.tolist() == [-1, -1, 0, 1, 2]
    assert t.depth.tolist() == [1, 1, 2, 2, 3]
    # without pruning every generated node stays
    assert build_tree(FixedDrafter([0.6, 0.3, 0.1], [0.7, 0.2, 0.1]), top_k=2, depth=3, total_tokens=50).size == 10


def test_chain_is_top1_path():
    d = FixedDrafter([0.1, 0.7, 0.2])
    t = build_tree(d, top_k=1, depth=4, total_tokens=4)
    assert t.is_chain and t.tokens.tolist() == [101] * 4 and t.depth.tolist() == [1, 2, 3, 4]


def test_draft_tree_attention_equals_sequential_chain(tiny_llama_dir):
    """A depth-3 tree node's draft logits equal running its path one step at a time."""
    import transformers as tf

    from stage3_eval.draft_runner import DraftRunner

    torch.manual_seed(0)
    m = tf.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    head = make_head(m, seed=3)
    dr = DraftRunner(head)
    ids = torch.tensor([5, 17, 33, 60, 61, 9, 44])
    with torch.no_grad():
        out = m(input_ids=ids[None], output_hidden_states=True)
    aux = torch.cat([out.hidden_states[i][0] for i in tiny_layer_ids(m)], -1)
    dr.commit(aux[:-1], ids[1:], torch.arange(6))
    captured = {}
    orig = dr.expand

    def spy(b, frontier):
        lg = orig(b, frontier)
        for r, f in enumerate(frontier.tolist()):
            captured[f] = (lg[r].clone(), b.tokens[:b.n][b.anc[f, :b.n]].tolist())
        return lg

    dr.expand = spy
    t = build_tree(dr, top_k=3, depth=3, total_tokens=20)
    deep = [f for f, (_, path) in captured.items() if len(path) == 2][-1]  # a depth-2 node's expansion
    lg_tree, path = captured[deep]
    with torch.no_grad():
        past, h = dr.past, dr.root_hidden[None, None]
        for d, tokn in enumerate(path, start=1):  # chain: one node at a time, default causal mask, t + d
            h, past = head.step(h, torch.tensor([[tokn]]), torch.tensor([[5 + d]]), past=past)
        torch.testing.assert_close(head.logits(h[0, -1]), lg_tree, atol=1e-5, rtol=1e-5)
    assert t.size > 3


def test_recursive_rejection_preserves_p():
    """Synthetic: 3 siblings drawn without replacement from q, 20000 trials; output ~ p."""
    g = torch.Generator().manual_seed(7)
    V = 6
    p = torch.tensor([0.05, 0.4, 0.05, 0.3, 0.15, 0.05])
    q = torch.tensor([0.5, 0.1, 0.2, 0.05, 0.1, 0.05])
    counts = torch.zeros(V)
    n = 20000
    for _ in range(n):
        kids = _gumbel_topk(q.log(), 3, g)
        t = DraftTree.from_parents(kids, [-1, -1, -1])
        t.q = {-1: q}
        # children are leaves: row i+1's p is irrelevant to the first token
        path, bonus = sample_accept(t, torch.stack([p] * 4), g)
        first = int(t.tokens[path[0]]) if path else bonus
        counts[first] += 1
    stat = float(((counts - n * p) ** 2 / (n * p)).sum())
    df = V - 1
    a = 2 / (9 * df)
    crit = df * (1 - a + 3.090 * math.sqrt(a)) ** 3  # 0.999 quantile (Wilson-Hilferty)
    assert stat < crit, (stat, counts / n)
    # power: the same counts are far from q
    stat_q = float(((counts - n * q) ** 2 / (n * q)).sum())
    assert stat_q > 100 * crit
