"""Pack what the borrowed GPU machine lacks, so ``bench/gpu_check.sh`` runs there in one go.

The GPU machine this project is sometimes lent (one H200) has Python 3.12 with a CUDA build
of torch and a scientific stack, no network, and none of this project's own dependencies
(pydantic, Prefect, MLflow, …). This collects every distribution ``charlm[pipeline]`` needs
that the machine's image does not hold (``bench/gpu_device_packages.txt``), at the versions
installed in this checkout's ``.venv`` — the ones CI tests — as CPython 3.12 manylinux wheels,
into ``.gpu/whl``, and copies the corpus to ``.gpu/``. ``.gpu`` is git-ignored: it travels
only as the ``carry`` of the device call, and ``bench/gpu_check.sh`` installs the wheels
there before it starts:

    python bench/gpu_wheelhouse.py
    # device run, carry [".gpu"]: bash bench/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log

Left out on purpose (the check does not reach them): boto3 and its parts (the corpus is a
local file), psycopg2 (PostgreSQL), apprise (Prefect's notifications), and torch, triton and
the NVIDIA libraries (the machine's own CUDA build is used).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "nietzsche.txt"
NOT_CARRIED = {"charlm", "torch", "triton", "boto3", "botocore", "s3transfer", "jmespath", "psycopg2-binary", "apprise"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
CARRY_LIMIT_MB = 64  # what one device call carries, working tree included


def closure(root: str, extras: set[str], python: str) -> dict[str, str]:
    """Every distribution ``root[extras]`` needs on Linux x86-64 under CPython ``python``
    (e.g. 3.12.3), with the version installed here."""
    env = {
        "python_version": ".".join(python.split(".")[:2]),
        "python_full_version": python,
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    found: dict[str, set[str]] = {}
    versions: dict[str, str] = {}

    def walk(name: str, wanted: set[str]) -> None:
        key = canonicalize_name(name)
        new_extras = wanted - found.get(key, set())
        if key in found and not new_extras:
            return
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"gpu_wheelhouse: {name} is required but not installed here (run make setup)") from None
        found.setdefault(key, set()).update(wanted)
        versions[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            markers = [{**env, "extra": extra} for extra in ["", *sorted(found[key])]]
            if req.marker is None or any(req.marker.evaluate(m) for m in markers):
                walk(req.name, set(req.extras))

    walk(root, extras)
    return versions


def device_packages(path: Path) -> set[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {canonicalize_name(line) for line in lines if line}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default=str(ROOT / ".gpu"), help="where the wheels (whl/) and the corpus go")
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--python", default="3.12.3", help="the GPU machine's Python version")
    parser.add_argument(
        "--device-has",
        default=str(Path(__file__).with_name("gpu_device_packages.txt")),
        help="the distributions the GPU machine's image holds (one a line); an empty file carries everything",
    )
    args = parser.parse_args()

    corpus = Path(args.corpus)
    if not corpus.is_file():
        raise SystemExit(f"gpu_wheelhouse: corpus {corpus} not found (--corpus)")
    has = device_packages(Path(args.device_has))
    needed = closure("charlm", {"pipeline"}, args.python)
    python_version = ".".join(args.python.split(".")[:2])
    carried = {
        name: version
        for name, version in sorted(needed.items())
        if name not in NOT_CARRIED and name not in has and not name.startswith("nvidia-")
    }
    dest = Path(args.dest)
    wheels = dest / "whl"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(wheels)]
    command += ["--python-version", python_version, "--implementation", "cp"]
    command += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    command += [f"{name}=={version}" for name, version in carried.items()]
    if subprocess.run(command).returncode:
        raise SystemExit("gpu_wheelhouse: pip download failed (above)")
    shutil.copyfile(corpus, dest / corpus.name)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) / 2**20
    print(
        f"{dest}: {len(carried)} wheels for Python {python_version} of the {len(needed)} distributions "
        f"charlm[pipeline] needs ({len(needed) - len(carried)} are on the GPU machine or not needed there), "
        f"and the corpus: {size:.1f} MiB"
    )
    if size > CARRY_LIMIT_MB - 4:
        raise SystemExit(f"gpu_wheelhouse: {size:.1f} MiB leaves too little of a device call's {CARRY_LIMIT_MB} MiB")


if __name__ == "__main__":
    main()
