"""The synthetic images that exports and runtimes are checked on, and that the demo model is
trained on: a coloured disc on noise, one colour per class. Deterministic given a seed."""

from __future__ import annotations

import numpy as np

__all__ = ["DEMO_CLASSES", "DEMO_COLOURS", "EXAMPLES_SEED", "generate_images"]

EXAMPLES_SEED = 3  # distinct from the train and test seeds: examples are never trained on

# The class is the disc's colour; names say "demo" so nobody mistakes them for real classes.
DEMO_CLASSES: tuple[str, ...] = (
    "demo_red_blob",
    "demo_green_blob",
    "demo_blue_blob",
    "demo_yellow_blob",
    "demo_cyan_blob",
    "demo_magenta_blob",
)
# RGB of each class's disc, in DEMO_CLASSES order.
DEMO_COLOURS = np.array(
    [[220, 30, 30], [30, 200, 30], [30, 30, 220], [230, 220, 30], [30, 210, 220], [220, 30, 220]],
    dtype=np.int16,
)
DEMO_COLOURS.flags.writeable = False  # a shared constant: nobody may recolour a class
_COLOUR_JITTER = 25  # per-channel shift of a whole disc, so one class is not one exact colour
_TEXTURE = 15  # per-pixel noise inside the disc
_BACKGROUND = (40, 216)  # range of the uniform noise background, per pixel and channel
_RADIUS = (0.15, 0.32)  # disc radius as a fraction of the image side


def generate_images(
    per_class: int, seed: int, size: int = 380, num_classes: int = len(DEMO_CLASSES)
) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of each class as uint8 (N, size, size, 3), and their int64 labels.

    Deterministic given ``seed``. Classes are interleaved (0, 1, ..., 0, 1, ...).
    """
    if per_class < 1 or not 1 <= num_classes <= len(DEMO_COLOURS):
        raise ValueError(
            f"need per_class >= 1 and 1 <= num_classes <= {len(DEMO_COLOURS)}, "
            f"got {per_class} and {num_classes}"
        )
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(num_classes, dtype=np.int64), per_class)
    return np.stack([_draw_blob(rng, int(label), size) for label in labels]), labels


def _draw_blob(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    image = rng.integers(*_BACKGROUND, size=(size, size, 3), endpoint=True, dtype=np.int16)
    radius = rng.uniform(*_RADIUS) * size
    cy, cx = rng.uniform(radius, size - radius, size=2)
    yy, xx = np.ogrid[:size, :size]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    colour = DEMO_COLOURS[label] + rng.integers(
        -_COLOUR_JITTER, _COLOUR_JITTER, size=3, endpoint=True
    )
    texture = rng.integers(-_TEXTURE, _TEXTURE, (int(disc.sum()), 3), endpoint=True, dtype=np.int16)
    image[disc] = colour + texture
    return np.clip(image, 0, 255).astype(np.uint8)
