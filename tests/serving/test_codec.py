"""decode_npy: every accepted form decodes exactly; every rejected form fails with its own error."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from b4serve.serving.codec import decode_npy, encode_npy
from b4serve.serving.config import DEFAULT_MAX_PIXELS, MAX_BODY_BYTES
from b4serve.serving.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

LIMIT = 256 * 256


@pytest.mark.parametrize(
    "array",
    [
        np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3),
        np.arange(5 * 7, dtype=np.uint8).reshape(5, 7),
        np.arange(5 * 7, dtype=np.uint8).reshape(5, 7, 1),
        np.arange(5 * 7 * 4, dtype=np.uint8).reshape(5, 7, 4),
        np.linspace(0, 1, 5 * 7 * 3, dtype=np.float32).reshape(5, 7, 3),
        np.linspace(0, 1, 5 * 7 * 3, dtype=np.float64).reshape(5, 7, 3),
        np.linspace(0, 1, 5 * 7 * 3).astype(">f8").reshape(5, 7, 3),
        np.asfortranarray(np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)),
    ],
    ids=["rgb", "grey", "grey1", "rgba", "f32", "f64", "big-endian", "fortran"],
)
def test_accepted_arrays_round_trip_exactly(array: np.ndarray) -> None:
    decoded = decode_npy(encode_npy(array), LIMIT)
    assert decoded.shape == array.shape
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


def test_bytearray_and_memoryview_bodies_decode() -> None:
    array = np.full((4, 4, 3), 7, dtype=np.uint8)
    body = encode_npy(array)
    np.testing.assert_array_equal(decode_npy(bytearray(body), LIMIT), array)
    np.testing.assert_array_equal(decode_npy(memoryview(body), LIMIT), array)


def test_decoded_array_is_a_view_of_the_body_not_a_copy() -> None:
    body = bytearray(encode_npy(np.zeros((4, 4, 3), dtype=np.uint8)))
    decoded = decode_npy(body, LIMIT)
    body[-1] = 9
    assert decoded[-1, -1, -1] == 9


def _declared(shape: str, descr: str = "<u1") -> bytes:
    """A v1.0 header declaring ``shape`` with no data after it."""
    return _header_v1(f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}")


def _header_v1(header: str) -> bytes:
    encoded = header.encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(encoded)) + encoded


@pytest.mark.parametrize(
    ("body", "error", "words"),
    [
        (b"", InvalidInput, "empty body"),
        (b"\x93NUM", InvalidInput, "truncated"),
        (b"\x89PNG\r\n\x1a\n....", UnsupportedMediaType, "not an .npy"),
        (b'{"instances": [1, 2]}', UnsupportedMediaType, "not an .npy"),
        (b"\x93NUMPY\x01", InvalidInput, "truncated"),
        (b"\x93NUMPY\x03\x00" + b"\x00" * 20, InvalidInput, "version 3.0"),
        (_declared("(2, 2, 3)"), InvalidInput, "truncated array data"),
        (
            _header_v1("{'descr': '<u1', 'fortran_order': False, 'shape': (2, 2, 3)"),
            InvalidInput,
            "malformed",
        ),
        (_header_v1("__import__('os').system('true')"), InvalidInput, "malformed"),
        (_declared("(2, 2)", "|O"), InvalidInput, "object arrays"),
        (_declared("(100000, 100000, 3)"), PayloadTooLarge, "limit"),
        (_declared("(0, 5, 3)"), InvalidInput, "empty image"),
        (_declared("(10,)"), InvalidInput, "1-d"),
        (_declared("(2, 2, 2, 3)"), InvalidInput, "4-d"),
        (_declared("(2, 2, 2)"), InvalidInput, "channels"),
    ],
    ids=[
        "empty",
        "short-magic",
        "png",
        "json",
        "no-version",
        "v3",
        "truncated-data",
        "bad-header",
        "code-in-header",
        "object",
        "huge-shape",
        "zero-size",
        "1d",
        "4d",
        "2ch",
    ],
)
def test_rejected_bodies_name_the_problem(body: bytes, error: type, words: str) -> None:
    with pytest.raises(error) as caught:
        decode_npy(body, LIMIT)
    assert words in caught.value.message


@pytest.mark.parametrize("dtype", ["int64", "bool", "complex64", "float16", "int8", "uint16"])
def test_unaccepted_dtypes_are_refused_naming_the_dtype(dtype: str) -> None:
    with pytest.raises(InvalidInput, match=f"{dtype}.*not accepted"):
        decode_npy(encode_npy(np.zeros((4, 4, 3), dtype=dtype)), LIMIT)


def _explode() -> None:  # pragma: no cover - runs only if the decoder unpickles
    raise AssertionError("the decoder unpickled a request body")


class _Boom:
    def __reduce__(self) -> tuple:
        return (_explode, ())


def test_pickled_object_array_is_never_unpickled() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([_Boom()], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidInput, match="object arrays"):
        decode_npy(buffer.getvalue(), LIMIT)


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(InvalidInput, match="unexpected bytes"):
        decode_npy(encode_npy(np.zeros((4, 4), np.uint8)) + b"\x00", LIMIT)


def test_text_or_json_payloads_get_415_with_a_hint() -> None:
    for body in ("text", {"data": 1}, [1, 2]):
        with pytest.raises(UnsupportedMediaType, match="application/octet-stream") as caught:
            decode_npy(body, LIMIT)
        assert caught.value.status == 415


def test_pixel_limit_is_exact() -> None:
    assert decode_npy(encode_npy(np.zeros((256, 256), np.uint8)), LIMIT).shape == (256, 256)
    with pytest.raises(PayloadTooLarge) as caught:
        decode_npy(encode_npy(np.zeros((256, 257), np.uint8)), LIMIT)
    assert caught.value.status == 413


def test_the_largest_uint8_image_is_accepted_and_one_byte_more_is_not() -> None:
    body = encode_npy(np.zeros((2048, 2048, 4), np.uint8))
    assert len(body) <= MAX_BODY_BYTES
    assert decode_npy(body, DEFAULT_MAX_PIXELS).shape == (2048, 2048, 4)
    # the same pixels as float32 are 4x the bytes: refused for their size, before the header
    too_big = encode_npy(np.zeros((1200, 1200, 3), np.float32))
    assert len(too_big) > MAX_BODY_BYTES
    with pytest.raises(PayloadTooLarge, match=f"limit is {MAX_BODY_BYTES}.*send uint8") as caught:
        decode_npy(too_big, DEFAULT_MAX_PIXELS)
    assert caught.value.status == 413
