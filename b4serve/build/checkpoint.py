"""Read a training checkpoint into a fresh, scriptable model, with errors a user can act on."""

from __future__ import annotations

import copy
import hashlib
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from b4serve.build import foreign
from b4serve.build.models import create_model
from b4serve.build.variants import (
    Network,
    VariantError,
    choose_arch,
    closest_scale,
    find_network,
    network_of_module,
    network_of_state_dict,
    shape_differences,
    split_prefix,
)
from b4serve.serving.archs import arch_spec

__all__ = ["GEFFNET", "CheckpointError", "LoadedCheckpoint", "file_sha256", "load_checkpoint"]

_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")
GEFFNET = "gen-efficientnet"


class CheckpointError(Exception):
    """The checkpoint cannot be used; the message says why in one line."""


@dataclass
class LoadedCheckpoint:
    """A model rebuilt from a checkpoint, what it must reproduce, and what the file said."""

    model: nn.Module  # ``arch`` rebuilt scriptable, with the checkpoint's weights, in eval mode
    arch: str
    # What every exported file is proven against: the user's own module (in eval mode) when the
    # checkpoint holds one, else ``model`` itself.
    reference: nn.Module
    user_module: bool = False
    class_names: list[str] | None = None
    demo: bool = False
    extras: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what loading decided by itself
    warning: str | None = None  # an ambiguity that --arch resolves
    library: str = GEFFNET  # whose keys the checkpoint has
    input_size: int | None = None  # the only size the user's module runs as it does (or None)

    @property
    def against(self) -> str:
        """The reference, in words."""
        if self.user_module:
            return "your module"
        return "the eager model rebuilt from your state dict"

    @property
    def mismatch_hint(self) -> str:
        """What a failed proof means, for its message."""
        if self.user_module:
            return (
                f"its layers match {self.arch}, so its forward or some layer computes something "
                "else: no known arch reproduces it"
            )
        return "the export itself went wrong: please report it"


@dataclass
class _Source:
    """The network found in a checkpoint: its weights, and the user's module if there is one."""

    state_dict: dict[str, torch.Tensor]
    network: Network
    module: nn.Module | None = None
    notes: list[str] = field(default_factory=list)
    library: str = GEFFNET
    input_size: int | None = None


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's content (the default model version)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(
    path: str | Path, arch: str | None, num_classes: int, *, trust: bool = False
) -> LoadedCheckpoint:
    """Rebuild the checkpoint's network as ``arch`` (None: the variant the checkpoint shows)
    with ``num_classes`` outputs and load its weights into it strictly.

    Accepts a whole pickled module, bare or under ``"model"`` (the seed's
    ``torch.save({"model": m})``; only with ``trust=True``, since unpickling runs code from the
    file), also one that wraps the network; and state dicts: bare, or under ``"model"``,
    ``"state_dict"`` or ``"model_state_dict"``, with all keys under one prefix (``module.``,
    ``model.``, ...) or none. A module tells its variant (padding, batch-norm eps, size); a state
    dict only its size, so ``arch`` decides between padding variants, with a warning if not given.
    efficientnet_pytorch's modules and state dicts (b4serve.build.foreign) load the same ways.
    """
    if arch is not None:
        arch_spec(arch)  # an unknown arch is refused before anything is read
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    payload = _read(path, trust)
    try:
        source = _source_of(payload, path)
        source_name = "module" if source.module is not None else "state dict"
        if source.network.scale is None and arch is None:
            closest, details = closest_scale(source.state_dict)
            raise CheckpointError(
                f"the checkpoint's {source_name} fits no known arch; nearest is the {closest} "
                f"size: {details}"
            )
        choice = choose_arch(arch, source.network, source=source_name)
    except VariantError as exc:
        raise CheckpointError(str(exc)) from None
    model = create_model(choice.arch, num_classes)
    _load_strictly(model, source.state_dict, choice.arch, num_classes)
    loaded = LoadedCheckpoint(model, choice.arch, reference=model, warning=choice.warning)
    loaded.notes, loaded.library, loaded.input_size = (
        source.notes,
        source.library,
        source.input_size,
    )
    if arch is None and source.module is not None:
        whose = "" if source.library == GEFFNET else f"{source.library} "
        loaded.notes.append(f"your {whose}module is {choice.arch} ({source.network.describe()})")
    if source.module is not None:
        loaded.reference, loaded.user_module = _as_reference(source.module, loaded.notes), True
    if isinstance(payload, dict):
        names = payload.get("class_names")
        loaded.class_names = [str(n) for n in names] if names else None
        loaded.demo = bool(payload.get("demo", False))
        loaded.extras = {k: v for k, v in payload.items() if k in ("recipe", "epoch", "metrics")}
    return loaded


def _read(path: Path, trust: bool) -> Any:
    # torch.save has written zip files since PyTorch 1.6; before, a pickle that starts with
    # protocol 2 and torch's magic number (e.g. the published efficientnet_pytorch weights)
    if not zipfile.is_zipfile(path) and not _is_legacy_torch_file(path):
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


def _is_legacy_torch_file(path: Path) -> bool:
    with open(path, "rb") as stream:
        head = stream.read(13)
    # pickle protocol 2, then the LONG1 opcode of torch's magic number 0x1950a86a20f9469cfc6c
    return head[:4] == b"\x80\x02\x8a\x0a" and head[4:] == bytes.fromhex("6cfc9c46f9206aa850")


def _source_of(payload: Any, path: Path) -> _Source:
    module: nn.Module | None = payload if isinstance(payload, nn.Module) else None
    if isinstance(payload, dict):
        for key in _STATE_DICT_KEYS:
            inner = payload.get(key)
            if isinstance(inner, nn.Module):
                module = inner
                break
            if isinstance(inner, dict) and _is_tensor_dict(inner):
                return _state_dict_source(inner)
        else:
            if _is_tensor_dict(payload):
                return _state_dict_source(payload)
    if module is not None:
        found = foreign.find_efficientnet_pytorch(module)
        if found is not None:
            return _efficientnet_pytorch_module_source(module, *found)
    if module is None:
        raise CheckpointError(
            f"{path} holds no model: expected a module or state dict, bare or under "
            f"{'/'.join(repr(k) for k in _STATE_DICT_KEYS)}; found {type(payload).__name__}"
            + (f" with keys {sorted(payload)[:8]}" if isinstance(payload, dict) else "")
        )
    where, network = find_network(module)
    notes = []
    if where:
        notes.append(
            f"using the gen-efficientnet network at {where!r} inside your "
            f"{type(module).__name__} (key prefix {where + '.'!r} stripped)"
        )
    return _Source(network.state_dict(), network_of_module(network), module, notes)


def _state_dict_source(state_dict: dict[str, torch.Tensor]) -> _Source:
    if foreign.is_efficientnet_pytorch(state_dict):
        return _efficientnet_pytorch_state_dict_source(state_dict)
    prefix, stripped = split_prefix(state_dict)
    notes = [f"stripped the key prefix {prefix!r} from the state dict"] if prefix else []
    return _Source(stripped, network_of_state_dict(stripped), notes=notes)


def _efficientnet_pytorch_state_dict_source(state_dict: dict[str, torch.Tensor]) -> _Source:
    prefix, stripped = split_prefix(state_dict, foreign.STEM_KEY, foreign.LIBRARY)
    notes = [f"stripped the key prefix {prefix!r} from the state dict"] if prefix else []
    converted = foreign.to_geffnet_keys(stripped)
    notes.append(f"{foreign.LIBRARY} keys mapped onto gen-efficientnet's, one to one")
    network = foreign.network_of_efficientnet_pytorch(converted)
    return _Source(converted, network, notes=notes, library=foreign.LIBRARY)


def _efficientnet_pytorch_module_source(
    module: nn.Module, where: str, network: nn.Module
) -> _Source:
    notes = []
    if where:
        notes.append(
            f"using the {foreign.LIBRARY} network at {where!r} inside your "
            f"{type(module).__name__} (key prefix {where + '.'!r} stripped)"
        )
    converted = foreign.to_geffnet_keys(network.state_dict())
    described = foreign.network_of_efficientnet_pytorch(converted, network)
    size = foreign.input_size_of(network)
    if size is not None:
        notes.append(f"your module's 'same' padding is computed for {size} px: served at {size} px")
    return _Source(converted, described, module, notes, foreign.LIBRARY, size)


def _as_reference(module: nn.Module, notes: list[str]) -> nn.Module:
    """The user's module as the proof runs it: in eval mode, on the CPU, in float32."""
    dtypes = {t.dtype for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()}
    if dtypes - {torch.float32}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        notes.append(f"your module holds {names} weights: exported and proven in float32")
        module = copy.deepcopy(module).float()
    return module.eval()


def _is_tensor_dict(candidate: dict) -> bool:
    return bool(candidate) and all(isinstance(v, torch.Tensor) for v in candidate.values())


def _load_strictly(
    model: nn.Module, state_dict: dict[str, torch.Tensor], arch: str, num_classes: int
) -> None:
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state_dict.items()}
    count, details = shape_differences(expected, found)
    if not count:
        model.load_state_dict(state_dict, strict=True)
        return
    head = found.get("classifier.weight")
    if (
        head is not None
        and head[0] != num_classes
        and not shape_differences(_backbone(expected), _backbone(found))[0]
    ):
        raise CheckpointError(
            f"checkpoint has {head[0]} classes but --num-classes is {num_classes}"
        )
    raise CheckpointError(f"checkpoint does not match {arch} with {num_classes} classes: {details}")


def _backbone(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {key: shape for key, shape in shapes.items() if not key.startswith("classifier.")}
