"""The DEMO checkpoint: generator, head folding, cache reuse, examples, CLI; one real B4 build."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from b4serve.build.checkpoint import load_checkpoint
from b4serve.build.models import create_model, pooled_features
from b4serve.lab import demo
from b4serve.lab.demo import (
    DEMO_CLASSES,
    DEMO_COLOURS,
    DemoAccuracyError,
    DemoRecipe,
    ensure_demo_checkpoint,
    extract_features,
    fold_head,
    generate_images,
    prepare_demo_checkpoint,
    train_head,
    write_examples,
)
from b4serve.serving.config import ModelConfig
from b4serve.serving.preprocess import Preprocessor, stack_channels_last

# b0 at 64 px and a handful of images: a whole build in about a second.
TINY = DemoRecipe(
    arch="efficientnet_b0",
    image_size=64,
    train_per_class=2,
    test_per_class=1,
    min_accuracy=0.0,
    head_steps=20,
)


def colour_oracle(image: np.ndarray) -> int:
    """The class whose disc colour most pixels match; disc pixels stray at most 40 per channel."""
    pixels = image.reshape(-1, 1, 3).astype(np.int16)
    close = np.abs(pixels - DEMO_COLOURS[None]).max(axis=2) <= 40
    return int(close.sum(axis=0).argmax())


def tiny_config() -> ModelConfig:
    return ModelConfig.for_arch("efficientnet_b0", 6, DEMO_CLASSES, input_size=64, demo=True)


def batch_of(images: np.ndarray, config: ModelConfig) -> torch.Tensor:
    preprocess = Preprocessor(config)
    return stack_channels_last([preprocess(image) for image in images])


@pytest.fixture
def build_counter(monkeypatch: pytest.MonkeyPatch) -> list[DemoRecipe]:
    """Record every real build that ``prepare_demo_checkpoint`` triggers."""
    builds: list[DemoRecipe] = []
    real_build = demo.build_demo_model

    def counting_build(recipe: DemoRecipe) -> demo.DemoBuild:
        builds.append(recipe)
        return real_build(recipe)

    monkeypatch.setattr(demo, "build_demo_model", counting_build)
    return builds


def test_generator_is_deterministic_given_seed() -> None:
    images, labels = generate_images(2, seed=7, size=64)
    again, labels_again = generate_images(2, seed=7, size=64)
    other, _ = generate_images(2, seed=8, size=64)

    assert images.dtype == np.uint8 and images.shape == (12, 64, 64, 3)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5] * 2
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, labels_again)
    assert not np.array_equal(images, other)


def test_generator_labels_are_the_disc_colour_and_survive_horizontal_flip() -> None:
    images, labels = generate_images(3, seed=11, size=96)

    assert [colour_oracle(image) for image in images] == labels.tolist()
    assert [colour_oracle(image[:, ::-1]) for image in images] == labels.tolist()
    assert all(name.startswith("demo_") for name in DEMO_CLASSES) and len(DEMO_CLASSES) == 6


def test_train_head_is_deterministic_and_fits_training_features() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat(4)
    features = 1e-5 * (torch.randn(24, 40, generator=generator) + labels[:, None])

    head = train_head(features, labels, 6, steps=30)
    again = train_head(features, labels, 6, steps=30)

    torch.testing.assert_close(head.weight, again.weight, rtol=0, atol=0)
    assert head(features).argmax(1).tolist() == labels.tolist()
    # standardisation undoes the 1e-5 scale: the head sees unit-variance inputs
    torch.testing.assert_close(
        ((features - head.mean) / head.std).std(0, unbiased=False),
        torch.ones(40),
        rtol=1e-3,
        atol=1e-3,
    )


def test_folded_classifier_gives_the_head_logits_on_standardised_features() -> None:
    config = tiny_config()
    torch.manual_seed(0)
    model = create_model("efficientnet_b0", 6)
    train, train_labels = generate_images(2, seed=1, size=64)
    test, _ = generate_images(1, seed=2, size=64)
    head = train_head(extract_features(model, train, config), torch.from_numpy(train_labels), 6)
    batch = batch_of(test, config)
    expected = head(pooled_features(model, batch))

    fold_head(model, head)
    with torch.inference_mode():
        folded = model(batch)

    assert expected.abs().max() > 1.0  # a trained head, not near-zero logits
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-4)


def test_cache_is_reused_and_a_recipe_change_rebuilds(
    tmp_path: Path, build_counter: list[DemoRecipe]
) -> None:
    built = prepare_demo_checkpoint(tmp_path, TINY)
    path = built.path
    first_mtime = path.stat().st_mtime_ns
    reused = prepare_demo_checkpoint(tmp_path, TINY)

    assert build_counter == [TINY]
    assert reused.reused and reused.path == path and path.stat().st_mtime_ns == first_mtime
    # the reused file's record is the build's own (build time aside, which is not stored)
    assert reused.metrics == {k: v for k, v in built.metrics.items() if k != "seconds"}

    changed = DemoRecipe(**{**TINY.as_dict(), "model_seed": TINY.model_seed + 1})
    assert prepare_demo_checkpoint(tmp_path, changed).reused is False
    assert prepare_demo_checkpoint(tmp_path, changed, force=True).reused is False
    assert build_counter == [TINY, changed, changed]
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo.CHECKPOINT_NAME]  # no temp files


def test_checkpoint_holds_the_model_classes_and_recipe(tmp_path: Path) -> None:
    path = ensure_demo_checkpoint(tmp_path, TINY)
    checkpoint = torch.load(path, weights_only=True)  # tensors and plain values: no unpickling
    loaded = load_checkpoint(path, "efficientnet_b0", 6)  # as export does it, without trust
    images, labels = generate_images(1, seed=TINY.test_seed, size=64)

    with torch.inference_mode():
        probs = loaded.model.eval()(batch_of(images, tiny_config())).softmax(1)

    assert loaded.demo is True and loaded.class_names == list(DEMO_CLASSES)
    assert checkpoint["class_names"] == list(DEMO_CLASSES)
    assert checkpoint["recipe"] == TINY.as_dict()
    # the saved model reproduces the held-out accuracy the build measured
    accuracy = (probs.argmax(1) == torch.from_numpy(labels)).double().mean().item()
    assert accuracy == pytest.approx(checkpoint["metrics"]["heldout_top1"])


def test_unreadable_cache_file_is_rebuilt(tmp_path: Path, build_counter: list[DemoRecipe]) -> None:
    (tmp_path / demo.CHECKPOINT_NAME).write_bytes(b"half a checkpoint")

    result = prepare_demo_checkpoint(tmp_path, TINY)

    assert result.reused is False and build_counter == [TINY]
    assert torch.load(result.path, weights_only=True)["recipe"] == TINY.as_dict()


class _RunsCodeWhenUnpickled:
    """Unpickling this creates ``marker``: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def test_a_cache_file_holding_pickled_code_is_rebuilt_without_running_it(
    tmp_path: Path, build_counter: list[DemoRecipe]
) -> None:
    # what an older cache (a whole pickled module) or a planted file looks like to the loader
    marker = tmp_path / "code-ran"
    torch.save({"model": _RunsCodeWhenUnpickled(marker), "recipe": TINY.as_dict(), "demo": True},
               tmp_path / demo.CHECKPOINT_NAME)  # fmt: skip

    result = prepare_demo_checkpoint(tmp_path, TINY)

    assert result.reused is False and build_counter == [TINY]
    assert not marker.exists()
    load_checkpoint(result.path, "efficientnet_b0", 6)  # the rebuilt file needs no trust
    assert not marker.exists()


def test_interrupted_save_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def dying_save(obj: object, f: object) -> None:
        f.write(b"PK partial")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(demo.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_checkpoint(tmp_path, TINY)

    assert list(tmp_path.iterdir()) == []


def test_build_below_accuracy_floor_raises_and_writes_nothing(tmp_path: Path) -> None:
    impossible = DemoRecipe(**{**TINY.as_dict(), "min_accuracy": 1.01})

    with pytest.raises(DemoAccuracyError, match="held-out top-1"):
        ensure_demo_checkpoint(tmp_path, impossible)

    assert list(tmp_path.iterdir()) == []


def test_examples_are_written_with_their_true_labels(tmp_path: Path) -> None:
    paths = write_examples(tmp_path / "examples", per_class=2, size=64)
    labels = json.loads((tmp_path / "examples" / demo.LABELS_JSON).read_text())

    assert len(paths) == 12 and sorted(labels) == sorted(p.name for p in paths)
    for path in paths:
        image = np.load(path, allow_pickle=False)
        truth = labels[path.name]
        assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
        assert "demo" in path.name and truth["class_name"] in path.name
        assert DEMO_CLASSES[truth["index"]] == truth["class_name"]
        assert colour_oracle(image) == truth["index"]


def test_cli_builds_then_reuses_and_says_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_build = demo.build_demo_model
    # the CLI builds the B4 recipe; stand in a tiny build so the CLI wiring is tested in seconds
    monkeypatch.setattr(demo, "build_demo_model", lambda recipe: real_build(TINY))
    args = ["--cache-dir", str(tmp_path / "cache"), "--examples-dir", str(tmp_path / "ex")]

    assert demo.main(args) == 0
    built = capsys.readouterr().out
    assert demo.main(args) == 0
    reused = capsys.readouterr().out

    assert "DEMO build time" in built and "NOT a real model" in built
    assert str(tmp_path / "cache" / demo.CHECKPOINT_NAME) in built
    assert "DEMO checkpoint reused from cache" in reused and "DEMO build time" not in reused
    assert len(list((tmp_path / "ex").glob("demo_*.npy"))) == 12


def test_real_b4_demo_checkpoint_is_accurate_and_confident_with_flip_tta() -> None:
    # the checkout's cache, as deploy.sh uses it: built here on a fresh clone, reused afterwards
    cache = Path(demo.__file__).resolve().parents[2] / ".cache" / "demo"
    loaded = load_checkpoint(ensure_demo_checkpoint(cache), "efficientnet_b4", 6)
    model = loaded.model.eval()
    images, labels = generate_images(2, seed=demo.EXAMPLES_SEED)  # never trained on
    config = ModelConfig.for_arch("efficientnet_b4", 6, DEMO_CLASSES, demo=True)
    batch = batch_of(images, config)

    with torch.inference_mode():
        probs = (model(batch).softmax(1) + model(batch.flip(3)).softmax(1)) / 2

    assert loaded.extras["metrics"]["heldout_top1"] >= 0.90
    assert (probs.argmax(1) == torch.from_numpy(labels)).double().mean().item() >= 0.90
    assert probs.max(1).values.mean().item() > 0.8  # confident, far from uniform (1/6)


BUILD_TINY = """
import sys
from pathlib import Path
from b4serve.lab.demo import DemoRecipe, ensure_demo_checkpoint
recipe = DemoRecipe(**{**DemoRecipe().as_dict(), **eval(sys.argv[2])})
print(ensure_demo_checkpoint(Path(sys.argv[1]), recipe))
"""


def test_same_recipe_gives_the_same_checkpoint_bytes_in_a_fresh_process(tmp_path: Path) -> None:
    # deploy's default version is the checkpoint's content hash: it must not change per build.
    # One build runs in an interpreter of its own (other hash seed), as a later deploy would.
    # (Same machine only: another thread count or CPU gives other float sums, so other bytes.)
    overrides = repr({k: v for k, v in TINY.as_dict().items() if k != "version"})
    built = subprocess.run(
        [sys.executable, "-c", BUILD_TINY, str(tmp_path / "fresh"), overrides],
        capture_output=True, text=True, check=True, cwd=Path(demo.__file__).parents[2],
        env={**os.environ, "PYTHONHASHSEED": "7"},
    )  # fmt: skip
    fresh = Path(built.stdout.strip()).read_bytes()
    here = ensure_demo_checkpoint(tmp_path / "here", TINY).read_bytes()
    assert hashlib.sha256(fresh).hexdigest() == hashlib.sha256(here).hexdigest()
