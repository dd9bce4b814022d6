"""The model's serving config: written once at export, read by the handler from the archive."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from b4serve.serving.archs import ARCHS, BN_EPS_PYTORCH, PADDINGS, SYMMETRIC, arch_spec

__all__ = [
    "DEFAULT_GPU_BUCKETS",
    "DEFAULT_MAX_IMAGES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_REQUEST_PIXELS",
    "GPU_PRECISIONS",
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
# One request's images (a v2 batch, v1 instances, BYTES elements) and their pixels, counted
# from shapes and headers before anything is decoded: each image costs a forward (two with TTA)
# and a float32 tensor at the model's size, so these bound one request's work. 32 images: a CPU
# server batch of 4 such requests is 128 TTA forwards, about 61 s on the slowest CPU measured
# (2.1 TTA img/s, 2 AVX2-only cores), inside the 120-s response timeout, so a heavy request never
# gets its batch's worker killed; 4x the per-image limit is a body of the byte limit's worth of
# grey uint8 pixels (MAX_BODY_BYTES allows no more on any path), so no real client meets either.
DEFAULT_MAX_IMAGES = 32
DEFAULT_MAX_REQUEST_PIXELS = 4 * DEFAULT_MAX_PIXELS
# np.save writes ~128-byte headers; anything far larger is hostile, refused before parsing.
MAX_HEADER_BYTES = 4096
# Weights and inputs on a GPU (b4serve.serving.gpu); the CPU always runs float32.
GPU_PRECISIONS = ("fp16", "bf16", "fp32")
# Forward sizes on a GPU: a batch is padded up to the next one, so each worker compiles and
# autotunes a handful of shapes at warm-up instead of one per batch size it ever sees.
DEFAULT_GPU_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
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
    # The network's padding and batch-norm eps (b4serve.serving.archs): baked into the model
    # file at export, recorded so that the archive says which variant it serves.
    padding: str = SYMMETRIC
    bn_eps: float = BN_EPS_PYTORCH
    max_pixels: int = DEFAULT_MAX_PIXELS
    # One request's limits (DEFAULT_MAX_IMAGES): over either, the request gets 413 undecoded.
    max_images: int = DEFAULT_MAX_IMAGES
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
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
    # What runs the model (b4serve.serving.runtime.RUNTIMES): "torchscript" (fp32, model.pt),
    # "torchscript-bf16", "openvino" or "onnxruntime" (model.onnx). Export's --runtime auto
    # writes the fastest that passed its parity check on the build host.
    runtime: str = "torchscript"
    # On a GPU, with optimize: the precision of weights and inputs (probabilities come back as
    # float32), and the forward sizes batches are padded to (b4serve.serving.gpu).
    gpu_precision: str = "fp16"
    gpu_buckets: tuple[int, ...] = DEFAULT_GPU_BUCKETS
    # OpenVINO's inference precision as its parity check ran: "bf16" (run where the CPU plugin
    # reports BF16, fp32 elsewhere) or "fp32" (always).
    openvino_precision: str = "fp32"
    # OpenVINO's performance hint: LATENCY (one stream on every core: one forward at a time, as
    # the handler runs them) or THROUGHPUT (a stream per core or two, the images of a forward
    # spread over them); streams: 0 leaves the count to the hint.
    openvino_hint: str = "LATENCY"
    openvino_streams: int = 0
    # How the runtime was chosen, for people: auto or pinned, the build host's CPU, and each
    # candidate's parity against fp32 TorchScript and its speed (b4serve.build.runtimes).
    runtime_choice: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class names given for {self.num_classes} classes"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0: {self.mean} {self.std}")
        if self.padding not in PADDINGS or not self.bn_eps > 0:
            raise ValueError(
                f"padding must be one of {', '.join(PADDINGS)} and bn_eps > 0: "
                f"{self.padding!r}, {self.bn_eps}"
            )
        known = ARCHS.get(self.arch)
        if known is not None and (self.padding, self.bn_eps) != (known.padding, known.bn_eps):
            raise ValueError(
                f"{self.arch} has {known.padding} padding and batch-norm eps {known.bn_eps:g}, "
                f"not {self.padding} and {self.bn_eps:g}"
            )
        if self.input_size < 1 or self.max_pixels < self.input_size**2:
            raise ValueError(f"bad input_size {self.input_size} or max_pixels {self.max_pixels}")
        if self.max_images < 1 or self.max_request_pixels < self.max_pixels:
            raise ValueError(
                f"max_images must be >= 1 and max_request_pixels >= max_pixels: "
                f"{self.max_images}, {self.max_request_pixels}"
            )
        if self.micro_batch < 0 or self.threads < 0:
            raise ValueError(
                f"micro_batch and threads must be >= 0: {self.micro_batch}, {self.threads}"
            )
        if self.gpu_precision not in GPU_PRECISIONS:
            raise ValueError(
                f"gpu_precision must be one of {', '.join(GPU_PRECISIONS)}: {self.gpu_precision!r}"
            )
        buckets = self.gpu_buckets
        if not buckets or min(buckets) < 1 or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"gpu_buckets must be increasing sizes >= 1: {buckets}")
        if self.openvino_precision not in ("bf16", "fp32"):
            raise ValueError(f"openvino_precision must be bf16 or fp32: {self.openvino_precision}")
        if self.openvino_hint not in ("LATENCY", "THROUGHPUT") or self.openvino_streams < 0:
            raise ValueError(
                f"openvino_hint must be LATENCY or THROUGHPUT and openvino_streams >= 0: "
                f"{self.openvino_hint}, {self.openvino_streams}"
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
            padding=spec.padding,
            bn_eps=spec.bn_eps,
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
