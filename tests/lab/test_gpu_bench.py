"""The GPU check's measurement run end to end on the CPU, with a small model: every row and
check is filled in, the mixed batch is answered request by request, and the report renders."""

from __future__ import annotations

import dataclasses
import json

import pytest
from gpu_fakes import scripted
from small_models import ConvNet

from b4serve.lab import gpu_bench


@pytest.fixture
def exported(tmp_path, config):
    """A model.pt with its metadata, as export_torchscript writes them."""
    build = tmp_path / "build"
    build.mkdir()
    scripted(build / "model.pt", ConvNet())
    chosen = dataclasses.replace(config, gpu_buckets=(1, 4, 8), extra={"gpu_parity": "checked"})
    chosen.save(build)
    return build / "model.pt"


def test_the_gpu_check_measures_every_row_and_writes_its_table(exported, tmp_path) -> None:
    out = tmp_path / "out"
    argv = ["--model", str(exported), "--out", str(out), "--device", "cpu", "--precisions",
            "fp32,fp16", "--seconds", "0.01", "--handler-batch", "8", "--workers", "1,2",
            "--command", "scripts/gpu_check.sh"]  # fmt: skip
    assert gpu_bench.main(argv) == 0  # every check passed
    report = json.loads((out / "gpu-check.json").read_text())
    assert set(report["in_process"]) == {"fp32", "fp16"}
    assert set(report["in_process"]["fp16"]) == {"1", "4", "8", "warm_up"}
    assert all(row["images_per_s"] > 0 for s, row in report["in_process"]["fp16"].items()
               if s != "warm_up")  # fmt: skip
    assert report["agreement"]["fp16"]["images"] == 8 and report["errors"] == {}
    mixed = report["mixed_batch"]
    assert mixed["statuses_as_expected"] and mixed["bad"] == 5 and mixed["good"] == 3
    assert sorted(mixed["statuses"]) == [200, 200, 200, 400, 400, 400, 413, 415]
    assert set(report["handler"]) == {"1", "2"}  # in this process, and two worker processes
    assert report["handler"]["2"]["images_per_s"] > 0
    page = (out / "gpu-check.md").read_text()
    assert page.startswith("# GPU check: cpu\n") and "Made by `scripts/gpu_check.sh`" in page
    assert "| forward size | fp32 | fp16 |" in page and "\n| 8 | " in page
    assert "- the handler at batch 8 >= 0.8x in-process: " in page
    assert "- fp16 parity at export: checked" in page and "NO" not in page


def test_an_unknown_precision_is_refused(exported, tmp_path, capsys) -> None:
    argv = ["--model", str(exported), "--out", str(tmp_path), "--precisions", "fp8"]
    assert gpu_bench.main(argv) == 2
    assert "unknown precisions ['fp8']" in capsys.readouterr().err
