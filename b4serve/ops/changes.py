"""What a deploy changes, and the one line that says so.

A served version is its build (the archive's id: checkpoint, archive settings, code; see
b4serve.build.identity) plus what TorchServe takes only at registration (batch size, delay,
timeouts). Workers are scaled in place and are no part of it. Each deploy leaves a record of the
version it served, so the next one can name what changed since.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["Built", "DeployRecord", "differences", "served_version", "summary"]

# How the new version's archive came to be: exported and built, the same build packed again
# for a new registration, or already in the model store.
Built = Literal["built", "packed", "stored"]

_LABELS = {
    "batch_size": "batch size",
    "max_batch_delay_ms": "batch delay (ms)",
    "response_timeout_s": "response timeout (s)",
    "initial_workers": "workers",
    "client_timeout_ms": "client timeout (ms)",
}


def served_version(
    archive_id: str, registration: Mapping[str, int], defaults: Mapping[str, int]
) -> str:
    """``archive_id`` when ``registration`` is the defaults, else ``<archive_id>-r<hash>``: the
    same build registered another way is another version, since TorchServe cannot change it."""
    if dict(registration) == dict(defaults):
        return archive_id
    canonical = json.dumps(dict(registration), sort_keys=True)
    return f"{archive_id}-r{hashlib.sha256(canonical.encode()).hexdigest()[:6]}"


@dataclass(frozen=True)
class DeployRecord:
    """What one version was built and registered from."""

    version: str
    archive_id: str
    archive: dict[str, Any]  # b4serve.build.identity's identity
    registration: dict[str, int]

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / f".{self.version}.json.partial"
        partial.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        partial.replace(directory / f"{self.version}.json")

    @classmethod
    def load(cls, directory: Path, version: str) -> DeployRecord | None:
        """The record of ``version``, or None where this host never deployed it."""
        try:
            return cls(**json.loads((directory / f"{version}.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def differences(old: DeployRecord, new: DeployRecord) -> list[str]:
    """Each difference between two records, as ``what old -> new``."""
    found = []
    if old.archive.get("checkpoint_sha256") != new.archive.get("checkpoint_sha256"):
        found.append(
            f"checkpoint {str(old.archive.get('checkpoint_sha256'))[:12]} -> "
            f"{str(new.archive.get('checkpoint_sha256'))[:12]}"
        )
    before, after = old.archive.get("settings", {}), new.archive.get("settings", {})
    for name in sorted(set(before) | set(after)):
        if before.get(name) != after.get(name):
            found.append(
                f"{name} {_short(before.get(name, 'unset'))} -> {_short(after.get(name, 'unset'))}"
            )
    if old.archive.get("code") != new.archive.get("code"):
        found.append("build or serving code changed")
    for name in sorted(set(old.registration) | set(new.registration)):
        if old.registration.get(name) != new.registration.get(name):
            label = _LABELS.get(name, name)
            found.append(f"{label} {old.registration.get(name)} -> {new.registration.get(name)}")
    return found


def summary(
    model: str,
    old: DeployRecord | None,
    old_version: str | None,
    new: DeployRecord,
    outcome: str,
    built: Built,
    retired: list[str],
) -> str:
    """One line: what changed since the version that was serving, and what deploy did."""
    if old_version is None:
        changed = "first deploy"
    elif old is None:
        changed = f"replacing {old_version}, which has no deploy record on this host"
    else:
        changed = ", ".join(differences(old, new)) or "nothing changed"
    if outcome == "unchanged":
        did = "already serving it: nothing to do"
    elif outcome == "scaled":
        did = f"scaled it in place to {new.registration.get('initial_workers')} workers"
    else:
        did = {
            "built": "built it (export, parity, runtime choice, archive)",
            "packed": "packed the same build for the new registration (no rebuild)",
            "stored": "registered the archive already in the model store",
        }[built] + ", rolled it out"
        if retired:
            did += f", retired {', '.join(retired)}"
    return f"{model} {new.version}: {changed}; {did}"
