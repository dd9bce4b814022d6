"""Seed inputs for fuzz_request.py: one or more of every request form it can reach.

Each seed is a mode byte (:data:`MODES`) then what that mode carries. Written into a corpus
directory by ``fuzz_request.py -seeds DIR`` and by tests/serving/test_fuzz.py.
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import numpy as np

from b4serve.serving.codec import encode_npy
from b4serve.serving.protocol import encode_request, encode_v2_binary

__all__ = ["MODES", "SEEDS", "write_seeds"]

# What follows the mode byte: a raw body (.npy or KServe JSON); a v2 binary-data body after a
# 2-byte little-endian JSON header length; the JSON list of instances TorchServe's kserve
# envelope hands over; the JSON list of inputs its kservev2 envelope hands over.
MODES = ("raw", "binary", "v1-envelope", "v2-envelope")

_IMAGE = np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3)
_NPY = encode_npy(_IMAGE)
_B64 = base64.b64encode(_NPY).decode()


def _mode(name: str, body: bytes) -> bytes:
    return bytes([MODES.index(name)]) + body


def _binary(body: bytes, header: dict[str, str]) -> bytes:
    length = int(header["Inference-Header-Content-Length"])
    return _mode("binary", struct.pack("<H", length) + body)


def _bytes_binary(elements: list[bytes]) -> bytes:
    data = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    tensor = {"name": "b", "datatype": "BYTES", "shape": [len(elements)],
              "parameters": {"binary_data_size": len(data)}}  # fmt: skip
    header = json.dumps({"inputs": [tensor], "outputs": [{"name": "probabilities"}]}).encode()
    return _mode("binary", struct.pack("<H", len(header)) + header + data)


def _json(document: object) -> bytes:
    return json.dumps(document).encode()


SEEDS: list[bytes] = [
    _mode("raw", _NPY),
    _mode("raw", encode_npy(np.ones((4, 4), ">f4") / 2)),
    _mode("raw", encode_npy(np.zeros((3, 3, 4), "f8"))),
    _mode("raw", encode_request(_IMAGE, "v1")[0]),
    _mode("raw", encode_request(_IMAGE, "v2")[0]),
    _mode("raw", encode_request((_IMAGE / 255).astype(np.float32), "v2")[0]),
    _mode("raw", _json({"instances": [_IMAGE.tolist(), {"b64": _B64}, _B64]})),
    _mode(
        "raw",
        _json(
            {
                "id": "7",
                "inputs": [{"name": "x", "datatype": "BYTES", "shape": [2], "data": [_B64, _B64]}],
                "parameters": {"binary_data_output": True},
            }
        ),
    ),
    _mode(
        "raw",
        _json(
            {
                "inputs": [
                    {"name": "x", "datatype": "UINT8", "shape": [2, 2, 2, 3], "data": [1] * 24}
                ]
            }
        ),
    ),
    _mode("raw", b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1e400], "data": []}]}'),
    _binary(*encode_v2_binary(_IMAGE)),
    _binary(*encode_v2_binary(np.stack([_IMAGE, _IMAGE]))),
    _binary(*encode_v2_binary(np.ones((3, 3), np.float64) / 3)),
    _bytes_binary([_NPY, _NPY]),
    _mode("v1-envelope", _json([{"data": _B64}, _IMAGE.tolist()])),
    _mode("v1-envelope", _json([_B64, (_IMAGE / 255).tolist()])),
    _mode(
        "v2-envelope",
        _json(
            [
                {
                    "name": "x",
                    "datatype": "UINT8",
                    "shape": [6, 5, 3],
                    "data": _IMAGE.ravel().tolist(),
                }
            ]
        ),
    ),
    _mode("v2-envelope", _json([{"name": "x", "datatype": "BYTES", "shape": [1], "data": _B64}])),
]


def write_seeds(directory: str | Path) -> list[Path]:
    """Write :data:`SEEDS` into ``directory`` (created), one file each."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"seed-{number:02d}" for number in range(len(SEEDS))]
    for path, seed in zip(paths, SEEDS, strict=True):
        path.write_bytes(seed)
    return paths
