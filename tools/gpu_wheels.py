#!/usr/bin/env python
"""The wheels that tools/gpu_check.py needs on a lent GPU machine, gathered here into .whl/.

That machine reaches no package index and runs its own Python 3.12 with torch 2.11 (CUDA 13),
without DeepSpeed. DeepSpeed is built here as a wheel of pure Python (its CUDA ops compile at first
use there); what it needs that the machine lacks is downloaded as CPython 3.12 manylinux x86-64
wheels. Versions are those of constraints.txt. Wheels given with --add are copied in as well, e.g.
a flash-attn wheel built for torch 2.11 / CUDA 13 / cp312 (PyPI holds flash-attn as source only).

    python tools/gpu_wheels.py [--add flash_attn-...-cp312-cp312-linux_x86_64.whl] [--overwrite]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from looplm_mega.cli import HelpFormatter  # noqa: E402
from looplm_mega.outputs import OutputError, check_output_dir, exit_with, staged_output_dir  # noqa: E402

KIND = "wheels for the GPU machine"
BUILT = ["deepspeed"]  # source distributions: built here
# What DeepSpeed needs beyond the machine's packages (its einops, msgpack, ninja, numpy, packaging,
# psutil, py-cpuinfo, torch and tqdm are there).
DOWNLOADED = ["hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"]
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"] + [
    arg for platform in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                         "manylinux2014_x86_64", "manylinux1_x86_64") for arg in ("--platform", platform)]


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(names: list[str], constraints: Path = ROOT / "constraints.txt") -> list[str]:
    """`name==version` for each name, as constraints.txt pins it."""
    pins = {}
    for line in constraints.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[_normalise(name)] = f"{name}=={version}"
    missing = [n for n in names if _normalise(n) not in pins]
    if missing:
        raise ValueError(f"{constraints}: pins no version of {', '.join(missing)}")
    return [pins[_normalise(n)] for n in names]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output", default=str(ROOT / ".whl"), help="folder of wheels (default: .whl at the repository root)")
    parser.add_argument("--add", nargs="+", default=[], help="wheel files to copy in as well")
    parser.add_argument("--overwrite", action="store_true", help="replace a folder of wheels this tool wrote earlier")
    args = parser.parse_args(argv)
    try:
        for wheel in args.add:
            if not wheel.endswith(".whl") or not Path(wheel).is_file():
                raise OutputError(f"--add {wheel}: not a wheel file")
        built, downloaded = pinned(BUILT), pinned(DOWNLOADED)
        check_output_dir(args.output, KIND, overwrite=args.overwrite)
    except ValueError as e:  # OutputError too
        exit_with("gpu_wheels.py", e)
    pip = [sys.executable, "-m", "pip"]
    with staged_output_dir(args.output, KIND, overwrite=args.overwrite) as staging:
        subprocess.run(pip + ["wheel", "--no-deps", "-w", str(staging), *built], check=True)
        subprocess.run(pip + ["download", "--no-deps", *TARGET, "-d", str(staging), *downloaded], check=True)
        for wheel in args.add:
            shutil.copy2(wheel, staging)
        sizes = {w.name: w.stat().st_size for w in sorted(staging.glob("*.whl"))}
    for name, size in sizes.items():
        print(f"{size / 2**20:7.2f} MiB  {name}")
    total = sum(sizes.values())
    print(f"{total / 2**20:7.2f} MiB in {args.output} (a device run carries it: the working tree that travels is 64 MiB at most)")


if __name__ == "__main__":
    main()
