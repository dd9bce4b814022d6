"""The model's serving config: written once at export, read by the handler from the archive."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from b4serve.serving.archs import arch_spec

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "LABELS_FILE",
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "META_FILE",
    "ModelConfig",
]

META_FILE = "model_meta.json"
LABELS_FILE = "index_to_name.json"  # TorchServe's conventional name for the class map
# Largest image we accept, in pixels (H*W): far above any real input to a 380x380 model, small
# enough that one request cannot take the worker's memory.
DEFAULT_MAX_PIXELS = 2048 * 2048
# np.save writes ~128-byte headers; anything far larger is hostile, refused before parsing.
MAX_HEADER_BYTES = 4096
# The largest request body, in bytes, that any path accepts (.npy, KServe JSON, v2 binary): a
# uint8 RGBA image of DEFAULT_MAX_PIXELS as .npy, the largest header included. Images held in
# memory are mostly uint8; every body the frontend holds counts against its memory budget
# (b4serve/ops/budget.py), so float images are accepted up to this size, not up to the pixel
# limit. config.properties' max_request_size is this number (tests keep the two equal).
# magic (6) + version (2) + header length field (<= 4) + header + data
MAX_BODY_BYTES = 12 + MAX_HEADER_BYTES + DEFAULT_MAX_PIXELS * 4


@dataclass(frozen=True)
class ModelConfig:
    """Everything the serving path needs to know about the exported model."""

    arch: str
    num_classes: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]
    max_pixels: int = DEFAULT_MAX_PIXELS
    demo: bool = False
    # Images per forward pass (TTA doubles it). 0: 1 on the CPU, where single images run fastest
    # per image, and the whole server batch on a GPU.
    micro_batch: int = 0
    # Intra-op threads per worker. 0: torch's default (one per core). With N workers on a CPU,
    # cores / N keeps them from fighting over the cores.
    threads: int = 0
    # Freed memory each worker's malloc keeps for reuse, in MiB (b4serve.serving.allocator):
    # forwards reuse pages instead of faulting in new ones. 0 keeps glibc's defaults (the seed's).
    malloc_keep_mb: int = 512
    # Freeze and use channels_last. False reproduces the seed's plain TorchScript (a baseline).
    optimize: bool = True
    # With optimize, on the CPU: oneDNN Graph fuses convolutions with their activations
    # (b4serve.serving.runtime.load_torchscript): faster, for more memory.
    onednn_fusion: bool = True
    # What runs the model file: "torchscript" (model.pt) or "onnxruntime" (model.onnx, CPU).
    runtime: str = "torchscript"
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class names given for {self.num_classes} classes"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0: {self.mean} {self.std}")
        if self.input_size < 1 or self.max_pixels < self.input_size**2:
            raise ValueError(f"bad input_size {self.input_size} or max_pixels {self.max_pixels}")
        if self.micro_batch < 0 or self.threads < 0:
            raise ValueError(
                f"micro_batch and threads must be >= 0: {self.micro_batch}, {self.threads}"
            )
        if not 0 <= self.malloc_keep_mb < 2048:  # mallopt takes a C int of bytes
            raise ValueError(f"malloc_keep_mb must be in [0, 2047]: {self.malloc_keep_mb}")

    @classmethod
    def for_arch(
        cls,
        arch: str,
        num_classes: int,
        class_names: list[str] | tuple[str, ...] | None = None,
        *,
        input_size: int | None = None,
        **settings: Any,
    ) -> ModelConfig:
        """Config for ``arch`` with its native input size and normalisation; ``settings`` are
        the other fields, by name (their defaults are the dataclass's)."""
        spec = arch_spec(arch)
        names = tuple(class_names or (f"class_{i}" for i in range(num_classes)))
        return cls(
            arch=arch,
            num_classes=num_classes,
            input_size=input_size or spec.input_size,
            mean=spec.mean,
            std=spec.std,
            class_names=names,
            **settings,
        )

    def save(self, directory: str | Path) -> list[Path]:
        """Write ``model_meta.json`` and ``index_to_name.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = asdict(self)
        meta.pop("class_names")  # one home: index_to_name.json
        meta_path, labels_path = directory / META_FILE, directory / LABELS_FILE
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        labels = {str(i): name for i, name in enumerate(self.class_names)}
        labels_path.write_text(json.dumps(labels, indent=2) + "\n")
        return [meta_path, labels_path]

    @classmethod
    def load(cls, directory: str | Path) -> ModelConfig:
        """Read the config that :meth:`save` wrote (e.g. from an unpacked model archive)."""
        directory = Path(directory)
        meta = json.loads((directory / META_FILE).read_text())
        labels = json.loads((directory / LABELS_FILE).read_text())
        names = tuple(labels[str(i)] for i in range(len(labels)))
        types = get_type_hints(cls)
        unknown = sorted(set(meta) - set(types))
        if unknown:
            raise ValueError(f"{directory / META_FILE} has unknown fields: {', '.join(unknown)}")
        # JSON gives lists for tuples: each value is converted to its field's declared type
        values = {name: _as_type(types[name], value) for name, value in meta.items()}
        return cls(class_names=names, **values)


def _as_type(declared: Any, value: Any) -> Any:
    kind = get_origin(declared) or declared
    return kind(value) if kind in (tuple, dict, int, float, bool, str) else value
