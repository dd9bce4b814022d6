"""Raw request bytes -> ndarray: the .npy header is checked before any array memory is touched."""

from __future__ import annotations

import io
import math
import tokenize

import numpy as np

from b4serve.serving.config import MAX_BODY_BYTES, MAX_HEADER_BYTES
from b4serve.serving.errors import (
    InferenceError,
    InvalidInput,
    PayloadTooLarge,
    UnsupportedMediaType,
)

__all__ = [
    "ACCEPTED_DTYPES",
    "check_array",
    "check_body_size",
    "declared_pixels",
    "decode_npy",
    "encode_npy",
    "image_pixels",
]

_MAGIC = b"\x93NUMPY"
ACCEPTED_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32), np.dtype(np.float64))
_ACCEPTED_NAMES = ", ".join(d.name for d in ACCEPTED_DTYPES)
_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def encode_npy(array: np.ndarray) -> bytes:
    """The bytes ``np.save`` writes for ``array`` (what clients send)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def check_body_size(size: int, limit: int = MAX_BODY_BYTES) -> None:
    """Refuse a body of ``size`` bytes over ``limit`` (:class:`PayloadTooLarge`), before any
    parsing: every request form is bounded by bytes, not only by what its header declares."""
    if size > limit:
        raise PayloadTooLarge(
            f"the body is {size} bytes; the limit is {limit} (a 2048x2048 RGBA uint8 image as "
            ".npy): send uint8 pixels, or a smaller image"
        )


def decode_npy(body: object, max_pixels: int) -> np.ndarray:
    """Decode one request body written by ``np.save`` into an image-shaped array.

    Accepts uint8, float32 and float64 arrays shaped HxW or HxWxC with C in (1, 3, 4), in either
    byte order and memory order. The returned array is a read-only view of ``body`` when
    possible. Raises :class:`UnsupportedMediaType` for bodies that are not .npy at all,
    :class:`PayloadTooLarge` above ``max_pixels`` or :data:`MAX_BODY_BYTES`, :class:`InvalidInput`
    for everything else.
    Pickled (object) arrays are refused from the header alone and never unpickled.
    """
    if body is None:
        raise UnsupportedMediaType(
            "no .npy body: send the bytes written by numpy.save as the request body "
            "(Content-Type: application/octet-stream) or as a multipart field named 'data'"
        )
    if isinstance(body, str | dict | list):
        raise UnsupportedMediaType(
            "expected the raw bytes written by numpy.save (send them with "
            "'Content-Type: application/octet-stream'), got a decoded text/JSON body"
        )
    if not isinstance(body, bytes | bytearray | memoryview):
        raise UnsupportedMediaType(f"expected raw .npy bytes, got {type(body).__name__}")
    data = memoryview(body).cast("B")
    check_body_size(len(data))
    if len(data) == 0:
        raise InvalidInput("empty body: expected the bytes written by numpy.save")
    prefix = bytes(data[: len(_MAGIC)])
    if prefix != _MAGIC:
        if _MAGIC.startswith(prefix):
            raise InvalidInput(f"truncated .npy header: only {len(data)} bytes")
        raise UnsupportedMediaType(
            "body is not an .npy file (no NumPy magic bytes); send the bytes written by numpy.save"
        )
    shape, fortran_order, dtype, offset = _read_header(data)
    _check_dtype(dtype)
    _check_shape(shape, max_pixels)
    expected = math.prod(shape) * dtype.itemsize
    available = len(data) - offset
    if available < expected:
        raise InvalidInput(
            f"truncated array data: header declares shape {shape} {dtype.name} "
            f"({expected} bytes) but the body holds {available}"
        )
    if available > expected:
        raise InvalidInput(f"{available - expected} unexpected bytes after the array data")
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")


def declared_pixels(body: object) -> int:
    """The pixels an ``.npy`` body's header declares (:func:`image_pixels`), read from the header
    alone; 0 for a body without a readable header (its decode says what is wrong)."""
    if not isinstance(body, bytes | bytearray | memoryview):
        return 0
    data = memoryview(body).cast("B")
    if bytes(data[: len(_MAGIC)]) != _MAGIC:
        return 0
    try:
        shape, _, _, _ = _read_header(data)
    except InferenceError:
        return 0
    return image_pixels(shape)


def image_pixels(shape: tuple[int, ...]) -> int:
    """Pixels of an image shaped HxW or HxWxC (H*W); 0 for any other rank, which decoding
    refuses from the shape before it allocates anything."""
    return shape[0] * shape[1] if len(shape) in (2, 3) else 0


def check_array(array: np.ndarray, max_pixels: int) -> np.ndarray:
    """The same dtype and shape rules as :func:`decode_npy`, for an array decoded elsewhere
    (a KServe tensor); returns ``array``."""
    _check_dtype(array.dtype)
    _check_shape(array.shape, max_pixels)
    return array


def _read_header(data: memoryview) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    if len(data) < len(_MAGIC) + 2:
        raise InvalidInput(f"truncated .npy header: only {len(data)} bytes")
    version = (data[6], data[7])
    reader = _HEADER_READERS.get(version)
    if reader is None:
        raise InvalidInput(
            f".npy format version {version[0]}.{version[1]} is not supported (1.0 and 2.0 are); "
            "save a plain numeric array with numpy.save"
        )
    # Only the header's bytes are copied, never the array's.
    stream = io.BytesIO(bytes(data[8 : 8 + 4 + MAX_HEADER_BYTES]))
    try:
        shape, fortran_order, dtype = reader(stream, max_header_size=MAX_HEADER_BYTES)
    except (ValueError, SyntaxError, TypeError, EOFError, tokenize.TokenError) as exc:
        raise InvalidInput(f"malformed .npy header: {_first_line(exc)}") from None
    if not isinstance(shape, tuple) or not all(isinstance(d, int) for d in shape):
        raise InvalidInput(f"malformed .npy header: shape {shape!r} is not a tuple of ints")
    return shape, bool(fortran_order), np.dtype(dtype), 8 + stream.tell()


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise InvalidInput("object arrays are refused (they would need unpickling); send numbers")
    if dtype.newbyteorder("=") not in ACCEPTED_DTYPES:
        raise InvalidInput(
            f"dtype {dtype.str!r} ({dtype.name}) is not accepted; use one of {_ACCEPTED_NAMES}"
        )


def _check_shape(shape: tuple[int, ...], max_pixels: int) -> None:
    if any(side < 0 for side in shape):
        raise InvalidInput(f"malformed .npy header: negative dimension in shape {shape}")
    if len(shape) not in (2, 3):
        raise InvalidInput(f"expected an image HxW or HxWxC, got {len(shape)}-d shape {shape}")
    if len(shape) == 3 and shape[2] not in (1, 3, 4):
        raise InvalidInput(f"expected 1, 3 or 4 channels (grey, RGB, RGBA), got shape {shape}")
    height, width = shape[0], shape[1]
    if height <= 0 or width <= 0:
        raise InvalidInput(f"empty image: shape {shape}")
    if height * width > max_pixels:
        raise PayloadTooLarge(
            f"image {height}x{width} has {height * width} pixels; the limit is {max_pixels}"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
