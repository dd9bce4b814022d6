"""atheris fuzz target for the request decoder and the checks after it.

    .venv/bin/python fuzz/fuzz_decode.py -max_total_time=600 fuzz/corpus

Any exception other than the project's own request errors is a finding (atheris stops and writes
the crashing input). CI runs a short bounded pass (tests/test_fuzz.py).
"""

from __future__ import annotations

import sys

import atheris
import numpy  # noqa: F401 - imported first so that only b4serve is instrumented

with atheris.instrument_imports():
    from b4serve.serving.codec import decode_npy
    from b4serve.serving.errors import InferenceError

MAX_PIXELS = 64 * 64


def test_one_input(data: bytes) -> None:
    try:
        array = decode_npy(data, MAX_PIXELS)
    except InferenceError:
        return
    if array.ndim not in (2, 3) or array.size == 0 or array.shape[0] * array.shape[1] > MAX_PIXELS:
        raise AssertionError(f"decoder accepted a bad shape {array.shape}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
