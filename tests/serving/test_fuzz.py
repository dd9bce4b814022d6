"""Short, bounded atheris runs of the fuzz targets (their long runs are documented in each):
the decoder alone, and the worker's whole request parse from seeds of every form."""

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
sys.path.insert(0, str(ROOT / "fuzz"))
from request_seeds import MODES, SEEDS, write_seeds  # noqa: E402 - fuzz/ is no package


def fuzz(target: str, corpus: Path, tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    """Run ``fuzz/<target>`` over ``corpus`` with libFuzzer ``options``; crashes go to tmp."""
    # A dev dependency that must be there (scripts/test.sh installs it): never skipped quietly.
    if importlib.util.find_spec("atheris") is None:
        pytest.fail(
            "atheris is missing: pip install -r requirements-dev.txt (scripts/test.sh does)"
        )
    # libFuzzer bounds the peak RSS getrusage reports, and a child starts from its parent's peak
    # (pytest's, gigabytes after the integration tests): the bound is 2 GB above that.
    inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / target), *options, "-seed=1",
         f"-rss_limit_mb={inherited_mb + 2048}", f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_decoder_survives_a_bounded_fuzz_run(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seeds = [np.zeros((4, 4, 3), np.uint8), np.ones((3, 5), ">f8"), np.zeros((2, 2, 4), "f4")]
    for number, seed in enumerate(seeds):
        (corpus / f"seed{number}").write_bytes(encode_npy(seed))
    result = fuzz("fuzz_decode.py", corpus, tmp_path, "-runs=20000")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 20000 runs" in result.stderr
    assert not list(tmp_path.glob("crash-*"))


def test_the_request_seeds_hold_every_form() -> None:
    assert {MODES[seed[0]] for seed in SEEDS} == set(MODES)
    raw = [seed[1:] for seed in SEEDS if seed[0] == 0]
    assert any(body.startswith(b"\x93NUMPY") for body in raw)
    for key in (b'"instances"', b'"inputs"', b'"BYTES"', b"1e400"):
        assert any(key in body for body in raw), key


def test_the_whole_request_parser_survives_a_bounded_fuzz_run(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write_seeds(corpus)
    # time-bounded (about 10 s, some 50,000 inputs on a quiet core): the suite's budget holds it
    result = fuzz("fuzz_request.py", corpus, tmp_path, "-max_total_time=10")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done " in result.stderr and not list(tmp_path.glob("crash-*"))
    runs = int(result.stderr.split("Done ")[-1].split()[0])
    print(f"\n[fuzz] whole request parser: {runs} inputs in 10 s, no finding")
    assert runs > 1000  # it ran the inputs, not only the seeds
