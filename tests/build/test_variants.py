"""Variants: each arch builds what its spec says, a module tells its variant, every checkpoint
form loads the user's exact weights, and what cannot be told or fits nothing is said in a line."""

from __future__ import annotations

from pathlib import Path

import geffnet
import pytest
import torch

from b4serve.build.checkpoint import CheckpointError, load_checkpoint
from b4serve.build.models import create_model
from b4serve.build.variants import (
    Network,
    VariantError,
    choose_arch,
    find_network,
    network_of_module,
    split_prefix,
)
from b4serve.lab.user_checkpoints import FORMS, WHOLE_MODULE_FORMS, save_checkpoint, user_module
from b4serve.serving.archs import ARCHS, BN_EPS_PYTORCH, BN_EPS_TF, SYMMETRIC, TF_SAME

B0_VARIANTS = ("efficientnet_b0", "tf_efficientnet_b0", "tf_efficientnet_b0_ap",
               "tf_efficientnet_b0_ns")  # fmt: skip
# timm's published configs for these weights (timm/models/efficientnet.py default_cfgs)
PUBLISHED_SIZES = {
    "b0": 224, "b1": 240, "b2": 260, "b3": 300, "b4": 380,
    "lite0": 224, "lite1": 240, "lite2": 260, "lite3": 280, "lite4": 300,
}  # fmt: skip
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def published(arch: str) -> tuple[int, str, float, tuple]:
    """(input size, padding, eps, (mean, std)) as geffnet and timm define ``arch``."""
    scale = arch.split("_")[-2] if arch.endswith(("_ap", "_ns")) else arch.split("_")[-1]
    tf_port = arch.startswith("tf_")
    return (
        PUBLISHED_SIZES[scale],
        TF_SAME if tf_port else SYMMETRIC,
        BN_EPS_TF if tf_port else BN_EPS_PYTORCH,
        INCEPTION if arch.endswith("_ap") or "_lite" in arch else IMAGENET,  # Lite: TF's 127/128
    )


def test_every_known_arch_is_the_network_and_feeding_geffnet_and_timm_publish() -> None:
    wanted = {f"{p}_b{n}{s}" for n in range(5) for p, s in
              [("efficientnet", ""), ("tf_efficientnet", ""), ("tf_efficientnet", "_ap"),
               ("tf_efficientnet", "_ns")]}  # fmt: skip
    wanted |= {f"tf_efficientnet_lite{n}" for n in range(5)}  # ReLU6, no squeeze-excite
    assert set(ARCHS) == wanted
    for name, spec in ARCHS.items():
        size, padding, eps, feeding = published(name)
        assert (spec.input_size, spec.padding, spec.bn_eps, (spec.mean, spec.std)) == (
            size, padding, eps, feeding,
        ), name  # fmt: skip
        for exportable in (False, True):  # the scriptable and the ONNX-exportable builds
            built = network_of_module(create_model(name, 6, exportable=exportable))
            assert built == Network(spec.scale, padding, (eps,)), (name, exportable)


def test_a_users_module_tells_its_network_and_tf_ports_warn_about_their_feeding() -> None:
    for name, spec in ARCHS.items():
        module = geffnet.create_model(name, pretrained=False, num_classes=6)  # geffnet's defaults
        where, network = find_network(module)
        choice = choose_arch(None, network_of_module(network), source="module")
        assert where == ""
        assert ARCHS[choice.arch].network == spec.network, name
        if "_lite" in name:  # one network, one feeding: nothing to warn about
            assert (choice.arch, choice.warning) == (name, None)
        elif name.startswith("tf_"):
            # the three TF ports are one network: only their mean/std tells _ap apart
            assert choice.arch == f"tf_efficientnet_{spec.scale}"
            assert choice.warning is not None and "differ in mean/std" in choice.warning
            assert f"tf_efficientnet_{spec.scale}_ap" in choice.warning
        else:
            assert (choice.arch, choice.warning) == (name, None)


@pytest.fixture(scope="module")
def b0_modules() -> dict[str, torch.nn.Module]:
    return {arch: user_module(arch, seed=index) for index, arch in enumerate(B0_VARIANTS)}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", B0_VARIANTS)
def test_every_form_of_every_variant_loads_the_users_exact_weights(
    b0_modules, tmp_path: Path, arch: str, form: str
) -> None:
    module = b0_modules[arch]
    path = save_checkpoint(module, form, tmp_path / "ckpt.pth")
    whole = form in WHOLE_MODULE_FORMS
    # a module tells its variant; a state dict needs --arch for the tf_ ones
    loaded = load_checkpoint(path, None if whole else arch, 6, trust=whole)
    assert ARCHS[loaded.arch].network == ARCHS[arch].network
    assert loaded.user_module == whole
    expected = module.state_dict()
    found = loaded.model.state_dict()
    assert found.keys() == expected.keys()
    for key, value in expected.items():  # bit for bit: any export of them is the same file
        assert torch.equal(found[key], value), key
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert (loaded.model(images) - module(images)).abs().max().item() <= 1e-4
    stripped = {"dataparallel": "'module.'", "wrapper-state-dict": "'model.'"}
    if form in stripped:
        assert loaded.notes == [f"stripped the key prefix {stripped[form]} from the state dict"]
    if form == "wrapped-module":
        assert "network at 'model' inside your SeedNet" in loaded.notes[0]


def test_a_state_dict_without_arch_warns_naming_every_variant_it_fits(tmp_path: Path) -> None:
    path = save_checkpoint(create_model("tf_efficientnet_b0", 6), "state-dict", tmp_path / "s.pt")
    loaded = load_checkpoint(path, None, 6)
    assert loaded.arch == "efficientnet_b0"  # the first that fits, as before variants existed
    assert loaded.warning is not None
    assert ", ".join(B0_VARIANTS) in loaded.warning
    assert "its keys cannot tell them apart" in loaded.warning
    assert "pass --arch to choose" in loaded.warning


def test_a_whole_module_refuses_an_arch_of_another_network(b0_modules, tmp_path: Path) -> None:
    path = save_checkpoint(b0_modules["tf_efficientnet_b0_ns"], "module", tmp_path / "m.pt")
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path, "efficientnet_b0", 6, trust=True)
    message = str(refused.value)
    assert message == (
        "checkpoint does not match efficientnet_b0: its module has b0 widths and depths, "
        "TensorFlow 'same' padding, batch-norm eps 0.001, efficientnet_b0 has b0 widths and "
        "depths, symmetric padding, batch-norm eps 1e-05; tf_efficientnet_b0 or "
        "tf_efficientnet_b0_ap or tf_efficientnet_b0_ns would match"
    )
    # the same network with another feeding is the user's call
    assert load_checkpoint(path, "tf_efficientnet_b0_ap", 6, trust=True).warning is None


def test_networks_that_fit_nothing_or_are_not_alone_are_refused() -> None:
    network = create_model("efficientnet_b0", 6)
    with pytest.raises(VariantError, match="holds 2 gen-efficientnet networks"):
        find_network(torch.nn.ModuleDict({"a": network, "b": create_model("efficientnet_b0", 6)}))
    with pytest.raises(VariantError, match="Linear module holds no gen-efficientnet network"):
        find_network(torch.nn.Linear(2, 2))
    state = network.state_dict()
    two = {**{f"a.{k}": v for k, v in state.items()}, **{f"b.{k}": v for k, v in state.items()}}
    with pytest.raises(VariantError, match=r"holds 2 gen-efficientnet networks .*'a\.', 'b\.'"):
        split_prefix(two)
    extra = {**{f"model.{k}": v for k, v in state.items()}, "aux.weight": torch.zeros(2)}
    with pytest.raises(VariantError, match=r"1 keys outside its network's prefix 'model\.'"):
        split_prefix(extra)
    mixed = Network("b0", SYMMETRIC, (1e-5, 1e-3))
    with pytest.raises(VariantError, match=r"fits no known arch: .*eps 1e-05 and 0\.001"):
        choose_arch(None, mixed, source="module")
