"""What an archive is: the checkpoint's bytes, every setting that changes what the archive holds,
and the code that builds it and that it ships. Its hash is the archive's id, so any change to any
of them is a new build, and the same checkpoint with the same settings is the same build.

    python -m b4serve.build.identity --checkpoint PATH --record-dir DIR

prints the id and writes the identity to ``DIR/<id>.json``, where deploy reads it back to say
what changed between the serving version and the new one (b4serve.ops.manage).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ARCHIVE_SETTINGS", "archive_id", "archive_identity", "code_hash", "main"]

ROOT = Path(__file__).resolve().parents[2]

# Each environment variable scripts/build_mar.sh turns into an export argument, with the value an
# unset one stands for (None: the export decides from the checkpoint or the host). Setting a
# variable to its default is the same build as leaving it unset.
ARCHIVE_SETTINGS: dict[str, str | None] = {
    "B4_ARCH": None,
    "B4_NUM_CLASSES": "6",
    "B4_CLASS_NAMES": None,
    "B4_INPUT_SIZE": None,
    "B4_MICRO_BATCH": None,
    "B4_THREADS": None,
    "B4_MALLOC_KEEP_MB": None,
    "B4_OPTIMIZE": "1",
    "B4_ONEDNN_FUSION": "1",
    "B4_RUNTIME": "auto",
    "B4_CHECK_IMAGES": None,
    "B4_REDUCED_TOLERANCE": None,
    "B4_OPENVINO_HINT": None,
    "B4_OPENVINO_STREAMS": None,
    "B4_GPU_PRECISION": None,
    "B4_GPU_PARITY": None,
    "B4_HANDLER": None,
}
# Settings that may name a file or directory: what it holds is the setting, not its path.
_PATH_SETTINGS = ("B4_CLASS_NAMES", "B4_CHECK_IMAGES", "B4_HANDLER")
_CHUNK = 1 << 20


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _contents_hash(paths: Sequence[Path], base: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(base)).encode() + b"\0")
        digest.update(_file_sha256(path).encode())
    return digest.hexdigest()


def code_hash(handler: Path | None = None) -> str:
    """Hash of the code that builds the archive (export, parity, runtime choice) and the code it
    ships (the serving core and the handler)."""
    code = [
        ROOT / "b4serve" / "__init__.py",
        ROOT / "export_torchscript.py",
        *sorted((ROOT / "b4serve" / "serving").glob("*.py")),
        *sorted((ROOT / "b4serve" / "build").glob("*.py")),
    ]
    digest = hashlib.sha256(_contents_hash(code, ROOT).encode())
    digest.update(_file_sha256(handler or ROOT / "handler.py").encode())
    return digest.hexdigest()[:16]


def _setting_value(name: str, value: str) -> str:
    """A setting as it bears on the build: a file or directory by its contents."""
    path = Path(value)
    if name in _PATH_SETTINGS and path.is_file():
        return f"file sha256 {_file_sha256(path)[:16]}"
    if name in _PATH_SETTINGS and path.is_dir():
        return (
            f"dir sha256 {_contents_hash([p for p in path.rglob('*') if p.is_file()], path)[:16]}"
        )
    return value


def archive_identity(checkpoint: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """Everything the archive built from ``checkpoint`` with the settings in ``env`` depends on."""
    settings = {}
    for name, default in ARCHIVE_SETTINGS.items():
        value = env.get(name) or default
        if value is not None:
            settings[name] = _setting_value(name, value)
    if int(env.get("B4_GPUS") or 0) > 0:  # GPU workers: the archive serves TorchScript on them
        settings["B4_GPUS"] = "gpu workers"
    handler = env.get("B4_HANDLER")
    return {
        "checkpoint_sha256": _file_sha256(checkpoint),
        "settings": settings,
        "code": code_hash(Path(handler) if handler else None),
    }


def archive_id(identity: Mapping[str, Any]) -> str:
    """The 12-hex id of an identity: equal identities, equal ids."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m b4serve.build.identity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--record-dir", type=Path, help="write the identity to DIR/<id>.json")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        print(f"error: checkpoint not found: {args.checkpoint}", file=sys.stderr)
        return 1
    try:
        identity = archive_identity(args.checkpoint, os.environ)
    except OSError as error:  # a handler or names file that cannot be read
        print(f"error: {error}", file=sys.stderr)
        return 1
    ident = archive_id(identity)
    if args.record_dir:
        args.record_dir.mkdir(parents=True, exist_ok=True)
        (args.record_dir / f"{ident}.json").write_text(json.dumps(identity, indent=2) + "\n")
    print(ident)
    return 0


if __name__ == "__main__":
    sys.exit(main())
