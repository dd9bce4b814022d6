"""export_torchscript: every checkpoint layout loads, parity is checked, errors fit a line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import export_torchscript
from b4serve.build.checkpoint import CheckpointError, load_checkpoint
from b4serve.build.models import create_model
from b4serve.lab.user_checkpoints import SeedNet, save_checkpoint, user_module
from b4serve.serving.archs import INCEPTION_MEAN, TF_SAME
from b4serve.serving.config import ModelConfig
from b4serve.serving.runtime import OnnxRuntimeModel

ARCH = "efficientnet_b0"  # same code path as B4, a quarter of the time


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A model with non-default weights and a directory of checkpoints in every layout."""
    torch.manual_seed(7)
    model = create_model(ARCH, 6)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.arange(6.0))
    folder = tmp_path_factory.mktemp("checkpoints")
    state = model.state_dict()
    torch.save({"model": model, "class_names": list("abcdef")}, folder / "seed.pth")
    torch.save(state, folder / "bare.pth")
    torch.save({"state_dict": state}, folder / "state_dict.pth")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, folder / "dp.pth")
    return model, folder


@pytest.mark.parametrize("name", ["bare.pth", "state_dict.pth", "dp.pth"])
def test_state_dict_layouts_load_the_same_weights(trained, name: str) -> None:
    model, folder = trained
    loaded = load_checkpoint(folder / name, ARCH, 6)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=0, atol=0)


def test_whole_module_needs_trust_and_then_loads(trained) -> None:
    model, folder = trained
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_checkpoint(folder / "seed.pth", ARCH, 6)
    loaded = load_checkpoint(folder / "seed.pth", ARCH, 6, trust=True)
    assert loaded.class_names == list("abcdef")
    torch.testing.assert_close(loaded.model.classifier.bias, model.classifier.bias)


def test_export_writes_a_scripted_model_equal_to_eager_and_its_metadata(trained, tmp_path) -> None:
    model, folder = trained
    output = tmp_path / "out" / "model.pt"
    code = export_torchscript.main(
        ["--checkpoint", str(folder / "seed.pth"), "--arch", ARCH, "--output", str(output),
         "--trust-checkpoint", "--runtime", "torchscript"]  # auto: tests/build/test_runtimes.py
    )  # fmt: skip
    assert code == 0
    scripted = torch.jit.load(str(output))
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert (scripted(images) - model(images)).abs().max().item() <= 1e-5
    config = ModelConfig.load(output.parent)
    assert (config.arch, config.num_classes, config.input_size) == (ARCH, 6, 224)
    assert config.class_names == tuple("abcdef")
    labels = json.loads((output.parent / "index_to_name.json").read_text())
    assert labels == {str(i): name for i, name in enumerate("abcdef")}
    metadata = json.loads((output.parent / "v2_metadata.json").read_text())  # for /v2/models/b4
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [6]}]
    assert metadata["platform"] == "pytorch_torchscript"


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (None, [], "checkpoint not found"),
        (lambda p: p.write_bytes(b"not a checkpoint"), [], "corrupt or not a PyTorch checkpoint"),
        (lambda p: p.write_bytes(b"PK\x03\x04broken zip"), [], "corrupt or not a PyTorch"),
        (lambda p: torch.save(create_model(ARCH, 10).state_dict(), p), [],
         "checkpoint has 10 classes but --num-classes is 6"),
        (lambda p: torch.save(create_model(ARCH, 6).state_dict(), p),
         ["--arch", "efficientnet_b4"],
         "checkpoint does not match efficientnet_b4: its state dict has b0 widths and depths"),
        (lambda p: torch.save(create_model(ARCH, 6).state_dict(), p), ["--arch", "resnet50"],
         "unknown arch 'resnet50'; known: efficientnet_b0, efficientnet_b1,"),
        (lambda p: torch.save({"epoch": torch.tensor(3), "opt": {"lr": 0.1}}, p), [],
         "holds no model"),
        (lambda p: torch.save(create_model(ARCH, 6).state_dict(), p), ["--class-names", "a,b"],
         "2 class names given for 6 classes"),
    ],
    ids=["missing", "garbage", "bad-zip", "class-count", "wrong-arch", "unknown-arch", "no-model",
         "names"],
)  # fmt: skip
def test_bad_checkpoints_fail_with_one_clear_line(tmp_path, capsys, make, args, message) -> None:
    path = tmp_path / "ckpt.pth"
    if make is not None:
        make(path)
    argv = ["--checkpoint", str(path), "--arch", ARCH, "--output", str(tmp_path / "m.pt"), *args]
    if "--arch" in args:
        del argv[2:4]
    assert export_torchscript.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert message in error and error.startswith("export_torchscript: error:")
    assert len(error.splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == (["ckpt.pth"] if path.exists() else [])


def test_onnxruntime_export_matches_eager_and_is_recorded(trained, tmp_path) -> None:
    model, folder = trained
    output = tmp_path / "model.pt"
    argv = ["--checkpoint", str(folder / "state_dict.pth"), "--arch", ARCH, "--output",
            str(output), "--runtime", "onnxruntime"]  # fmt: skip
    assert export_torchscript.main(argv) == 0
    config = ModelConfig.load(tmp_path)
    assert config.runtime == "onnxruntime"
    onnx_model = OnnxRuntimeModel(tmp_path / "model.onnx")
    images = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = torch.softmax(model(images), dim=1)
    got = torch.softmax(onnx_model(images), dim=1)
    assert (got - expected).abs().max().item() <= 1e-3
    assert torch.equal(got.argmax(1), expected.argmax(1))


# --- variants: each exported file reproduces the user's own module ------------------------------

B0_VARIANTS = ("efficientnet_b0", "tf_efficientnet_b0", "tf_efficientnet_b0_ap",
               "tf_efficientnet_b0_ns")  # fmt: skip


def exported_difference(module: torch.nn.Module, model, size: int) -> float:
    """Max |logit difference| on images the export's own proof never saw."""
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(21))
    with torch.inference_mode():
        return (model(images) - module(images)).abs().max().item()


def export(checkpoint: Path, output: Path, *args: str) -> int:
    argv = ["--checkpoint", str(checkpoint), "--output", str(output), *args]
    return export_torchscript.main(argv)


@pytest.mark.parametrize("arch", B0_VARIANTS)
def test_each_variant_saved_the_seeds_way_exports_equal_to_the_users_module(
    tmp_path: Path, capsys, arch: str
) -> None:
    module = user_module(arch, seed=3)
    checkpoint = save_checkpoint(module, "module", tmp_path / "seed.pth")
    output = tmp_path / "out" / "model.pt"
    # the runtime is not what this tests (tests/build/test_runtimes.py is): the reference alone
    pinned = ("--runtime", "torchscript")
    assert export(checkpoint, output, "--trust-checkpoint", "--no-optimize", *pinned) == 0
    printed = capsys.readouterr().out
    assert "TorchScript model.pt reproduces your module: max |probability difference|" in printed
    config = ModelConfig.load(output.parent)
    assert config.padding == (TF_SAME if arch.startswith("tf_") else "symmetric")
    assert exported_difference(module, torch.jit.load(str(output)), 224) <= 1e-4


def test_a_state_dict_exports_as_the_arch_it_is_told_with_that_archs_feeding(
    tmp_path: Path,
) -> None:
    module = user_module("tf_efficientnet_b0_ap", seed=4)
    checkpoint = save_checkpoint(module, "dataparallel", tmp_path / "dp.pth")
    output = tmp_path / "model.pt"
    assert export(checkpoint, output, "--arch", "tf_efficientnet_b0_ap", "--no-optimize") == 0
    config = ModelConfig.load(tmp_path)
    assert (config.arch, config.mean, config.std) == (
        "tf_efficientnet_b0_ap", INCEPTION_MEAN, INCEPTION_MEAN
    )  # fmt: skip
    assert (config.padding, config.bn_eps) == (TF_SAME, 1e-3)
    assert exported_difference(module, torch.jit.load(str(output)), 224) <= 1e-4


def one_line_error(capsys) -> str:
    """The one error line (a warning may come before it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line for line in lines if not line.startswith("export_torchscript: warning:")] == [
        lines[-1]
    ]  # fmt: skip
    assert lines[-1].startswith("export_torchscript: error:")
    return lines[-1]


def test_a_wrong_arch_for_a_whole_module_is_refused_naming_the_archs_that_match(
    tmp_path: Path, capsys
) -> None:
    checkpoint = save_checkpoint(user_module("tf_efficientnet_b0_ns"), "module", tmp_path / "m.pt")
    out = tmp_path / "out"
    assert export(checkpoint, out / "model.pt", "--trust-checkpoint", "--arch", ARCH) == 1
    error = one_line_error(capsys)
    assert "checkpoint does not match efficientnet_b0: its module has b0 widths and depths, " \
        "TensorFlow 'same' padding, batch-norm eps 0.001" in error  # fmt: skip
    assert error.endswith("tf_efficientnet_b0 or tf_efficientnet_b0_ap or tf_efficientnet_b0_ns "
                          "would match")  # fmt: skip
    assert not out.exists()


class DoubledLogits(SeedNet):
    """A user's model whose forward is not the network's alone: no arch reproduces it."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return 2 * self.model(images)


def test_a_module_whose_forward_differs_from_its_network_is_refused(tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "custom.pth"
    torch.save({"model": DoubledLogits(user_module("tf_efficientnet_b0"))}, checkpoint)
    out = tmp_path / "out"
    assert export(checkpoint, out / "model.pt", "--trust-checkpoint", "--no-optimize") == 1
    error = one_line_error(capsys)
    assert "TorchScript model.pt differs from your module by " in error
    assert "its layers match tf_efficientnet_b0, so its forward or some layer computes " \
        "something else: no known arch reproduces it" in error  # fmt: skip
    assert list(out.iterdir()) == []  # the unproven model file was removed, no metadata written


@pytest.mark.parametrize(
    ("make", "message"),
    [(lambda: {k: v for k, v in create_model(ARCH, 6).state_dict().items()
               if not k.startswith("blocks.6.")},
      "the checkpoint's state dict fits no known arch; nearest is the b0 size: 22 missing keys, "
      "first blocks.6.0.bn1.bias"),
     (lambda: {"model": user_module("tf_efficientnet_b0", num_classes=10)},
      "checkpoint has 10 classes but --num-classes is 6")],
    ids=["fits-nothing", "class-count"],
)  # fmt: skip
def test_checkpoints_that_fit_no_variant_fail_in_one_line(tmp_path: Path, capsys, make, message):
    checkpoint = tmp_path / "ckpt.pth"
    torch.save(make(), checkpoint)
    assert export(checkpoint, tmp_path / "out" / "model.pt", "--trust-checkpoint") == 1
    assert one_line_error(capsys) == f"export_torchscript: error: {message}"
    assert not (tmp_path / "out").exists()


def test_a_tf_variant_exports_to_onnx_equal_to_the_users_module(tmp_path: Path) -> None:
    # At 230 px a b0 meets odd feature maps, whose TF padding is where ONNX export once erred
    module = user_module("tf_efficientnet_b0", seed=5)
    checkpoint = save_checkpoint(module, "module", tmp_path / "seed.pth")
    output = tmp_path / "model.pt"
    argv = ["--trust-checkpoint", "--input-size", "230", "--runtime", "onnxruntime"]
    assert export(checkpoint, output, *argv) == 0
    onnx_model = OnnxRuntimeModel(tmp_path / "model.onnx")
    assert exported_difference(module, onnx_model, 230) <= 1e-4


def test_a_tf_b4_saved_the_seeds_way_is_served_as_itself_not_as_efficientnet_b4(
    tmp_path: Path, capsys
) -> None:
    """The issue's case: a tf_efficientnet_b4_ns exported without --arch."""
    module = user_module("tf_efficientnet_b4_ns", seed=6)
    checkpoint = save_checkpoint(module, "module", tmp_path / "seed.pth")
    output = tmp_path / "model.pt"
    assert export(checkpoint, output, "--trust-checkpoint", "--runtime", "torchscript") == 0
    captured = capsys.readouterr()
    assert "your module is tf_efficientnet_b4 (b4 widths and depths, TensorFlow 'same' " \
        "padding, batch-norm eps 0.001)" in captured.out  # fmt: skip
    assert "reproduces your module" in captured.out and "as served (frozen, oneDNN" in captured.out
    assert "tf_efficientnet_b4_ap" in captured.err  # the warning: its mean/std differ
    config = ModelConfig.load(tmp_path)
    assert (config.arch, config.input_size, config.padding) == ("tf_efficientnet_b4", 380, TF_SAME)
    assert exported_difference(module, torch.jit.load(str(output)), 380) <= 1e-4
    # what the default arch used to serve from the same weights, silently
    as_before = create_model("efficientnet_b4", 6)
    as_before.load_state_dict(module.state_dict())
    assert exported_difference(module, as_before, 380) > 1e-2
