"""Restart with what was registered: the models of TorchServe's own snapshot.

TorchServe writes a snapshot of its registered models (versions, the default one, workers,
batch settings) to ``{LOG_LOCATION}/config`` on every management change. A restarted server
(by systemd, or by deploy's supervisor on a bare host) starts from config.properties plus the
newest whole snapshot's models, so the same versions come back; a service manager alone would
start it with none.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["latest_snapshot", "prune_snapshots", "restart_config", "snapshot_models"]

# Snapshots kept in {B4_LOG_DIR}/config: TorchServe writes one per management change, forever.
_SNAPSHOTS_KEPT = 20
_SNAPSHOT_NAME = re.compile(r"\d{17}-\w+\.cfg")


def _snapshots(directory: Path) -> list[Path]:
    """TorchServe's snapshot files (``<yyyyMMddHHmmssSSS>-<kind>.cfg``), oldest first."""
    if not directory.is_dir():
        return []
    found = [path for path in directory.glob("*.cfg") if _SNAPSHOT_NAME.fullmatch(path.name)]
    return sorted(found, key=lambda path: path.name[:17])  # by the time in the name, as TS does


def latest_snapshot(directory: Path, since: float = 0.0) -> Path | None:
    """TorchServe's newest whole snapshot among those written at or after ``since`` (epoch s).

    TorchServe writes a snapshot in place, so a frontend killed while writing one leaves it cut
    short (seen: a startup.cfg without its model_snapshot line, after a SIGKILL the moment the
    frontend listened); the one before it is then the newest that says what was registered."""
    recent = [path for path in _snapshots(directory) if path.stat().st_mtime >= since]
    for path in reversed(recent):
        try:
            snapshot_models(path)
        except (ValueError, OSError):  # json.JSONDecodeError is a ValueError
            continue
        return path
    return None


def _java_unescape(value: str) -> str:
    """A value as java.util.Properties.load reads it (Properties.store writes one line per key,
    escaping ``=:#!`` and backslashes, and non-Latin-1 characters as \\uXXXX)."""
    controls = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}

    def replace(match: re.Match[str]) -> str:
        escaped = match.group(1)
        if escaped.startswith("u") and len(escaped) == 5:
            return chr(int(escaped[1:], 16))
        return controls.get(escaped, escaped)

    return re.sub(r"\\(u[0-9a-fA-F]{4}|.)", replace, value)


def snapshot_models(snapshot: Path) -> dict[str, object]:
    """The ``model_snapshot`` TorchServe recorded: models, versions, their settings."""
    for line in snapshot.read_text(encoding="latin-1").splitlines():
        if line.startswith("model_snapshot="):
            models = json.loads(_java_unescape(line.split("=", 1)[1]))
            if not isinstance(models, dict):
                break
            return models
    raise ValueError(f"{snapshot} holds no model_snapshot")


def restart_config(base: Path, snapshot: Path | None, out: Path) -> Path:
    """``base`` (config.properties: every setting) plus the snapshot's models, written to ``out``.

    TorchServe would restore a snapshot file as it is, but its copy of the settings is the one
    it started with, and model_server.py cannot read its escaped vmargs; so config.properties
    stays the source of every setting and the snapshot gives only what was registered.
    """
    text = base.read_text()
    if snapshot is not None:
        compact = json.dumps(snapshot_models(snapshot), separators=(",", ":"))
        # Properties.load reads backslashes as escapes; JSON escapes its own with them.
        text += (
            f"\n# Models registered when the server died: {snapshot.name}\n"
            f"model_snapshot={compact.replace(chr(92), chr(92) * 2)}\n"
        )
    partial = out.with_name(out.name + ".partial")
    partial.write_text(text)
    partial.replace(out)
    return out


def prune_snapshots(directory: Path, keep: int = _SNAPSHOTS_KEPT) -> None:
    for old in _snapshots(directory)[:-keep]:
        old.unlink(missing_ok=True)
