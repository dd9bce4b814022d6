"""export_torchscript: every checkpoint layout loads, parity is checked, errors fit a line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import export_torchscript
from b4serve.ops.checkpoint import CheckpointError, load_checkpoint
from b4serve.ops.models import create_model
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
         "--trust-checkpoint"]
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


def test_parity_check_refuses_a_scripted_model_that_differs() -> None:
    class Drifting(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.jit.is_scripting():
                return x.mean(dim=(2, 3)) + 1.0
            return x.mean(dim=(2, 3))

    with pytest.raises(CheckpointError, match="differs from eager"):
        export_torchscript.script_with_parity_check(Drifting(), 8)


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (None, [], "checkpoint not found"),
        (lambda p: p.write_bytes(b"not a checkpoint"), [], "corrupt or not a PyTorch checkpoint"),
        (lambda p: p.write_bytes(b"PK\x03\x04broken zip"), [], "corrupt or not a PyTorch"),
        (lambda p: torch.save(create_model(ARCH, 10).state_dict(), p), [],
         "checkpoint has 10 classes but --num-classes is 6"),
        (lambda p: torch.save(create_model(ARCH, 6).state_dict(), p),
         ["--arch", "efficientnet_b4"], "does not match efficientnet_b4 with 6 classes"),
        (lambda p: torch.save({"epoch": torch.tensor(3), "opt": {"lr": 0.1}}, p), [],
         "holds no model"),
        (lambda p: torch.save(create_model(ARCH, 6).state_dict(), p), ["--class-names", "a,b"],
         "2 class names given for 6 classes"),
    ],
    ids=["missing", "garbage", "bad-zip", "class-count", "wrong-arch", "no-model", "names"],
)  # fmt: skip
def test_bad_checkpoints_fail_with_one_clear_line(tmp_path, capsys, make, args, message) -> None:
    path = tmp_path / "ckpt.pth"
    if make is not None:
        make(path)
    argv = ["--checkpoint", str(path), "--arch", ARCH, "--output", str(tmp_path / "m.pt"), *args]
    assert export_torchscript.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert message in error and error.startswith("export_torchscript: error:")
    assert len(error.splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()


def test_unknown_arch_is_refused_by_the_cli(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        export_torchscript.main(["--checkpoint", "x", "--output", "y", "--arch", "resnet50"])
    assert exited.value.code == 2
    assert "invalid choice: 'resnet50'" in capsys.readouterr().err


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
