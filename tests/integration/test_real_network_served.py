"""The real ImageNet-trained EfficientNet-Lite0 (efficientnet_pytorch's keys) deployed as a user
deploys it (B4_ARCH=tf_efficientnet_lite0, B4_NUM_CLASSES=1000, B4_CLASS_NAMES from a file, the
runtime chosen on the user's own photos) and sent real photographs as .npy: served equal to its
own module's flip TTA, and it names the cat and the espresso right."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from b4serve.lab.sandbox import Server
from b4serve.lab.user_checkpoints import (
    flip_tta_reference,
    imagenet_names_file,
    real_lite0,
    real_photos,
)
from b4serve.ops.manage import ManagementAPI
from b4serve.serving.archs import INCEPTION_MEAN, INCEPTION_STD

pytestmark = pytest.mark.integration

MODEL = "lite0"
SIZE = 224
CATS = range(281, 286)  # ImageNet's tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture
def lite0(server: Server) -> Iterator[str]:
    yield MODEL
    api = ManagementAPI(server.endpoints, server.keys)
    for version in api.versions(MODEL):
        api.unregister(MODEL, version["modelVersion"], timeout_s=120)


def test_the_real_lite0_is_served_equal_to_its_module_and_names_real_photos(
    server: Server, lite0: str, tmp_path: Path
) -> None:
    checkpoint, module = real_lite0()
    photos = real_photos(SIZE)
    check_images = tmp_path / "photos"  # the runtime choice judges candidates on these
    check_images.mkdir()
    for name, photo in photos.items():
        np.save(check_images / f"{name}.npy", photo)
    deployed = server.deploy(
        "--checkpoint", str(checkpoint),
        B4_MODEL_NAME=lite0, B4_ARCH="tf_efficientnet_lite0", B4_NUM_CLASSES="1000",
        B4_CLASS_NAMES=str(imagenet_names_file()), B4_CHECK_IMAGES=str(check_images),
        B4_RUNTIME="auto",  # the choice, judged on the photos, whatever the session pins
    )  # fmt: skip
    report = [line for line in deployed.stderr.splitlines() if "TTA img/s" in line]
    print("\n[real network] runtime choice on the real photos:\n" + "\n".join(report))
    assert report  # each candidate's max |dp| and top-1 agreement on the photos
    version = ManagementAPI(server.endpoints, server.keys).default_version(lite0)
    assert version is not None
    config = server.classifier(version).config
    assert (config.arch, config.num_classes, config.mean) == (
        "tf_efficientnet_lite0", 1000, INCEPTION_MEAN
    )  # fmt: skip

    served = server.probabilities(list(photos.values()), lite0)
    expected = flip_tta_reference(module, np.stack(list(photos.values())), INCEPTION_MEAN,
                                  INCEPTION_STD)  # fmt: skip
    difference = float(np.abs(served - expected).max())
    top = dict(zip(photos, served.argmax(1).tolist(), strict=True))
    named = {name: config.class_names[index] for name, index in top.items()}
    print(f"[real network] served vs its own module, flip TTA: max |p diff| {difference:.2e}; "
          f"top-1: {named}")  # fmt: skip
    assert difference <= 1e-4
    assert top["chelsea"] in CATS and named["chelsea"] == "Egyptian cat"
    assert top["coffee"] == ESPRESSO and named["coffee"] == "espresso"
