"""The offline bundle of bench/gpu_check.py: wheels downloaded here, installed on a GPU host
with no network.

  python bench/offline_bundle.py download DIR     (make gpu-wheels)
  python bench/gpu_check.py --wheels DIR ...      (on the GPU host: runs run_in_prefix)

download: every wheel of bench/gpu_requirements.txt for CPython 3.12 on manylinux x86-64
(`pip download --only-binary=:all: --no-deps`), plus a pure-Python deepspeed wheel built from
its sdist (DS_BUILD_OPS=0: its ops are JIT-built when used; the check uses none on CUDA).
run_in_prefix: `pip install --no-index --no-deps --target OUT/prefix DIR/*.whl`, then the
check in a child process whose HOME, TMPDIR and every cache (pip, matplotlib, triton, torch
extensions, HF, GGUF conversions) point under OUT, bytecode off: nothing is written outside
OUT (the repository checkout stays untouched).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "bench" / "gpu_requirements.txt"
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
            "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux_2_28_x86_64", "--platform", "any"]


def requirements() -> list[str]:
    return [ln.split("#")[0].strip() for ln in REQUIREMENTS.read_text().splitlines() if ln.split("#")[0].strip()]


def download(dest: Path, platform: list[str] = PLATFORM) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    reqs = requirements()
    ds = [r for r in reqs if r.startswith("deepspeed")]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "--no-deps", "-d", str(dest), *platform,
                    *[r for r in reqs if r not in ds]], check=True)
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), *ds], check=True, env=env)
    size = sum(f.stat().st_size for f in dest.glob("*.whl"))
    print(f"{len(list(dest.glob('*.whl')))} wheels, {size / 2 ** 20:.1f} MiB in {dest}")
    return 0


def sandbox_env(out: Path, site: Path) -> dict:
    """The child's environment: imports from the prefix first, every write under `out`."""
    home, tmp = out / "home", out / "tmp"
    for d in (home, tmp):
        d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "XDG_CACHE_HOME": str(home / ".cache"),
           "XDG_CONFIG_HOME": str(home / ".config"), "MPLCONFIGDIR": str(home / "mpl"),
           "TRITON_CACHE_DIR": str(home / "triton"), "TORCH_EXTENSIONS_DIR": str(home / "torch_extensions"),
           "TORCHINDUCTOR_CACHE_DIR": str(home / "inductor"), "HF_HOME": str(home / "hf"),
           "EAGLE3_CONVERT_DIR": str(out / "gguf"), "PYTHONDONTWRITEBYTECODE": "1", "PIP_NO_CACHE_DIR": "1",
           "PIP_NO_INDEX": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    env.pop("PIP_FIND_LINKS", None)
    return env


def install(wheels: Path, out: Path) -> Path:
    """The bundle's wheels into OUT/prefix/site (offline); returns that directory."""
    files = sorted(str(f) for f in wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f"gpu-check: no wheels in {wheels} (make gpu-wheels fills it)")
    site = out / "prefix" / "site"
    env = sandbox_env(out, site)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-cache-dir",
                    "--disable-pip-version-check", "--no-compile", "--isolated", "--target", str(site), *files],
                   check=True, env=env)
    mods = ["deepspeed", "zarr", "numcodecs", "google_crc32c", "pydantic", "typer", "rich", "matplotlib"]
    subprocess.run([sys.executable, "-c", "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)",
                    *mods], check=True, env=env)
    return site


def run_in_prefix(wheels: Path, out: Path, args: list[str]) -> int:
    """Install the bundle under `out` and run the check there (its results in OUT/check)."""
    out.mkdir(parents=True, exist_ok=True)
    site = install(wheels, out)
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args, "--out", str(out / "check")]
    return subprocess.run(cmd, env=sandbox_env(out, site)).returncode


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "download":
        sys.exit(__doc__)
    sys.exit(download(Path(sys.argv[2])))
