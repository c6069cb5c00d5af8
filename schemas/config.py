"""The run configuration: one YAML file, validated before any work starts.

Sections follow DESIGN.md section 6. Every model forbids unknown keys; `load_config`
turns pydantic's errors into messages that name the dotted path and the nearest
valid key. `key=value` overrides use dotted paths; values are parsed as YAML so
`train.lr=3e-4`, `extract.layers=[2,8,13]` and `data.train=[a.jsonl]` all work.
"""
from __future__ import annotations

import difflib
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


def _numeric(annotation: Any) -> bool:
    """Does a field annotation accept an int or a float anywhere (Optional, Union, list[int], ...)?"""
    if annotation is bool:
        return False
    if annotation in (int, float):
        return True
    return any(_numeric(a) for a in typing.get_args(annotation) if a is not Ellipsis)


# Config strings reach file names, job names and generated Slurm scripts, where a line break
# ends a quoted '#SBATCH' value and starts a shell command.
_LINE_BREAKING = ("\n", "\r", "\x00")
_SBATCH_OPTION = re.compile(r"(#SBATCH\s+)?-{0,2}[A-Za-z][A-Za-z0-9_-]*([= ].*)?")


def _strings(v: Any):
    if isinstance(v, str):
        yield v
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _strings(x)


def _holds_bool(v: Any) -> bool:
    return isinstance(v, bool) or (isinstance(v, (list, tuple)) and any(isinstance(x, bool) for x in v))


def _nonfinite(v: Any) -> Optional[float]:
    """The first inf/nan anywhere in a value (free-form dicts such as model_overrides and sweep.grid too)."""
    if isinstance(v, float) and not math.isfinite(v):
        return v
    items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else ()
    return next((x for x in map(_nonfinite, items) if x is not None), None)


def _nonempty_path(v: Any) -> Any:
    """A path that is set must name something: '' would mean the working directory."""
    for x in ([v] if isinstance(v, str) else v if isinstance(v, list) else []):
        if isinstance(x, str) and not x.strip():
            raise ValueError("must not be empty (an empty path means the working directory); leave the key out "
                             "for its default")
    return v


class _Section(BaseModel):
    # allow_inf_nan: `train.lr=inf` or `.nan` in YAML is a typo, never a setting
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # pydantic's lax mode reads `true` as 1 for int/float fields (`extract.topk: true` -> K=1):
    # a boolean where a number is expected is a typo, never a value.
    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, v: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _holds_bool(v) and _numeric(field.annotation):
            raise ValueError("must be a number, not a boolean (true/false)")
        section = field is not None and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        bad = None if section else _nonfinite(v)
        if bad is not None:
            raise ValueError(f"must be a finite number, not {bad}")
        if any(c in x for x in _strings(v) for c in _LINE_BREAKING):
            raise ValueError("must be a single line: newlines, carriage returns and NUL bytes are not allowed "
                             "(config values reach job scripts; give each setup line as its own list entry)")
        return v


class TargetConfig(_Section):
    path: str = Field(..., description="HF model directory or a .gguf file")
    gguf_file: Optional[str] = Field(None, description="GGUF file name when `path` is a directory holding it")
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX; "
                            "EAGLE3_CPU_BF16=0|1 overrides the probe), else fp32")
    device: str = Field("auto", description="auto = cuda when available, else cpu")
    device_map: Optional[str] = Field(None, description="'auto' spreads a large target over GPUs")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    convert_dir: Optional[str] = Field(
        None, description="where a .gguf target is converted to an HF dir (default: ~/.cache/eagle3/gguf)")

    paths_nonempty = field_validator("path", "gguf_file", "convert_dir")(_nonempty_path)


class RegenerateConfig(_Section):
    enabled: bool = False
    output: Optional[str] = Field(None, description="regenerated ShareGPT JSONL (default: <run>/regenerated.jsonl)")
    max_new_tokens: int = Field(512, gt=0)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    batch_size: int = Field(8, gt=0, description="conversations per generate call and per fsynced write "
                            "(vllm batches continuously inside one call: use hundreds; so does hf on a GPU, where a "
                            "decode step is host-bound: ~75 ms for SmolLM2 on an H200 at 32 to 256 rows alike, "
                            "bench/regen_profile.py)")
    seed: int = 0
    engine: Literal["hf", "vllm"] = Field("hf", description="hf = transformers generate; vllm = vLLM's offline "
                                          "batch API in the engine venv (see the vllm section)")

    paths_nonempty = field_validator("output")(_nonempty_path)


class DataConfig(_Section):
    train: list[str] = Field(default_factory=list)
    eval: list[str] = Field(default_factory=list)
    max_length: int = Field(2048, gt=0)
    truncation: Literal["drop_tail", "skip"] = Field(
        "drop_tail", description="drop_tail keeps the first max_length tokens; skip drops the sample")
    on_error: Literal["raise", "skip"] = "raise"
    max_samples: Optional[int] = Field(None, gt=0)
    num_proc: int = Field(1, ge=1)
    regenerate: RegenerateConfig = Field(default_factory=RegenerateConfig)

    paths_nonempty = field_validator("train", "eval")(_nonempty_path)

    @field_validator("train", "eval")
    @classmethod
    def _listed_once(cls, v: list[str]) -> list[str]:
        seen: dict[str, int] = {}
        for i, p in enumerate(v):
            key = os.path.realpath(os.path.expanduser(p))
            if key in seen:
                raise ValueError(f"{p!r} is listed twice (entries {seen[key]} and {i}): its samples would be "
                                 "trained on twice")
            seen[key] = i
        return v


class ExtractConfig(_Section):
    cache: str = "runs/default/cache"
    eval_cache: Optional[str] = Field(None, description="cache for data.eval (default: <cache>-eval)")
    layers: Union[Literal["auto"], list[int]] = "auto"
    topk: int = Field(64, gt=0)
    samples_per_shard: int = Field(1024, gt=0, description="upper bound on the samples of a shard")
    shard_tokens: Optional[int] = Field(
        1 << 20, gt=0, description="a shard closes before the sample that would take it past this many tokens "
                                   "(null: samples_per_shard alone, the layout of older caches)")
    max_tokens_per_batch: int = Field(16384, gt=0)
    window_tokens: Optional[int] = Field(
        None, gt=0, description="batches are length-sorted inside windows of consecutive samples of this many "
                                "tokens: larger pads less, and bounds the features the writer holds (default: "
                                "16 x max_tokens_per_batch)")
    logits_chunk_tokens: int = Field(2048, gt=0, description="positions per chunk of the full-vocab softmax")
    compressor: Literal["none", "zstd", "blosc-zstd", "lz4"] = "zstd"
    chunk_rows: Union[Literal["auto"], int] = Field(
        "auto", description="rows per inner chunk; auto = a quarter of the mean sample length (power of two, "
                            "32..2048), so that a training rank decodes <= 1.25x the rows it trains on")
    writer_queue: int = Field(4, gt=0, description="batches queued for the writer thread before compute waits")
    writer_threads: int = Field(0, ge=0, description="threads compressing a shard's chunks (0 = up to 4 cores)")
    hidden_dtype: Literal["bf16", "fp8"] = Field(
        "bf16", description="stored hidden states: bf16, or fp8 (e4m3 + one fp16 scale per token per layer)")

    paths_nonempty = field_validator("cache", "eval_cache")(_nonempty_path)

    @field_validator("layers")
    @classmethod
    def _low_mid_high(cls, v):
        if isinstance(v, list) and (len(v) != 3 or any(b <= a for a, b in zip(v, v[1:]))):
            raise ValueError("must be 3 distinct layer ids in increasing order (low, mid, high), e.g. [2, 16, 29]; "
                             "the head's fc reads them in this order")
        return v

    @field_validator("chunk_rows")
    @classmethod
    def _positive_chunk_rows(cls, v):
        if v != "auto" and v <= 0:
            raise ValueError("must be 'auto' or a positive number of rows")
        return v


class TrainConfig(_Section):
    output: str = "runs/default/head"
    cache: Optional[str] = Field(None, description="default: extract.cache")
    eval_cache: Optional[str] = None
    draft_vocab_size: int = Field(32000, gt=0)
    ttt_length: int = Field(7, gt=0)
    loss_decay: float = Field(0.8, gt=0.0)
    loss: Literal["ce", "tv", "lk_alpha", "lk_lambda"] = Field(
        "ce", description="per-position objective (stage2_train/objectives.py): ce = soft cross-entropy against "
                          "the target restricted to the draft vocab; tv = 1 - alpha; lk_alpha = -log alpha; "
                          "lk_lambda = lambda*KL + (1-lambda)*TV, lambda = exp(-lk_eta*sg(alpha)); alpha = the "
                          "expected acceptance sum_v min(p_v, q_v) over the cached top-K")
    lk_eta: float = Field(3.0, ge=0.0, allow_inf_nan=False, description="lk_lambda: eta (0 = KL, large = TV)")
    lm_head_init: Literal["auto", "target", "random"] = Field(
        "auto", description="target = the head's lm_head starts as the target's own rows of the draft vocab "
                            "(logit scaling folded in) and its final norm as the target's; random = from scratch; "
                            "auto = as the decoder layer starts (stage2_train/start.py)")
    layer_init: Literal["auto", "target", "random"] = Field(
        "auto", description="target = the head's decoder layer starts as the target's last layer (q/k/v read "
                            "it from both the embedding and the hidden half, fc passes the high layer through); "
                            "random = from scratch; auto = target when the cache holds the target's last layer "
                            "(stage 1 keeps it for Llama-shaped layers), else random")
    deepspeed: str = "configs/deepspeed/cpu_fp32.json"
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="bfloat16 = the head's forward under bf16 autocast (weights, gradients and AdamW "
                            "stay fp32; softmax, norms and RoPE stay fp32); auto = bfloat16 where the device "
                            "computes bf16 natively (CUDA, AVX512-BF16/AMX CPUs), else float32")
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.02, ge=0.0, le=1.0)
    epochs: int = Field(1, gt=0)
    max_steps: Optional[int] = Field(None, gt=0)
    micro_batch_size: int = Field(1, gt=0)
    max_tokens_per_batch: int = Field(4096, gt=0)
    max_length: Optional[int] = Field(None, gt=0, description="crop samples to this many rows (default: data.max_length)")
    gradient_accumulation_steps: int = Field(1, gt=0)
    grad_clip: float = Field(0.5, gt=0.0)
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    eval_max_tokens: Optional[int] = Field(
        2_000_000, gt=0, description="held-out tokens read per evaluation (a seeded subset of the held-out samples, "
                                     "shared by training's evaluations and stage 3's offline table); null = all")
    save_every: int = Field(200, gt=0)
    eval_every: int = Field(200, gt=0)
    log_every: int = Field(10, gt=0)
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0: decode threads in this process)")
    loader_threads: int = Field(2, ge=1, description="threads decoding chunks ahead of the step (stage2_train.loader)")
    shuffle_buffer: int = Field(64, ge=1, description="samples in the shuffle buffer (stage2_train.sampler); host "
                                "memory ~ (shuffle_buffer + 32 x micro_batch_size) x mean sample rows x row bytes")
    open_shards: int = Field(4, ge=1, description="shards read at once, interleaved at random (stage2_train.sampler)")
    seed: int = 0
    report_to: Literal["none", "wandb"] = "none"
    wandb_project: str = "eagle3"
    model_overrides: dict[str, Any] = Field(
        default_factory=dict, description="draft config fields to override (rope_theta, max_position_embeddings, ...)")

    paths_nonempty = field_validator("output", "cache", "eval_cache", "deepspeed")(_nonempty_path)


class EvalConfig(_Section):
    head: Union[str, list[str], None] = Field(None, description="head dir(s); default: train.output")
    prompts: list[str] = Field(default_factory=list)
    method: Union[Literal["chain", "tree"], list[Literal["chain", "tree"]]] = "chain"
    max_new_tokens: int = Field(256, gt=0)
    max_prompts: Optional[int] = Field(None, gt=0)
    max_turns: Optional[int] = Field(None, gt=0, description="MT-bench: ask only the first N turns of each question")
    draft_tokens: int = Field(5, gt=0, description="chain: tokens drafted per cycle")
    top_k: int = Field(4, gt=0, description="tree: children expanded per frontier node")
    depth: int = Field(5, gt=0, description="tree: drafting steps")
    total_tokens: int = Field(24, gt=0, description="tree: nodes verified per cycle")
    temperature: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    temperatures: Optional[list[float]] = Field(
        None, min_length=1, description="decode at each of these temperatures (e.g. [0, 0.7, 1.0]); "
                                        "default: [temperature]")
    lossless_runs: int = Field(100, ge=0, description="T > 0: seeded runs per prefix of the sampling lossless "
                                                      "check (stage3_eval/sampling_check.py); 0 = off")
    lossless_prefixes: int = Field(2, gt=0, description="T > 0: prompts (first turns) the check starts from")
    lossless_tokens: int = Field(8, ge=2, description="T > 0: tokens per run of the check")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repeats: int = Field(1, gt=0)
    warmup: int = Field(1, ge=0)
    offline: bool = True
    output: Optional[str] = Field(None, description="default: <head>/eval")
    seed: int = 0
    engine: Literal["hf", "vllm", "both"] = Field(
        "hf", description="hf = our stage-3 decoding; vllm = the exported head in vLLM (chain of draft_tokens); "
                          "both = the two, side by side in one report")

    paths_nonempty = field_validator("head", "prompts", "output")(_nonempty_path)

    @field_validator("temperatures")
    @classmethod
    def _temperatures(cls, v: Optional[list[float]]) -> Optional[list[float]]:
        if v is not None:
            bad = [t for t in v if not (t >= 0 and t < float("inf"))]
            if bad:
                raise ValueError(f"temperatures must be finite numbers >= 0, got {bad}")
            if len(set(v)) != len(v):
                raise ValueError(f"temperatures must not repeat, got {v}")
        return v


class VllmConfig(_Section):
    """The optional vLLM engine (eval.engine / data.regenerate.engine = vllm), run in its own venv."""
    python: Optional[str] = Field(None, description="the engine venv's python (default: $EAGLE3_VLLM_PYTHON, "
                                                    "else .venv-vllm/bin/python of this checkout; `make vllm`)")
    kv_cache_gib: Optional[float] = Field(1.0, gt=0, description="KV cache size; null = vLLM sizes it from "
                                                                 "gpu_memory_utilization")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    max_model_len: Optional[int] = Field(None, gt=0, description="default: the target's own limit")
    enforce_eager: bool = Field(True, description="no torch.compile / CUDA graphs (fast start; off for speed on GPU)")
    extra_args: dict[str, Any] = Field(default_factory=dict, description="more vllm.LLM(...) keyword arguments")


class SlurmConfig(_Section):
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "04:00:00"
    gpus_per_task: int = Field(1, ge=0)
    cpus_per_task: int = Field(8, gt=0)
    mem: Optional[str] = "64G"
    extra_sbatch: list[str] = Field(default_factory=list, description="extra '#SBATCH' lines, without the prefix")
    setup: list[str] = Field(default_factory=list, description="shell lines run before each job (module loads, venv)")

    @field_validator("extra_sbatch")
    @classmethod
    def _sbatch_options(cls, v: list[str]) -> list[str]:
        for i, line in enumerate(v):
            if not _SBATCH_OPTION.fullmatch(line.strip()):
                raise ValueError(f"entry {i} {line!r} is not an sbatch option (e.g. '--qos=high' or 'exclusive')")
        return v


class JobsExtract(_Section):
    tasks: int = Field(1, gt=0, description="stage-1 array size (one task per GPU)")


class JobsTrain(_Section):
    nodes: int = Field(1, gt=0)
    gpus_per_node: int = Field(1, ge=0)
    cpus_per_gpu: Optional[int] = Field(None, gt=0, description="CPUs per rank of the train job (default: the "
                                        "training loop + train.loader_threads + the loader's 2 other threads)")


class JobsConfig(_Section):
    executor: Literal["local", "slurm"] = "local"
    log_dir: Optional[str] = Field(None, description="default: <run dir>/jobs")

    paths_nonempty = field_validator("log_dir")(_nonempty_path)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    extract: JobsExtract = Field(default_factory=JobsExtract)
    train: JobsTrain = Field(default_factory=JobsTrain)


class SweepConfig(_Section):
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted train.* key -> values")
    eval: bool = False
    output: Optional[str] = Field(None, description="default: <train.output>-sweep")

    paths_nonempty = field_validator("output")(_nonempty_path)


class RunConfig(_Section):
    name: str = "default"
    target: TargetConfig
    data: DataConfig = Field(default_factory=DataConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    vllm: VllmConfig = Field(default_factory=VllmConfig)

    @field_validator("name")
    @classmethod
    def _name_is_a_path_part(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError("name must be a non-empty string without '/'")
        return v

    # Convenience accessors with the documented defaults resolved.
    @property
    def train_cache(self) -> str:
        return self.train.cache or self.extract.cache

    @property
    def eval_cache(self) -> str:
        return self.extract.eval_cache or (self.extract.cache.rstrip("/") + "-eval")

    @property
    def heads(self) -> list[str]:
        h = self.eval.head or self.train.output
        return [h] if isinstance(h, str) else list(h)

    @property
    def eval_temperatures(self) -> list[float]:
        t = self.eval.temperatures
        return [float(x) for x in t] if t is not None else [float(self.eval.temperature)]

    @property
    def eval_methods(self) -> list[str]:
        m = self.eval.method
        return [m] if isinstance(m, str) else list(m)


# --------------------------------------------------------------------------- loading


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at `loc` (a pydantic error location without the bad key)."""
    cur: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return []
        ann = cur.model_fields[part].annotation
        cur = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return []


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            known = _known_keys(RunConfig, loc[:-1])
            near = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
            hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), near[0]])}'?" if near else ""
            valid = f" (valid keys here: {', '.join(known)})" if known else ""
            lines.append(f"unknown key '{dotted}'{hint}{valid}")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{dotted}'")
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            lines.append(f"'{dotted}': {msg} (got {e.get('input')!r})")
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


class DuplicateKeyError(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML would keep the last silently)."""


def _mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node.start_mark.line + 1)
        except TypeError:  # an unhashable key: the constructor below reports it
            continue
        if first != key_node.start_mark.line + 1:
            raise DuplicateKeyError(f"key '{key}' is given twice (lines {first} and {key_node.start_mark.line + 1}); "
                                    f"YAML would keep only the second")
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def yaml_load(text: str) -> Any:
    """yaml.safe_load, refusing duplicated keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _dropped_comment(raw: str) -> Optional[str]:
    """The text YAML would read as a comment and drop from an override value (`a #b` -> `#b`)."""
    try:
        ends = [t.end_mark.index for t in yaml.scan(raw) if not isinstance(t, yaml.StreamEndToken)]
    except yaml.YAMLError:
        return None
    rest = raw[max(ends, default=0):].strip()
    return rest if rest.startswith("#") else None


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{item}': bad dotted key '{key}'")
    if any(c in raw for c in _LINE_BREAKING):
        raise ConfigError(f"override {item!r}: the value holds a line break or NUL byte; give one line "
                          f"(YAML would cut it at a '#' on the next line)")
    comment = _dropped_comment(raw)
    if comment is not None:
        raise ConfigError(f"override {item!r}: YAML reads {comment!r} as a comment and would drop it; "
                          f"quote the value ({key}='{raw.strip()}') or leave the comment out")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # plain strings with YAML-special characters stay strings
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        cur = raw
        for part in path[:-1]:
            nxt = cur.get(part)
            if nxt is None:
                nxt = cur[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            cur = nxt
        cur[path[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = (), *,
                raw: dict | None = None) -> RunConfig:
    """Read a YAML config (or a dict), apply dotted overrides, validate strictly."""
    source = str(path) if path is not None else "<dict>"
    if raw is None:
        p = Path(path)  # type: ignore[arg-type]
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml_load(p.read_text(encoding="utf-8")) or {}
        except DuplicateKeyError as e:
            raise ConfigError(f"config {p}: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config {p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): "
                              "is it a YAML file?") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config {p} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config {p}: the top level must be a mapping of sections")
    raw = apply_overrides(dict(raw), list(overrides))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def resolve_layers(layers: Union[str, list[int]], num_hidden_layers: int) -> list[int]:
    """Indices into HF's output_hidden_states (0 = embeddings); auto = [2, L//2, L-3]."""
    L = num_hidden_layers
    ids = [2, L // 2, L - 3] if layers == "auto" else list(layers)
    if len(ids) != 3:
        raise ConfigError(f"extract.layers must name 3 layers (low, mid, high), got {ids}")
    bad = [i for i in ids if not 0 <= i <= L]
    if bad:
        raise ConfigError(f"extract.layers {ids}: ids {bad} outside 0..{L} (the target has {L} layers)")
    return ids


def check_topk(topk: int, vocab_size: int, where: str = "extract.topk") -> None:
    """K of the cache's top-K log-probabilities cannot exceed the target's vocabulary."""
    if int(topk) > int(vocab_size):
        raise ConfigError(f"{where} = {topk} is larger than the target's vocabulary ({vocab_size} tokens); "
                          f"set {where} <= {vocab_size} (64 is the usual value)")
