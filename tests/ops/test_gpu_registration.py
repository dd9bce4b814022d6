"""Registration defaults on GPUs, and the GPUs counted as TorchServe 0.12 counts them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from b4serve.ops.gpus import configured_gpus, torchserve_gpus, visible_gpus
from b4serve.ops.manage import Registration, parse_args, registration_for
from b4serve.serving.config import DEFAULT_GPU_BUCKETS


@pytest.fixture
def fake_smi(tmp_path: Path):
    """A directory holding an ``nvidia-smi`` that lists ``count`` GPUs as the real one does."""

    def make(count: int, status: int = 0) -> dict[str, str]:
        folder = tmp_path / f"bin{count}"
        folder.mkdir()
        script = folder / "nvidia-smi"
        listing = "\\n".join(["index", *map(str, range(count))])
        script.write_text(f'#!/bin/sh\n[ "$1" = --query-gpu=index ] || exit 9\n'
                          f'printf "{listing}\\n"\nexit {status}\n')  # fmt: skip
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        return {"PATH": str(folder)}

    return make


def test_gpu_defaults_fill_the_largest_bucket_with_workers_on_every_gpu() -> None:
    assert Registration.for_gpus(0) == Registration()  # the CPU's defaults
    two = Registration.for_gpus(2)
    assert (two.batch_size, two.max_batch_delay_ms, two.initial_workers) == (64, 5, 4)
    assert two.batch_size == DEFAULT_GPU_BUCKETS[-1]  # one forward carries a whole batch
    assert Registration.for_gpus(3, workers_per_gpu=1).initial_workers == 3


def test_rollout_settings_take_what_is_given_and_the_gpu_defaults_for_the_rest() -> None:
    args = parse_args(["rollout", "--mar", "b4-1.mar", "--version", "1", "--gpus", "2",
                       "--batch-size", "32"])  # fmt: skip
    assert registration_for(args) == Registration(32, 5, 4, 120)
    args = parse_args(["rollout", "--mar", "b4-1.mar", "--version", "1", "--gpus", "0"])
    assert registration_for(args) == Registration()
    args = parse_args(["rollout", "--mar", "m", "--version", "1", "--gpus", "1",
                       "--workers-per-gpu", "3", "--initial-workers", "1"])  # fmt: skip
    assert registration_for(args).initial_workers == 1  # given wins over the per-GPU count


def test_gpus_are_counted_from_cuda_visible_devices_first(fake_smi) -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,3", **fake_smi(8)}) == 3
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "", **fake_smi(2)}) == 2  # empty: nvidia-smi


def test_gpus_are_counted_by_nvidia_smi_and_none_without_it(fake_smi, tmp_path) -> None:
    assert visible_gpus(fake_smi(2)) == 2
    assert visible_gpus(fake_smi(0)) == 0
    assert visible_gpus(fake_smi(4, status=6)) == 0  # nvidia-smi failed: no GPU, as TorchServe
    assert visible_gpus({"PATH": str(tmp_path / "nowhere")}) == 0


def test_number_of_gpu_caps_the_count_from_the_config_or_its_variable(fake_smi, tmp_path):
    config = tmp_path / "config.properties"
    config.write_text("inference_address=http://127.0.0.1:8080\nnumber_of_gpu=1\n")
    environ = fake_smi(4)
    assert configured_gpus(config, environ) == 1
    assert torchserve_gpus(config, environ) == 1
    assert torchserve_gpus(config, {**environ, "TS_NUMBER_OF_GPU": "0"}) == 0  # CPU only
    assert torchserve_gpus(None, environ) == 4
    assert configured_gpus(Path(os.devnull), environ) is None


def test_the_shipped_config_leaves_the_gpus_to_torchserve() -> None:
    shipped = Path(__file__).resolve().parents[2] / "config.properties"
    assert configured_gpus(shipped, {}) is None  # every GPU TorchServe finds
