"""atheris fuzz target over the worker's whole request parse: every form, then each image's
decode and preprocessing, with the per-request limits small enough to be reached.

    .venv/bin/python fuzz/fuzz_request.py -seeds /tmp/corpus      # write the seeds, then:
    nice -n 19 .venv/bin/python fuzz/fuzz_request.py -runs=1000000 /tmp/corpus

An input is a mode byte (fuzz/request_seeds.py: raw body, v2 binary-data body, the kserve or
kservev2 envelope's items) and what that mode carries. Any exception but the project's own
request errors is a finding (atheris stops and writes the input), and so is a request that
passes a limit or an image that decodes to anything but the model's input. The parse runs
without the handler's guard (protocol.parse_requests), which would hide what is found here.
tests/serving/test_fuzz.py runs a bounded pass.

2026-12-07, the command above with -seed=11 on the parser of commit f759f87 (2 shared cores,
nice 19): 1,000,000 inputs in 397 s, no finding (310 edges, 129 corpus inputs); and four runs of
250,000 (-seed=101..104), none. An earlier run (-seed=7) found after 960,480 inputs an
enveloped request over the image limit answered with one error per instance (fixed in f759f87).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import atheris
import numpy  # noqa: F401 - imported first so that only b4serve is instrumented
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # b4serve, and the seeds beside this file

with atheris.instrument_imports(include=["b4serve"]):
    from b4serve.serving.config import ModelConfig
    from b4serve.serving.errors import InferenceError
    from b4serve.serving.pipeline import Classifier
    from b4serve.serving.protocol import (
        ParsedRequest,
        RequestLimits,
        enveloped_request,
        parse_raw_request,
    )

from request_seeds import MODES, write_seeds  # noqa: E402 - after the instrumented imports

CONFIG = ModelConfig.for_arch(
    "efficientnet_b4", 6, input_size=8, max_pixels=64 * 64, max_images=8,
    max_request_pixels=4 * 64 * 64,
)  # fmt: skip
LIMITS = RequestLimits.of(CONFIG)
# decode() and the preprocessing never touch the model
DECODER = Classifier(None, CONFIG, torch.device("cpu"))  # type: ignore[arg-type]


def requests_of(data: bytes) -> list[ParsedRequest]:
    """What the worker makes of one fuzz input, by its mode byte."""
    mode, rest = MODES[data[0] % len(MODES)] if data else "raw", data[1:]
    if mode == "raw":
        return [parse_raw_request({"body": rest}, None, LIMITS)]
    if mode == "binary":
        length = struct.unpack("<H", rest[:2])[0] if len(rest) >= 2 else -1
        return [parse_raw_request({"body": rest[2:]}, length, LIMITS)]
    try:  # the envelope's own JSON parse, TorchServe's, not ours
        items = json.loads(rest)
    except (ValueError, RecursionError):
        return []
    items = items if isinstance(items, list) else [items]
    if not items:
        return []
    return [enveloped_request(items, "v1" if mode == "v1-envelope" else "v2", LIMITS)]


def test_one_input(data: bytes) -> None:
    for request in requests_of(data):
        assert request.payloads, "a request with nothing to answer"
        assert len(request.payloads) <= LIMITS.images, len(request.payloads)
        for payload in request.payloads:
            try:
                image = DECODER.decode(payload)
            except InferenceError:
                continue
            assert tuple(image.shape) == (8, 8, 3) and bool(torch.isfinite(image).all())


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "-seeds":
        write_seeds(sys.argv[2])
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
