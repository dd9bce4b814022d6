"""DEMO checkpoint: a random-init EfficientNet whose linear head is fitted to synthetic blobs.

Real weights cannot be downloaded here, so the project ships this stand-in. The backbone keeps its
random (seeded) weights; only the classifier is trained, on pooled features of synthetic images
(one saturated coloured disc on a noise background; the colour is the class, so a horizontal flip
never changes the label). The features are standardised for training and the standardisation is
then folded into the classifier, so ``model(x)`` alone gives the trained logits. It is a demo
model: it knows six colours, nothing about real images.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import pickle
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from b4serve.build.check_images import DEMO_CLASSES, DEMO_COLOURS, EXAMPLES_SEED, generate_images
from b4serve.build.models import classifier_of, create_model, pooled_features
from b4serve.serving.config import ModelConfig
from b4serve.serving.preprocess import Preprocessor, stack_channels_last

__all__ = [
    "CHECKPOINT_NAME",
    "DEMO_CLASSES",
    "DEMO_COLOURS",
    "EXAMPLES_SEED",
    "LABELS_JSON",
    "DemoAccuracyError",
    "DemoBuild",
    "DemoCheckpoint",
    "DemoRecipe",
    "LinearHead",
    "build_demo_model",
    "ensure_demo_checkpoint",
    "evaluate",
    "extract_features",
    "fold_head",
    "generate_images",
    "main",
    "prepare_demo_checkpoint",
    "save_checkpoint",
    "train_head",
    "write_examples",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "demo_checkpoint.pt"
LABELS_JSON = "labels.json"


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that determines the demo checkpoint; a cached file is reused only if it matches.

    Bump ``version`` whenever the generator or the training changes meaning.
    """

    arch: str = "efficientnet_b4"
    image_size: int = 380
    train_per_class: int = 10
    test_per_class: int = 8
    model_seed: int = 20240601
    train_seed: int = 1
    test_seed: int = 2
    weight_decay: float = 1e-2
    head_steps: int = 50
    batch_size: int = 8  # fastest of 4/8/16/24 measured on the 2-core build machine
    min_accuracy: float = 0.90
    version: int = 2  # 2: saved as a state dict (1 pickled the whole module)

    def as_dict(self) -> dict[str, int | float | str]:
        """The recipe as a plain dict, the form stored in the checkpoint."""
        return asdict(self)


class DemoAccuracyError(RuntimeError):
    """The demo model missed its held-out accuracy floor; no checkpoint is written."""


@dataclass(frozen=True)
class LinearHead:
    """Softmax regression on standardised features: ``((x - mean) / std) @ W.T + b``."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """Logits for raw (not yet standardised) pooled features."""
        return F.linear((features - self.mean) / self.std, self.weight, self.bias)


@dataclass(frozen=True)
class DemoBuild:
    """A built demo model and how it did on held-out images."""

    model: nn.Module
    accuracy: float
    mean_confidence: float
    seconds: float


def _demo_config(recipe: DemoRecipe) -> ModelConfig:
    return ModelConfig.for_arch(
        recipe.arch, len(DEMO_CLASSES), DEMO_CLASSES, input_size=recipe.image_size, demo=True
    )


def _batches(
    images: np.ndarray, preprocess: Preprocessor, batch_size: int
) -> Iterator[torch.Tensor]:
    # one batch at a time: 100 float 380x380 images would hold ~170 MB at once
    for start in range(0, len(images), batch_size):
        yield stack_channels_last(
            [preprocess(image) for image in images[start : start + batch_size]]
        )


def extract_features(
    model: nn.Module, images: np.ndarray, config: ModelConfig, batch_size: int = 8
) -> torch.Tensor:
    """Pooled classifier-input features of ``images``, preprocessed exactly as the server does."""
    preprocess = Preprocessor(config)
    chunks = [pooled_features(model, batch) for batch in _batches(images, preprocess, batch_size)]
    return torch.cat(chunks)


def train_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-2,
    steps: int = 50,
) -> LinearHead:
    """Fit softmax regression on standardised ``features`` with full-batch L-BFGS (deterministic).

    The L2 penalty keeps the logits finite on separable data, so held-out probabilities are
    confident without being all exactly 1.
    """
    features = features.detach().double()
    mean = features.mean(0)
    std = features.std(0, unbiased=False).clamp_min(1e-6)  # constant features: avoid 0 division
    inputs = (features - mean) / std
    weight = torch.zeros(num_classes, inputs.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(inputs @ weight.T + bias, labels)
        loss = loss + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearHead(*(t.detach().float() for t in (weight, bias)), mean.float(), std.float())


def fold_head(model: nn.Module, head: LinearHead) -> None:
    """Write ``head`` into the model's classifier: W' = W / std, b' = b - W' @ mean."""
    classifier = classifier_of(model)
    weight = head.weight / head.std
    with torch.no_grad():
        classifier.weight.copy_(weight)
        classifier.bias.copy_(head.bias - weight @ head.mean)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    config: ModelConfig,
    batch_size: int = 8,
) -> tuple[float, float]:
    """Top-1 accuracy and mean top probability of the whole ``model`` on ``images``."""
    probs = torch.cat(
        [model(batch).softmax(1) for batch in _batches(images, Preprocessor(config), batch_size)]
    )
    top_prob, predicted = probs.max(1)
    accuracy = (predicted == torch.from_numpy(labels)).double().mean().item()
    return accuracy, top_prob.double().mean().item()


def build_demo_model(recipe: DemoRecipe) -> DemoBuild:
    """Seeded random backbone, head fitted on train blobs and folded in, checked on test blobs."""
    start = time.perf_counter()
    config = _demo_config(recipe)
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(recipe.model_seed)
        model = create_model(recipe.arch, len(DEMO_CLASSES))
    model = model.to(memory_format=torch.channels_last)  # matches stack_channels_last batches
    log.info("DEMO model: fitting the head of a random-init %s on synthetic blobs", recipe.arch)
    images, labels = generate_images(recipe.train_per_class, recipe.train_seed, recipe.image_size)
    features = extract_features(model, images, config, recipe.batch_size)
    head = train_head(
        features,
        torch.from_numpy(labels),
        len(DEMO_CLASSES),
        recipe.weight_decay,
        recipe.head_steps,
    )
    fold_head(model, head)
    images, labels = generate_images(recipe.test_per_class, recipe.test_seed, recipe.image_size)
    accuracy, confidence = evaluate(model, images, labels, config, recipe.batch_size)
    log.info("DEMO model: held-out top-1 %.3f, mean top probability %.3f", accuracy, confidence)
    if accuracy < recipe.min_accuracy:
        raise DemoAccuracyError(
            f"DEMO model reached held-out top-1 {accuracy:.3f} < {recipe.min_accuracy:.2f} "
            f"({len(labels)} images); the recipe needs more training images"
        )
    model = model.to(memory_format=torch.contiguous_format)  # saved in the default layout
    return DemoBuild(model, accuracy, confidence, time.perf_counter() - start)


def save_checkpoint(path: Path, build: DemoBuild, recipe: DemoRecipe) -> Path:
    """Write the checkpoint atomically (temp file + rename): never a half-written ``path``.

    It holds tensors and plain values only, so it loads with ``weights_only=True``: deploy and
    every test server read it without unpickling code (no ``--trust-checkpoint``).
    """
    checkpoint = {
        "state_dict": build.model.state_dict(),
        "class_names": list(DEMO_CLASSES),
        "demo": True,
        "recipe": recipe.as_dict(),
        # no build time or other run-dependent value: the same recipe gives the same bytes on
        # the same machine, so the content-hash version (deploy's default) stays. Another CPU
        # or thread count sums floats in another order: slightly other weights, other bytes.
        "metrics": _metrics(build),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        tmp = Path(f.name)
        try:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    tmp.chmod(0o644)  # mkstemp makes it owner-only; the server may run as another user
    os.replace(tmp, path)
    return path


def _metrics(build: DemoBuild) -> dict[str, float | str]:
    return {
        "heldout_top1": build.accuracy,
        "heldout_mean_confidence": build.mean_confidence,
        "torch": str(torch.__version__),  # a plain str: TorchVersion would need unpickling
    }


# What a stale, truncated or foreign cache file can raise while being read (an older cache that
# pickled the whole module fails the weights-only load with UnpicklingError: it is rebuilt).
_UNREADABLE = (OSError, RuntimeError, EOFError, pickle.UnpicklingError)


def _cached_metrics(path: Path, recipe: DemoRecipe) -> dict[str, float | str] | None:
    """The cached checkpoint's metrics if ``path`` holds one made by ``recipe``, else None."""
    if not path.is_file():
        return None
    if not zipfile.is_zipfile(path):  # torch.save writes zip files; anything else is not ours
        log.warning("DEMO cache %s is not a checkpoint; rebuilding", path)
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except _UNREADABLE as error:
        log.warning("DEMO cache %s unreadable (%s); rebuilding", path, error)
        return None
    if not isinstance(checkpoint, dict) or checkpoint.get("recipe") != recipe.as_dict():
        log.info("DEMO cache %s was built by another recipe; rebuilding", path)
        return None
    return dict(checkpoint.get("metrics", {}))


@dataclass(frozen=True)
class DemoCheckpoint:
    """Where the demo checkpoint is, whether the cached file was reused, and its build metrics."""

    path: Path
    reused: bool
    metrics: dict[str, float | str]


def prepare_demo_checkpoint(
    cache_dir: Path, recipe: DemoRecipe = DemoRecipe(), *, force: bool = False
) -> DemoCheckpoint:
    """Reuse ``cache_dir/demo_checkpoint.pt`` if ``recipe`` made it, else build and save it."""
    path = Path(cache_dir) / CHECKPOINT_NAME
    metrics = None if force else _cached_metrics(path, recipe)
    if metrics is not None:
        log.info("DEMO checkpoint reused from cache: %s", path)
        return DemoCheckpoint(path, True, metrics)
    build = build_demo_model(recipe)
    save_checkpoint(path, build, recipe)
    log.info("DEMO checkpoint written in %.1f s: %s", build.seconds, path)
    return DemoCheckpoint(path, False, {**_metrics(build), "seconds": round(build.seconds, 1)})


def ensure_demo_checkpoint(
    cache_dir: Path, recipe: DemoRecipe = DemoRecipe(), *, force: bool = False
) -> Path:
    """Path of a demo checkpoint made by ``recipe`` in ``cache_dir``, built only when missing."""
    return prepare_demo_checkpoint(cache_dir, recipe, force=force).path


def write_examples(
    examples_dir: Path, per_class: int = 2, seed: int = EXAMPLES_SEED, size: int = 380
) -> list[Path]:
    """Save ``per_class`` uint8 .npy blobs per class and ``labels.json`` (file -> true class)."""
    examples_dir = Path(examples_dir)
    examples_dir.mkdir(parents=True, exist_ok=True)
    images, labels = generate_images(per_class, seed, size)
    truth: dict[str, dict[str, str | int]] = {}
    paths = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        name = f"{DEMO_CLASSES[label]}_{i // len(DEMO_CLASSES)}.npy"
        np.save(examples_dir / name, image)
        truth[name] = {"class_name": DEMO_CLASSES[label], "index": int(label)}
        paths.append(examples_dir / name)
    (examples_dir / LABELS_JSON).write_text(json.dumps(truth, indent=2) + "\n")
    return paths


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    default_cache = Path(__file__).resolve().parents[2] / ".cache" / "demo"
    parser = argparse.ArgumentParser(
        prog="python -m b4serve.lab.demo",
        description="Build (or reuse) the DEMO checkpoint: a random-init EfficientNet-B4 whose "
        "head knows six synthetic colour blobs. Not a real model.",
    )
    parser.add_argument("--cache-dir", type=Path, default=default_cache)
    parser.add_argument(
        "--examples-dir", type=Path, default=None, help="default: <cache-dir>/examples"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache matches")
    parser.add_argument(
        "--print-path",
        action="store_true",
        help="print only the checkpoint's path on stdout (the report goes to stderr)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build or reuse the demo checkpoint, write examples, print what happened."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    report = functools.partial(print, file=sys.stderr if args.print_path else sys.stdout)
    checkpoint = prepare_demo_checkpoint(args.cache_dir, force=args.force)
    info = checkpoint.metrics
    report(f"DEMO checkpoint (synthetic blobs, NOT a real model): {checkpoint.path}")
    report(
        f"DEMO held-out top-1: {info.get('heldout_top1', float('nan')):.3f} "
        f"(mean top probability {info.get('heldout_mean_confidence', float('nan')):.3f})"
    )
    if checkpoint.reused:
        report("DEMO checkpoint reused from cache")
    else:
        report(f"DEMO build time: {info['seconds']:.1f} s")
    examples_dir = args.examples_dir or args.cache_dir / "examples"
    examples = write_examples(examples_dir)
    report(f"DEMO examples: {len(examples)} .npy files + {LABELS_JSON} in {examples_dir}")
    if args.print_path:
        print(checkpoint.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
