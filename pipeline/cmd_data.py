"""`eagle3 data inspect CONFIG [overrides] [--index I] [--json]`: look at the training data
exactly as stage 1 will see it (chat template applied, loss mask computed)."""
from __future__ import annotations

import json
from typing import List, Optional

import typer

from pipeline.common import OVERRIDES, get_config, out, register_user_error, user_errors
from stage1_extract.conversations import DataError, load_conversations
from stage1_extract.target import TargetError, load_tokenizer
from stage1_extract.tokenize import TemplateError, build_samples, tokenize_conversation

for _exc in (DataError, TemplateError, TargetError):
    register_user_error(_exc)


def _runs(ids: list[int], mask: list[int]) -> list[tuple[int, list[int]]]:
    """Consecutive (mask value, token ids) runs."""
    runs: list[tuple[int, list[int]]] = []
    for i, m in zip(ids, mask):
        if runs and runs[-1][0] == m:
            runs[-1][1].append(i)
        else:
            runs.append((m, [i]))
    return runs


def _paths(cfg, split: str) -> list[str]:
    paths = cfg.data.train if split == "train" else cfg.data.eval
    if not paths:
        raise DataError(f"data.{split} is empty: nothing to inspect")
    return list(paths)


def _show_sample(cfg, split: str, index: int, as_json: bool) -> None:
    d = cfg.data
    # Read (and validate) the data before the tokenizer loads: bad input fails fast.
    convs, stats = load_conversations(_paths(cfg, split), on_error=d.on_error, max_samples=d.max_samples,
                                      num_proc=d.num_proc)
    conv = next((c for c in convs if c.sample_index == index), None)
    if conv is None:
        if index in stats.skipped_index:
            raise DataError(f"sample {index} was skipped: {stats.skipped_index[index]}")
        raise DataError(f"no sample {index}: the data has {stats.samples_read} samples (0..{stats.samples_read - 1})")
    tok = load_tokenizer(cfg.target)
    ts = tokenize_conversation(tok, conv.messages, max_length=d.max_length, truncation=d.truncation)
    runs = _runs(ts.input_ids, ts.loss_mask)
    if as_json:
        typer.echo(json.dumps({
            "text": tok.decode(ts.input_ids),
            "input_ids": ts.input_ids,
            "loss_mask": ts.loss_mask,
            "assistant_spans": [tok.decode(r) for m, r in runs if m],
        }, ensure_ascii=False))
        return
    from rich.text import Text

    n_loss = sum(ts.loss_mask)
    head = (f"sample {index}  {conv.source}:{conv.line}" + (f"  id={conv.id}" if conv.id else "")
            + f"  tokens={len(ts.input_ids)}  loss tokens={n_loss}")
    if ts.truncated:
        head += f"  TRUNCATED from {ts.full_length} ({d.truncation})"
    out.print(head, style="bold", highlight=False, markup=False, soft_wrap=True)
    # Colour on a terminal; elsewhere (pipes, files) mark the trained spans with ⟦ ⟧.
    colour = out.is_terminal
    text = Text()
    for m, r in runs:
        piece = tok.decode(r)
        if m:
            text.append(piece if colour else f"⟦{piece}⟧", style="bold green on grey15" if colour else None)
        else:
            text.append(piece, style="dim" if colour else None)
    out.print(text, highlight=False, soft_wrap=True)
    legend = "[bold green on grey15]green[/] = loss-masked (trained)" if colour else "⟦...⟧ = loss-masked (trained)"
    out.print(legend, highlight=False)


def _show_stats(cfg, split: str, as_json: bool) -> None:
    from stage1_extract.conversations import check_sources

    paths = _paths(cfg, split)
    check_sources(paths)
    tok = load_tokenizer(cfg.target)
    _, stats = build_samples(cfg, tok, paths, progress=not as_json)
    d = stats.to_dict()
    if as_json:
        typer.echo(json.dumps(d))
        return
    from rich.table import Table

    pct = d["length_percentiles"]
    out.print(f"data.{split}: {', '.join(paths)}", style="bold", highlight=False, markup=False, soft_wrap=True)
    t = Table(show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value", justify="right")
    t.add_row("samples read", f"{d['samples_read']}")
    t.add_row("kept", f"{d['kept']}")
    t.add_row("skipped", f"{stats.num_skipped}")
    for reason, n in sorted(d["skipped"].items(), key=lambda kv: -kv[1]):
        t.add_row(f"  {reason}", f"{n}")
    t.add_row(f"truncated ({cfg.data.truncation} at {cfg.data.max_length})", f"{d['truncated']}")
    t.add_row("tokens", f"{d['tokens']:,}")
    frac = d["loss_tokens"] / d["tokens"] if d["tokens"] else 0.0
    t.add_row("loss tokens", f"{d['loss_tokens']:,} ({frac:.1%})")
    t.add_row("length p50 / p90 / p99 / max", f"{pct['p50']} / {pct['p90']} / {pct['p99']} / {pct['max']}")
    t.add_row("mean length", f"{d['tokens'] / max(d['kept'], 1):.1f}")
    out.print(t)
    for msg in stats.errors[:5]:
        out.print(f"skipped: {msg}", style="yellow", highlight=False, markup=False)
    if len(stats.errors) > 5:
        out.print(f"... and {stats.num_skipped - 5} more skipped", style="yellow", highlight=False)


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Inspect conversation data as stage 1 sees it.", no_args_is_help=True)

    @data_app.command("inspect")
    @user_errors
    def inspect(config: str = typer.Argument(..., help="YAML config"),
                overrides: Optional[List[str]] = OVERRIDES,
                index: Optional[int] = typer.Option(None, "--index", "-i",
                                                    help="show sample I (its position in the input data)"),
                as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
                split: str = typer.Option("train", "--split", help="train (data.train) or eval (data.eval)")) -> None:
        """Show one sample with its loss-masked spans marked (--index), or dataset statistics."""
        if split not in ("train", "eval"):
            raise DataError(f"--split must be train or eval, got {split!r}")
        cfg = get_config(config, overrides)
        try:
            if index is not None:
                _show_sample(cfg, split, index, as_json)
            else:
                _show_stats(cfg, split, as_json)
        except DataError as e:
            if "no assistant turn" in str(e) and cfg.data.regenerate.enabled and split == "train":
                out_file = cfg.data.regenerate.output or "the regenerated JSONL"
                raise DataError(f"{e}\n(data.regenerate.enabled: data.train holds prompts whose answers the target "
                                f"writes first; inspect the answered data with data.train=[{out_file}])") from None
            raise

    app.add_typer(data_app, name="data")
