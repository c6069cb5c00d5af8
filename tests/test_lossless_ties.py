"""W6: a greedy mismatch is a tie when the target's top-1 and the speculative token are
within the stated tolerance there; ties are counted apart from failures."""
from __future__ import annotations

import copy

import pytest
import torch

from spec_helpers import greedy_reference
from stage3_eval.report import markdown, summarize
from stage3_eval.target_runner import TargetRunner

PROMPT = [5, 17, 33, 60, 61, 9]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def target(tiny_llama_fp32):
    return tiny_llama_fp32


def test_tie_tolerance_is_ulps_of_the_top1_logit():
    from stage3_eval.evaluate import TIE_ULPS, tie_tolerance

    assert TIE_ULPS == 4
    assert tie_tolerance(20.0, torch.bfloat16) == 4 * 2 ** -7 * 16 == 0.5
    assert tie_tolerance(-20.0, torch.bfloat16) == 0.5
    assert tie_tolerance(3.0, torch.float16) == 4 * 2 ** -10 * 2
    assert tie_tolerance(20.0, torch.float32) == 4 * 2 ** -23 * 16


def test_mismatch_detail_tie_and_failure(target):
    """A target whose lm_head has two identical rows ties those tokens exactly."""
    from stage3_eval.evaluate import mismatch_detail

    base = greedy_reference(target, PROMPT, 6)[len(PROMPT):]
    pos = 3
    a = base[pos]
    twin = copy.deepcopy(target)
    b = (a + 7) % target.config.vocab_size
    with torch.no_grad():
        twin.lm_head.weight[b] = twin.lm_head.weight[a]
    runner = TargetRunner(twin, None)
    ref = greedy_reference(twin, PROMPT, 6)[len(PROMPT):]
    assert ref == base  # argmax keeps the first of two equal logits: same greedy output
    spec = base[:pos] + [b] + base[pos + 1:]
    d = mismatch_detail(runner, PROMPT, base, spec, pos)
    assert d["position"] == pos and d["base_token"] == a and d["spec_token"] == b
    assert d["top1_token"] in (a, b) and d["margin"] == 0.0 and d["spec_token_gap"] == 0.0 and d["tie"] is True
    # a token far below the top-1: a failure, with the real margin and gap
    with torch.no_grad():
        logits = twin(input_ids=torch.tensor([PROMPT + base[:pos]])).logits[0, -1]
    low = int(logits.argmin())
    d = mismatch_detail(runner, PROMPT, base, base[:pos] + [low], pos)
    assert d["tie"] is False and d["spec_token_gap"] == pytest.approx(float(logits.max() - logits[low]), rel=1e-5)
    assert d["margin"] == pytest.approx(float(logits.topk(2).values[0] - logits.topk(2).values[1]), abs=1e-5)
    # spec output ended early: never a tie
    assert mismatch_detail(runner, PROMPT, base, base[:pos], pos)["tie"] is False


def _rec(i, match, mismatch=None):
    return {"id": f"p{i}", "turn": 1, "new_tokens": 4, "passes": 2, "accept_lengths": [1, 1],
            "drafted_depths": [2, 2], "wall_s": 1.0, "base_new_tokens": 4, "base_wall_s": 1.0,
            "match": match, "first_mismatch": None if match else 2, "mismatch": mismatch}


TIE = {"position": 2, "tie": True, "margin": 0.125, "spec_token_gap": 0.125, "tolerance": 0.5,
       "base_token": 3, "spec_token": 4}
FAIL = {"position": 2, "tie": False, "margin": 3.0, "spec_token_gap": 5.0, "tolerance": 0.5,
        "base_token": 3, "spec_token": 9}


def test_summary_counts_ties_apart_from_failures():
    m = summarize("tree", [_rec(0, True), _rec(1, False, TIE)], 2)
    assert m["lossless"] is True and m["lossless_ties"] == 1 and m["lossless_failures"] == 0
    assert m["mismatched_prompts"][0]["tie"] is True and m["mismatched_prompts"][0]["margin"] == 0.125
    m2 = summarize("tree", [_rec(0, False, FAIL), _rec(1, False, TIE), _rec(2, True)], 2)
    assert m2["lossless"] is False and m2["lossless_ties"] == 1 and m2["lossless_failures"] == 1
    m3 = summarize("chain", [_rec(0, False)], 2)  # no detail: a failure
    assert m3["lossless"] is False and m3["lossless_failures"] == 1 and m3["lossless_ties"] == 0
    rep = {"target": "t", "settings": {"tie_rule": "within 4 ulp"},
           "heads": [{"head": "h", "name": "h", "methods": [m, m2]}]}
    md = markdown(rep)
    assert "lossless tie: within 4 ulp" in md
    assert "| yes (1 tie) |" in md and "| NO (1 mismatched, 1 tie) |" in md
    assert "p1#turn1@2 (tie: top-1/top-2 margin 0.125, spec token gap 0.125, tolerance 0.5)" in md
    assert "p0#turn1@2 (failure: top-1/top-2 margin 3, spec token gap 5, tolerance 0.5)" in md
