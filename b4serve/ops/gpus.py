"""How many GPUs TorchServe 0.12 gives its workers, counted as its ConfigManager counts them.

TorchServe sets ``number_of_gpu`` to the smaller of the GPUs it finds and the configured value:
it finds them in ``CUDA_VISIBLE_DEVICES`` when that is set, else by asking ``nvidia-smi``. It
then hands each new worker the next GPU round-robin (``gpu_id`` in the worker's context), so
``initial_workers = gpus * workers per GPU`` puts the same number of workers on every GPU.

    python -m b4serve.ops.gpus [--ts-config config.properties]   # prints the count

(scripts/build_mar.sh passes it to the export, whose runtime choice serves the GPU path when
the workers get any.)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["configured_gpus", "main", "torchserve_gpus", "visible_gpus"]

_NUMBER_OF_GPU = re.compile(r"^\s*number_of_gpu\s*[=:]\s*(\d+)\s*$", re.MULTILINE)


def visible_gpus(environ: Mapping[str, str] = os.environ) -> int:
    """The GPUs TorchServe finds: the ids in ``CUDA_VISIBLE_DEVICES`` if it is set and not
    empty, else the devices ``nvidia-smi`` lists (0 without it)."""
    visible = environ.get("CUDA_VISIBLE_DEVICES", "")
    if visible:
        return len(visible.split(","))
    smi = shutil.which("nvidia-smi", path=environ.get("PATH"))
    if smi is None:
        return 0
    try:
        listed = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return 0
    lines = listed.stdout.split()
    if listed.returncode != 0 or not lines or lines[0] != "index":
        return 0
    return len(lines) - 1


def configured_gpus(ts_config: Path | None, environ: Mapping[str, str] = os.environ) -> int | None:
    """``number_of_gpu`` as the server will read it: ``TS_NUMBER_OF_GPU`` (our config enables
    environment overrides), else the config file's key; None when neither sets it."""
    if environ.get("TS_NUMBER_OF_GPU"):
        return int(environ["TS_NUMBER_OF_GPU"])
    if ts_config is not None and ts_config.is_file():
        found = _NUMBER_OF_GPU.search(ts_config.read_text())
        if found:
            return int(found.group(1))
    return None


def torchserve_gpus(ts_config: Path | None, environ: Mapping[str, str] = os.environ) -> int:
    """The GPUs TorchServe started with ``ts_config`` will give its workers."""
    found = visible_gpus(environ)
    configured = configured_gpus(ts_config, environ)
    return found if configured is None else min(found, configured)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m b4serve.ops.gpus", description=__doc__)
    parser.add_argument(
        "--ts-config", type=Path, default=os.environ.get("B4_TS_CONFIG") or None,
        help="the server's config.properties, read for number_of_gpu (env B4_TS_CONFIG)",
    )  # fmt: skip
    print(torchserve_gpus(parser.parse_args(argv).ts_config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
