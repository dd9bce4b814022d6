"""Read a training checkpoint into a fresh, scriptable model, with errors a user can act on."""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from b4serve.ops.models import create_model

__all__ = ["CheckpointError", "LoadedCheckpoint", "file_sha256", "load_checkpoint"]

_STATE_DICT_KEYS = ("model", "state_dict")


class CheckpointError(Exception):
    """The checkpoint cannot be used; the message says why in one line."""


@dataclass
class LoadedCheckpoint:
    """A model rebuilt from a checkpoint, plus what the checkpoint said about itself."""

    model: nn.Module
    class_names: list[str] | None = None
    demo: bool = False
    extras: dict[str, Any] = field(default_factory=dict)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's content (the default model version)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(
    path: str | Path, arch: str, num_classes: int, *, trust: bool = False
) -> LoadedCheckpoint:
    """Build ``arch`` with ``num_classes`` and load the checkpoint's weights into it strictly.

    Accepts a whole pickled module under ``"model"`` (the seed's ``torch.save({"model": m})``;
    only with ``trust=True``, since unpickling runs code from the file) and plain state dicts:
    bare, or under ``"model"``/``"state_dict"``, with or without DataParallel's ``module.``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    payload = _read(path, trust)
    state_dict = _state_dict_of(payload, path)
    model = create_model(arch, num_classes)
    _load_strictly(model, state_dict, arch, num_classes)
    loaded = LoadedCheckpoint(model=model)
    if isinstance(payload, dict):
        names = payload.get("class_names")
        loaded.class_names = [str(n) for n in names] if names else None
        loaded.demo = bool(payload.get("demo", False))
        loaded.extras = {k: v for k, v in payload.items() if k in ("recipe", "epoch", "metrics")}
    return loaded


def _read(path: Path, trust: bool) -> Any:
    if not zipfile.is_zipfile(path):  # torch.save has written zip files since PyTorch 1.6
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint (not a zip file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint") from None
        if not trust:
            raise CheckpointError(
                f"{path} holds pickled Python objects (e.g. a whole module under 'model'); "
                "loading it runs code from the file: pass --trust-checkpoint if you trust it"
            ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint ({exc})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any error unpickling user code: report it in one line
        raise CheckpointError(f"cannot unpickle {path}: {type(exc).__name__}: {exc}") from None


def _state_dict_of(payload: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(payload, nn.Module):
        return payload.state_dict()
    if isinstance(payload, dict):
        for key in _STATE_DICT_KEYS:
            inner = payload.get(key)
            if isinstance(inner, nn.Module):
                return inner.state_dict()
            if isinstance(inner, dict) and _is_tensor_dict(inner):
                return _strip_prefix(inner)
        if _is_tensor_dict(payload):
            return _strip_prefix(payload)
    raise CheckpointError(
        f"{path} holds no model: expected a module or state dict, bare or under "
        f"'model'/'state_dict'; found {type(payload).__name__}"
        + (f" with keys {sorted(payload)[:8]}" if isinstance(payload, dict) else "")
    )


def _is_tensor_dict(candidate: dict) -> bool:
    return bool(candidate) and all(isinstance(v, torch.Tensor) for v in candidate.values())


def _strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "module."  # nn.DataParallel / DistributedDataParallel wrap every key
    if all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def _load_strictly(
    model: nn.Module, state_dict: dict[str, torch.Tensor], arch: str, num_classes: int
) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{key}: expected {tuple(expected[key].shape)}, found {tuple(state_dict[key].shape)}"
        for key in expected
        if key in state_dict and expected[key].shape != state_dict[key].shape
    ]
    head = state_dict.get("classifier.weight")
    if not unexpected and not missing and head is not None and head.shape[0] != num_classes:
        raise CheckpointError(
            f"checkpoint has {head.shape[0]} classes but --num-classes is {num_classes}"
        )
    if missing or unexpected or wrong:
        details = "; ".join(
            part
            for part in (
                f"{len(wrong)} shape mismatches, first {wrong[0]}" if wrong else "",
                f"{len(missing)} missing keys, first {missing[0]}" if missing else "",
                f"{len(unexpected)} unexpected keys, first {unexpected[0]}" if unexpected else "",
            )
            if part
        )
        raise CheckpointError(
            f"checkpoint does not match {arch} with {num_classes} classes: {details}"
        )
    model.load_state_dict(state_dict, strict=True)
