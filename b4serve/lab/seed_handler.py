"""The seed's handler, written after its description: the benchmark's baseline, never served.

A plain TorchServe ``BaseHandler``: BaseHandler loads the plain scripted model; each body is
``np.load``-ed (PIL-free here), scaled to [0, 1], resized, normalised; the batch runs twice,
as is and mirrored (TTA as two forwards); the two softmaxes are averaged. There are no
per-request errors: one bad body fails its whole batch, as the seed's did. None of
b4serve's optimisations (frozen graph, channels_last, oneDNN fusion, one-pass TTA, zero-copy
decode, malloc reuse, GC freeze) is here.

``scripts/build_mar.sh`` packs it with ``B4_HANDLER=b4serve/lab/seed_handler.py``; the bench
calls :func:`preprocess_body` and :func:`two_pass_tta` in-process for the seed's ceiling. It
reads the archive's ``model_meta.json`` for the input size and normalisation, so it feeds the
model what ours does.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ts.torch_handler.base_handler import BaseHandler


def preprocess_body(body: bytes, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """One ``.npy`` body -> a normalised 3 x size x size tensor, the plain way."""
    array = np.load(io.BytesIO(body), allow_pickle=False)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    image = torch.from_numpy(array[:, :, :3].astype(np.float32))
    if array.dtype == np.uint8:
        image = image / 255.0
    image = image.permute(2, 0, 1).unsqueeze(0)
    image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True)[0]
    return (image - mean[:, None, None]) / std[:, None, None]


def two_pass_tta(model: Any, batch: torch.Tensor) -> torch.Tensor:
    """Mean of the softmaxes of the batch and of its mirror, one forward each."""
    with torch.no_grad():
        plain = torch.softmax(model(batch), dim=1)
        mirrored = torch.softmax(model(torch.flip(batch, dims=[3])), dim=1)
    return (plain + mirrored) / 2


class SeedHandler(BaseHandler):
    """The seed's handler: BaseHandler's loading, plain preprocessing, two-pass TTA."""

    def initialize(self, context: Any) -> None:
        super().initialize(context)  # loads the serialized TorchScript file, eval mode
        model_dir = context.system_properties["model_dir"]
        with open(os.path.join(model_dir, "model_meta.json")) as meta_file:
            meta = json.load(meta_file)
        self.size = int(meta["input_size"])
        self.mean = torch.tensor(meta["mean"], dtype=torch.float32)
        self.std = torch.tensor(meta["std"], dtype=torch.float32)

    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        bodies = [row.get("data") or row.get("body") for row in data]
        return torch.stack([preprocess_body(b, self.size, self.mean, self.std) for b in bodies])

    def inference(self, data: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return two_pass_tta(self.model, data.to(self.device))

    def postprocess(self, data: torch.Tensor) -> list[list[float]]:
        return data.tolist()
