"""A build's id changes with the checkpoint's bytes, every archive setting and the serving code,
and with nothing else: the same checkpoint and settings are the same build."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from b4serve.build import identity
from b4serve.build.identity import ARCHIVE_SETTINGS, archive_id, archive_identity

# A value other than the default for each archive setting.
CHANGED = {
    "B4_ARCH": "tf_efficientnet_b4",
    "B4_NUM_CLASSES": "7",
    "B4_CLASS_NAMES": "a,b,c,d,e,f",
    "B4_INPUT_SIZE": "300",
    "B4_MICRO_BATCH": "4",
    "B4_THREADS": "1",
    "B4_MALLOC_KEEP_MB": "0",
    "B4_OPTIMIZE": "0",
    "B4_ONEDNN_FUSION": "0",
    "B4_RUNTIME": "torchscript",
    "B4_CHECK_IMAGES": "/nonexistent/images",
    "B4_REDUCED_TOLERANCE": "0.01",
    "B4_OPENVINO_HINT": "THROUGHPUT",
    "B4_OPENVINO_STREAMS": "2",
    "B4_GPU_PRECISION": "bf16",
    "B4_GPU_PARITY": "require",
    "B4_HANDLER": str(identity.ROOT / "b4serve" / "lab" / "seed_handler.py"),
}


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt.pth"
    path.write_bytes(b"weights " * 100)
    return path


def ident(checkpoint: Path, **env: str) -> str:
    return archive_id(archive_identity(checkpoint, env))


def test_every_archive_setting_has_a_changed_value_here() -> None:
    assert set(CHANGED) == set(ARCHIVE_SETTINGS)


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_each_archive_setting_changes_the_build(checkpoint: Path, name: str) -> None:
    assert ident(checkpoint, **{name: CHANGED[name]}) != ident(checkpoint)


def test_the_same_checkpoint_and_settings_are_the_same_build(checkpoint: Path) -> None:
    settings = {"B4_ARCH": "tf_efficientnet_b4", "B4_RUNTIME": "openvino"}
    assert ident(checkpoint, **settings) == ident(checkpoint, **settings)
    # a default given explicitly is the default
    assert ident(checkpoint, B4_NUM_CLASSES="6", B4_RUNTIME="auto") == ident(checkpoint)


def test_gpu_workers_are_another_build_whatever_their_count(checkpoint: Path) -> None:
    assert ident(checkpoint, B4_GPUS="0") == ident(checkpoint)
    assert ident(checkpoint, B4_GPUS="1") == ident(checkpoint, B4_GPUS="8") != ident(checkpoint)


def test_registration_settings_and_the_path_of_the_checkpoint_are_not_the_build(
    checkpoint: Path, tmp_path: Path
) -> None:
    registration = {"B4_BATCH_SIZE": "8", "B4_INITIAL_WORKERS": "2", "B4_RESPONSE_TIMEOUT": "9"}
    assert ident(checkpoint, **registration) == ident(checkpoint)
    copy = tmp_path / "elsewhere.pth"
    shutil.copy(checkpoint, copy)
    assert ident(copy) == ident(checkpoint)
    copy.write_bytes(checkpoint.read_bytes() + b"\0")
    assert ident(copy) != ident(checkpoint)


def test_a_file_setting_is_its_contents_not_its_path(checkpoint: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("cat\ndog\n")
    second.write_text("cat\ndog\n")
    assert ident(checkpoint, B4_CLASS_NAMES=str(first)) == ident(
        checkpoint, B4_CLASS_NAMES=str(second)
    )
    second.write_text("cat\nwolf\n")
    assert ident(checkpoint, B4_CLASS_NAMES=str(first)) != ident(
        checkpoint, B4_CLASS_NAMES=str(second)
    )
    images = tmp_path / "images"
    images.mkdir()
    (images / "one.npy").write_bytes(b"1")
    before = ident(checkpoint, B4_CHECK_IMAGES=str(images))
    (images / "two.npy").write_bytes(b"2")
    assert ident(checkpoint, B4_CHECK_IMAGES=str(images)) != before


def test_a_change_to_the_build_or_serving_code_is_a_new_build(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "checkout"
    for stage in ("serving", "build"):
        shutil.copytree(identity.ROOT / "b4serve" / stage, root / "b4serve" / stage)
    shutil.copy(identity.ROOT / "export_torchscript.py", root / "export_torchscript.py")
    shutil.copy(identity.ROOT / "b4serve" / "__init__.py", root / "b4serve" / "__init__.py")
    shutil.copy(identity.ROOT / "handler.py", root / "handler.py")
    monkeypatch.setattr(identity, "ROOT", root)
    seen = {ident(checkpoint)}
    for changed in ("b4serve/serving/tta.py", "b4serve/build/parity.py", "handler.py"):
        with (root / changed).open("a") as source:
            source.write("\n# a change\n")
        seen.add(ident(checkpoint))
    assert len(seen) == 4


def test_the_cli_prints_the_id_and_keeps_the_identity(checkpoint: Path, tmp_path: Path) -> None:
    records = tmp_path / "identity"
    printed = subprocess.run(
        [sys.executable, "-m", "b4serve.build.identity", "--checkpoint", str(checkpoint),
         "--record-dir", str(records)],
        capture_output=True, text=True, check=True, env={"B4_ARCH": "efficientnet_b4"},
        cwd=identity.ROOT,
    ).stdout.strip()  # fmt: skip
    assert printed == ident(checkpoint, B4_ARCH="efficientnet_b4")
    assert (records / f"{printed}.json").is_file()
