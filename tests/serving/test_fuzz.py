"""A short, bounded atheris run of the decoder's fuzz target (the long run is documented there)."""

from __future__ import annotations

import importlib.util
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from b4serve.serving.codec import encode_npy

ROOT = Path(__file__).resolve().parents[2]


def test_decoder_survives_a_bounded_fuzz_run(tmp_path: Path) -> None:
    # A dev dependency that must be there (scripts/test.sh installs it): never skipped quietly.
    if importlib.util.find_spec("atheris") is None:
        pytest.fail(
            "atheris is missing: pip install -r requirements-dev.txt (scripts/test.sh does)"
        )
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seeds = [np.zeros((4, 4, 3), np.uint8), np.ones((3, 5), ">f8"), np.zeros((2, 2, 4), "f4")]
    for number, seed in enumerate(seeds):
        (corpus / f"seed{number}").write_bytes(encode_npy(seed))
    # libFuzzer bounds the peak RSS getrusage reports, and a child starts from its parent's peak
    # (pytest's, gigabytes after the integration tests): the bound is 2 GB above that.
    inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    result = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "fuzz_decode.py"), "-runs=20000", "-seed=1",
         f"-rss_limit_mb={inherited_mb + 2048}", f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 20000 runs" in result.stderr
    assert not list(tmp_path.glob("crash-*"))
