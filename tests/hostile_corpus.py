"""Malformed and hostile request bodies, each with the status it must get.

Shared by the in-process decoder test and the integration tests that send every body to a real
TorchServe next to good requests in the same server batch (tests/integration/test_server.py:
:data:`HOSTILE` to the TorchServe port) and to both ports beside good requests
(tests/integration/test_request_limits.py: :data:`EVERY_HOSTILE`, the v2 binary-data bodies
with their header). :data:`OVER_LIMITS` are the bodies that cost little to send and would cost
the worker thousands of images, or escaped the parser, before requests were bounded.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from dataclasses import dataclass, field

import numpy as np

from b4serve.serving.codec import encode_npy
from b4serve.serving.config import DEFAULT_MAX_IMAGES
from b4serve.serving.protocol import BINARY_HEADER

__all__ = ["ACCEPTED_VARIANTS", "EVERY_HOSTILE", "HOSTILE", "OVER_LIMITS", "WITH_HEADERS", "Case"]


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    status: int
    words: str  # must appear in the error message
    headers: dict[str, str] = field(default_factory=dict, hash=False)  # v2 binary-data only


def _image(dtype: str = "u1", shape: tuple[int, ...] = (24, 24, 3)) -> np.ndarray:
    rng = np.random.default_rng(5)
    if np.dtype(dtype).kind == "f":
        return rng.random(shape).astype(dtype)
    return rng.integers(0, 256, shape).astype(dtype)


GOOD = encode_npy(_image())


def _kserve_v2(datatype: str, shape: list[int], data: list[int]) -> bytes:
    """A KServe v2 JSON request with one input."""
    tensor = {"name": "x", "datatype": datatype, "shape": shape, "data": data}
    return json.dumps({"inputs": [tensor]}).encode()


def _v1(header: str, data: bytes = b"") -> bytes:
    encoded = header.encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(encoded)) + encoded + data


def _declare(shape: str, descr: str = "|u1", fortran: str = "False", data: bytes = b"") -> bytes:
    return _v1(f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}", data)


def _pickled() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def _with(value: float, dtype: str = "f4") -> bytes:
    image = _image(dtype)
    image[3, 3, 1] = value
    return encode_npy(image)


_DTYPES = ["i8", "i4", "i2", "i1", "u2", "u4", "u8", "?", "c8", "c16", "f2", "U1", "S1", "V4",
           "M8[s]", "m8[s]"]  # fmt: skip

HOSTILE: list[Case] = [
    Case("empty", b"", 400, "empty body"),
    Case("magic only", b"\x93NUMPY", 400, "truncated"),
    Case("cut in header length", GOOD[:9], 400, "header"),
    Case("cut in header", GOOD[:40], 400, "header"),
    Case("cut at data start", GOOD[:128], 400, "truncated array data"),
    Case("cut mid data", GOOD[: len(GOOD) // 2], 400, "truncated array data"),
    Case("one byte short", GOOD[:-1], 400, "truncated array data"),
    Case("trailing bytes", GOOD + b"\x00\x01", 400, "unexpected bytes"),
    Case("wrong magic", b"\x93NUMPZ" + GOOD[6:], 415, "not an .npy"),
    Case("version 3.0", b"\x93NUMPY\x03\x00" + GOOD[8:], 400, "version 3.0"),
    Case("version 0.0", b"\x93NUMPY\x00\x00" + GOOD[8:], 400, "version 0.0"),
    Case("version 9.9", b"\x93NUMPY\x09\x09" + GOOD[8:], 400, "version 9.9"),
    Case("pickled object array", _pickled(), 400, "object arrays"),
    Case("object dtype header", _declare("(2, 2)", "|O"), 400, "object arrays"),
    Case("enormous shape", _declare("(100000, 100000, 3)"), 413, "limit"),
    Case("astronomic shape", _declare("(4611686018427387904, 4, 3)"), 413, "limit"),
    Case("enormous float64 rgba", _declare("(60000, 60000, 4)", "<f8"), 413, "limit"),
    Case("zero height", _declare("(0, 380, 3)"), 400, "empty image"),
    Case("zero width", _declare("(380, 0, 3)"), 400, "empty image"),
    Case("zero everything", _declare("(0, 0)"), 400, "empty image"),
    Case("negative dim", _declare("(-1, 380, 3)"), 400, "negative dimension"),
    Case("float dim", _declare("(2.5, 3, 3)"), 400, "header"),
    Case("1-d", encode_npy(np.zeros(1000, np.uint8)), 400, "1-d"),
    Case("0-d", encode_npy(np.array(7, np.uint8)), 400, "0-d"),
    Case("4-d", encode_npy(np.zeros((1, 8, 8, 3), np.uint8)), 400, "4-d"),
    Case("5-d", encode_npy(np.zeros((1, 1, 8, 8, 3), np.uint8)), 400, "5-d"),
    Case("2 channels", encode_npy(np.zeros((8, 8, 2), np.uint8)), 400, "channels"),
    Case("5 channels", encode_npy(np.zeros((8, 8, 5), np.uint8)), 400, "channels"),
    Case("0 channels", _declare("(8, 8, 0)"), 400, "channels"),
    Case("NaN", _with(np.nan), 400, "NaN or Inf"),
    Case("+Inf", _with(np.inf, "f8"), 400, "NaN or Inf"),
    Case("-Inf", _with(-np.inf), 400, "NaN or Inf"),
    Case("float 0-255", encode_npy(_image("f4") * 255), 400, "[0, 1]"),
    Case("negative float", _with(-0.5), 400, "[0, 1]"),
    *[Case(f"dtype {d}", encode_npy(np.zeros((8, 8, 3), d)), 400, "not accepted") for d in _DTYPES],
    Case("structured rgb", encode_npy(np.zeros((8, 8), "u1,u1,u1")), 400, "not accepted"),
    Case("header not a dict", _v1("[1, 2, 3]"), 400, "header"),
    Case("header missing shape", _v1("{'descr': '|u1', 'fortran_order': False, }"), 400, "header"),
    Case(
        "header extra key",
        _v1("{'descr': '|u1', 'fortran_order': False, 'shape': (2, 2), 'x': 1, }"),
        400,
        "header",
    ),
    Case("fortran_order not bool", _declare("(2, 2)", fortran="'yes'"), 400, "header"),
    Case("bad descr", _declare("(2, 2)", "<x9"), 400, "header"),
    Case("code in header", _v1("__import__('os').system('echo pwned')"), 400, "header"),
    Case("header length beyond body", b"\x93NUMPY\x01\x00\xff\xff{'descr'", 400, "header"),
    Case(
        "huge v2 header",
        b"\x93NUMPY\x02\x00" + struct.pack("<I", 1 << 20) + b" " * 64,
        400,
        "header",
    ),
    Case("latin1 junk header", _v1("\xff\xfe\x00\x01" * 8), 400, "header"),
    Case("PNG", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, 415, "not an .npy"),
    Case("JPEG", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 64, 415, "not an .npy"),
    Case("JSON, not a KServe request", b'{"image": [[[0, 0, 0]]]}', 415, "KServe v1"),
    Case("JSON, broken", b'{"inputs": [', 415, "valid JSON"),
    Case("JSON array", b"[1, 2, 3]", 415, "not an .npy"),
    Case("KServe v2, inputs not a list", b'{"inputs": "x"}', 400, "no image"),
    Case("KServe v2, INT64 tensor", _kserve_v2("INT64", [1, 1, 3], [0, 0, 0]), 400, "'INT64'"),
    Case("KServe v2, uint8 out of range", _kserve_v2("UINT8", [1, 1, 3], [0, 0, 999]), 400, "999"),
    Case(
        "KServe v2, shape and data disagree",
        _kserve_v2("UINT8", [2, 2, 3], [0] * 3),
        400,
        "3 values for shape",
    ),
    Case("KServe v2, 1-D tensor", _kserve_v2("UINT8", [3], [1, 2, 3]), 400, "1-d shape"),
    Case(
        "KServe v2, binary_data_size not a number",
        b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], '
        b'"parameters": {"binary_data_size": "x"}}]}',
        400,
        "binary_data_size",
    ),
    Case(
        "KServe v2, negative binary_data_size",
        b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], '
        b'"parameters": {"binary_data_size": -3}}]}',
        400,
        "binary_data_size",
    ),
    Case(
        "KServe v2, parameters not an object",
        b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "parameters": [1]}]}',
        400,
        "parameters must be an object",
    ),
    Case("KServe v1, not base64", b'{"instances": [{"data": "!!"}]}', 415, "not base64"),
    Case("KServe v1, ragged image", b'{"instances": [[[1, 2], [3]]]}', 400, "rectangular"),
    Case("text", b"hello, model", 415, "not an .npy"),
    Case("gzip", b"\x1f\x8b\x08\x00" + b"\x00" * 32, 415, "not an .npy"),
]


def _document(document: object) -> bytes:
    return json.dumps(document).encode()


def _input(shape: object, datatype: str = "UINT8", data: object = (), **fields: object) -> dict:
    return {"name": "x", "datatype": datatype, "shape": shape, "data": list(data), **fields}


def _inputs(*tensors: dict, **fields: object) -> bytes:
    return _document({"inputs": list(tensors), **fields})


_B64_NPY = base64.b64encode(encode_npy(_image())).decode()
_PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()
_OVER = DEFAULT_MAX_IMAGES + 1
_LIMIT = f"limit is {DEFAULT_MAX_IMAGES} per request"

OVER_LIMITS: list[Case] = [
    Case("v2, 10000 images declared in a small body",
         _inputs(_input([10000, 1, 1, 3])), 413, _LIMIT),
    Case("v2, a batch one image over the limit",
         _inputs(_input([_OVER, 1, 1, 3], data=[0] * 3 * _OVER)), 413, _LIMIT),
    Case("v2, 10^18 empty images", _inputs(_input([10**18, 1, 0, 3])), 413, _LIMIT),
    Case("v2, BYTES of 10000 elements declared",
         _inputs(_input([10000], "BYTES", [_B64_NPY])), 413, _LIMIT),
    Case("v2, one input too many", _inputs(*[_input([1, 1, 3], data=[0, 0, 0])] * _OVER), 413,
         _LIMIT),
    Case("v2, five largest images declared", _inputs(*[_input([2048, 2048, 3])] * 5), 413,
         "pixels; the limit is"),
    Case("v1, 20000 tiny instances", _document({"instances": [[[[0, 0, 0]]]] * 20000}), 413,
         _LIMIT),
    Case("v1, one base64 instance too many",
         _document({"instances": [{"b64": _B64_NPY}] * _OVER}), 413, _LIMIT),
    Case("v2, shape 1e400", b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1e400], '
         b'"data": [1]}]}', 400, "shape must be a list of integers"),
    Case("v2, BYTES shape 1e400", b'{"inputs": [{"name": "x", "datatype": "BYTES", '
         b'"shape": [1e400], "data": ["AAAA"]}]}', 400, "shape must be a list of integers"),
    Case("JSON nested 100000 deep", b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
         400, "nested too deeply"),
    Case("JSON with a 5000-digit integer",
         b'{"inputs": [{"shape": [' + b"9" * 5000 + b"]}]}", 415, "valid JSON"),
]  # fmt: skip

HOSTILE += [
    *OVER_LIMITS,
    Case("v2, shape of strings", _inputs(_input(["2", "2", "3"], data=[0] * 12)), 400,
         "shape must be a list of integers"),
    Case("v2, shape not a list", _inputs(_input("3x3", data=[0] * 9)), 400,
         "shape must be a list of integers"),
    Case("v2, negative side", _inputs(_input([-1, 3, 3])), 400, "negative side"),
    Case("v2, input not an object", b'{"inputs": [1]}', 400, "must be an object"),
    Case("v2, a name of 100000 characters",
         _inputs(_input([1, 1, 3], "INT64", [0, 0, 0], name="n" * 100_000)), 400, "'INT64'"),
    Case("v2, unknown output asked for",
         _inputs(_input([1, 1, 3], data=[0, 0, 0]), outputs=[{"name": "logits"}]), 400,
         "unknown output"),
    Case("v2, BYTES not base64", _inputs(_input([1], "BYTES", ["!!"])), 415, "not base64"),
    Case("v2, BYTES holding a PNG", _inputs(_input([1], "BYTES", [_PNG_B64])), 415,
         "not an .npy"),
]  # fmt: skip


def _binary(
    shape: list[int],
    data: bytes,
    datatype: str = "UINT8",
    size: int | None = None,
    tail: bytes = b"",
    length: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A v2 binary-data body (JSON header, then the tensor's bytes) and its headers."""
    tensor = {
        "name": "x",
        "datatype": datatype,
        "shape": shape,
        "parameters": {"binary_data_size": len(data) if size is None else size},
    }
    # Python writes 10**400 in full, which JSON allows; 1e400 is how a client writes it
    header = json.dumps({"inputs": [tensor]}).encode().replace(str(10**400).encode(), b"1e400")
    return header + data + tail, {BINARY_HEADER: length or str(len(header))}


def _with_headers(name: str, made: tuple[bytes, dict[str, str]], status: int, words: str) -> Case:
    body, headers = made
    return Case(name, body, status, words, {"Content-Type": "application/octet-stream", **headers})


_ELEMENT = struct.pack("<I", 0)  # a BYTES element of no bytes

# Bodies under the v2 binary-data extension: their header says where the JSON ends.
WITH_HEADERS: list[Case] = [
    _with_headers("binary, 10000 images in 30 KB", _binary([10000, 1, 1, 3], bytes(30000)), 413,
                  _LIMIT),
    _with_headers("binary, 10000 empty BYTES elements",
                  _binary([10000], _ELEMENT * 10000, "BYTES"), 413, _LIMIT),
    _with_headers("binary, shape 1e400", _binary([10**400], bytes(3), size=3), 400,
                  "shape must be a list of integers"),
    _with_headers("binary, header length beyond the body",
                  _binary([1, 1, 3], bytes(3), length="1000000"), 400, BINARY_HEADER),
    _with_headers("binary, header length not a number",
                  _binary([1, 1, 3], bytes(3), length="1e400"), 400, BINARY_HEADER),
    _with_headers("binary, data cut short", _binary([2, 2, 3], bytes(6), size=12), 400,
                  "truncated"),
    _with_headers("binary, bytes no input claims", _binary([1, 1, 3], bytes(3), tail=b"\0" * 7),
                  400, "no input claims"),
]  # fmt: skip

EVERY_HOSTILE: list[Case] = HOSTILE + WITH_HEADERS

# Unusual but safe: these must be served (200), not refused.
ACCEPTED_VARIANTS: list[tuple[str, bytes]] = [
    ("big-endian float32", encode_npy(_image(">f4"))),
    ("fortran order", encode_npy(np.asfortranarray(_image()))),
    ("grey", encode_npy(_image(shape=(24, 24)))),
    ("rgba", encode_npy(_image(shape=(24, 24, 4)))),
    ("float64", encode_npy(_image("f8"))),
]
