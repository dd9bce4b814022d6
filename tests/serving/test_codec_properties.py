"""Property-based tests of the decoder: every generated array round-trips, no input crashes it."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from b4serve.serving.codec import decode_npy, encode_npy
from b4serve.serving.errors import InferenceError

LIMIT = 64 * 64
ACCEPTED = st.sampled_from(["u1", "<f4", ">f4", "<f8", ">f8"])
IMAGE_SHAPES = st.one_of(
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=24),
    st.tuples(
        st.integers(1, 24), st.integers(1, 24), st.sampled_from([1, 3, 4])
    ),
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(ACCEPTED, IMAGE_SHAPES), st.booleans())
def test_every_accepted_array_round_trips_exactly(array: np.ndarray, fortran: bool) -> None:
    if fortran:
        array = np.asfortranarray(array)
    decoded = decode_npy(encode_npy(array), LIMIT)
    assert decoded.shape == array.shape and decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)  # NaNs compare equal here


def assert_same_as_numpy(body: bytes, decoded: np.ndarray) -> None:
    """An accepted body decodes to exactly what numpy's own reader makes of it."""
    reference = np.load(io.BytesIO(body), allow_pickle=False)
    assert decoded.ndim in (2, 3)
    assert decoded.shape == reference.shape and decoded.dtype == reference.dtype
    np.testing.assert_array_equal(decoded, reference)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_decode_or_fail_with_our_error(body: bytes) -> None:
    try:
        decoded = decode_npy(body, LIMIT)
    except InferenceError as error:
        assert 400 <= error.status < 500 and error.message
    else:
        assert_same_as_numpy(body, decoded)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 3), st.integers(0, 3), st.binary(max_size=300))
def test_garbage_after_a_valid_magic_fails_cleanly(major: int, minor: int, rest: bytes) -> None:
    body = b"\x93NUMPY" + bytes([major, minor]) + rest
    try:
        decoded = decode_npy(body, LIMIT)
    except InferenceError as error:
        assert 400 <= error.status < 500
    else:
        assert_same_as_numpy(body, decoded)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_mutated_valid_bodies_never_escape_our_errors(data: st.DataObject) -> None:
    array = data.draw(hnp.arrays(ACCEPTED, IMAGE_SHAPES))
    body = bytearray(encode_npy(array))
    header_end = len(body) - array.nbytes
    positions = data.draw(st.lists(st.integers(0, len(body) - 1), min_size=1, max_size=4))
    for position in positions:
        body[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.just(len(body)), st.integers(0, len(body))))
    try:
        decoded = decode_npy(bytes(body[:cut]), LIMIT)
    except InferenceError as error:
        assert 400 <= error.status < 500
        # changed pixels leave a whole body valid: only a cut or a changed header is refused
        assert cut < len(body) or min(positions) < header_end, error.message
    else:  # whatever was accepted decodes as numpy itself reads it
        assert_same_as_numpy(bytes(body[:cut]), decoded)


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(
        st.sampled_from(["i8", "i2", "u2", "b1", "c8", "f2", "M8[s]"]),
        st.tuples(st.integers(1, 8), st.integers(1, 8), st.just(3)),
    )
)
def test_refused_dtypes_are_refused_by_name(array: np.ndarray) -> None:
    try:
        decode_npy(encode_npy(array), LIMIT)
    except InferenceError as error:
        assert "not accepted" in error.message
    else:
        raise AssertionError(f"{array.dtype} was accepted")
