"""KServe's v1 and v2 inference protocols, as TorchServe's envelopes hand them to the handler.

With ``service_envelope=kserve`` (v1) the handler receives the request's ``instances``; with
``kservev2`` it receives the request's ``inputs`` (``{name, shape, datatype, data}``, BYTES data
already reduced to its first element); with no envelope, TorchServe's own request dicts holding
the raw ``.npy`` bytes. This module tells the three apart, turns each item into what
:meth:`Classifier.decode` takes (``.npy`` bytes or an array) and each answer into what the
envelope formats. It also builds requests and reads answers in each protocol, for deploy's smoke
test and for clients.

Accepted items:
- v1 instance: ``{"data": "<base64 of .npy bytes>"}`` (or ``"b64"``), or the image itself as a
  nested list (integers 0..255 as uint8, floats in [0, 1]).
- v2 input: datatype UINT8, FP32 or FP64 with shape [H, W, 3] (or [H, W], [H, W, 1|4]), or
  BYTES holding the base64 of ``.npy`` bytes.
TorchServe's envelopes answer one request per server batch (they read only the first request),
so a model behind one must be registered with ``batch_size=1``.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Literal

import numpy as np

from b4serve.codec import encode_npy
from b4serve.errors import (
    InferenceError,
    InvalidInput,
    UnsupportedMediaType,
    error_body,
    error_fields,
)  # fmt: skip

__all__ = [
    "ENVELOPES", "Protocol", "answer_of", "detect_protocol", "encode_request", "payload_of",
    "probabilities_of",
]  # fmt: skip

Protocol = Literal["raw", "v1", "v2"]
# TorchServe's service_envelope value for each protocol
ENVELOPES: dict[Protocol, str] = {"raw": "", "v1": "kserve", "v2": "kservev2"}
_V2_DTYPES = {"UINT8": np.uint8, "FP32": np.float32, "FP64": np.float64}


def detect_protocol(items: list[Any]) -> Protocol:
    """Which protocol a handler's ``data`` came in (all items of one batch share it)."""
    first = items[0] if items else None
    if isinstance(first, dict) and "datatype" in first and "shape" in first:
        return "v2"
    if isinstance(first, dict) and (
        "body" in first or isinstance(first.get("data"), bytes | bytearray)
    ):
        return "raw"
    return "v1" if items else "raw"


def payload_of(item: Any, protocol: Protocol) -> object:
    """``.npy`` bytes or an ndarray for one item; an :class:`InferenceError` if it is unusable.

    Errors are returned, not raised, so the caller can fail that item alone.
    """
    try:
        if protocol == "raw":
            return _raw_body(item)
        if protocol == "v2":
            return _v2_payload(item)
        return _v1_payload(item)
    except InferenceError as error:
        return error


def answer_of(
    probabilities: list[float] | None, error: InferenceError | None, protocol: Protocol
) -> Any:
    """What the handler returns for one item: JSON bytes (raw), a list (v1), FP32 array (v2);
    an error as ``{"code", "type", "message"}`` (bytes in raw mode)."""
    if error is not None:
        return error_body(error) if protocol == "raw" else error_fields(error)
    if protocol == "raw":
        return json.dumps(probabilities).encode()
    if protocol == "v2":
        return np.asarray(probabilities, dtype=np.float32)  # the envelope names it FP32
    return probabilities


def _raw_body(item: Any) -> object:
    if isinstance(item, dict):
        for key in ("data", "body"):
            if item.get(key) is not None:
                return item[key]
        return None
    return item


def _v1_payload(instance: Any) -> object:
    if isinstance(instance, dict):
        for key in ("data", "b64", "body"):
            if isinstance(instance.get(key), str | bytes | bytearray):
                return _base64_npy(instance[key], f"instance field {key!r}")
        raise InvalidInput(
            'a v1 instance must be {"data": "<base64 of .npy bytes>"} or the image as a nested '
            f"list; got an object with keys {sorted(instance)[:5]}"
        )
    if isinstance(instance, list):
        return _json_image(instance)
    if isinstance(instance, str):
        return _base64_npy(instance, "instance")
    kind = type(instance).__name__
    raise InvalidInput(f"a v1 instance must be an object or a nested list, not {kind}")


def _v2_payload(tensor: dict[str, Any]) -> object:
    datatype = tensor.get("datatype")
    data = tensor.get("data")
    if datatype == "BYTES":
        if isinstance(data, list) and data:
            data = data[0]
        if not isinstance(data, str | bytes | bytearray):
            raise InvalidInput("a BYTES input must hold the base64 of .npy bytes as its element")
        return _base64_npy(data, f"input {tensor.get('name')!r}")
    if datatype not in _V2_DTYPES:
        raise InvalidInput(
            f"input {tensor.get('name')!r} has datatype {datatype!r}; "
            f"send {', '.join(_V2_DTYPES)} [H, W, 3] or BYTES (.npy)"
        )
    try:
        array = np.asarray(data, dtype=_V2_DTYPES[datatype])
        shape = tuple(int(side) for side in tensor.get("shape", ()))
        if array.size != int(np.prod(shape)):
            raise ValueError(f"{array.size} values for shape {list(shape)}")
        return array.reshape(shape)
    except (TypeError, ValueError, OverflowError) as error:
        raise InvalidInput(f"input {tensor.get('name')!r}: {error}") from None


def _json_image(rows: list[Any]) -> np.ndarray:
    try:
        array = np.asarray(rows)
    except ValueError as error:  # ragged
        raise InvalidInput(f"the image is not a rectangular array: {error}") from None
    if array.dtype.kind in "iu":
        if array.size and (array.min() < 0 or array.max() > 255):
            raise InvalidInput("integer pixels must be in 0..255 (uint8)")
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        return array.astype(np.float64)
    raise InvalidInput(f"the image must hold numbers, got {array.dtype.kind!r} values")


def _base64_npy(text: str | bytes | bytearray, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UnsupportedMediaType(
            f"{where} is not base64 (of the bytes written by numpy.save)"
        ) from None


def encode_request(image: np.ndarray, protocol: Protocol, name: str = "image") -> tuple[bytes, str]:
    """A request body and its content type carrying ``image`` in ``protocol``."""
    if protocol == "raw":
        return encode_npy(image), "application/octet-stream"
    if protocol == "v1":
        text = base64.b64encode(encode_npy(image)).decode()
        return json.dumps({"instances": [{"data": text}]}).encode(), "application/json"
    datatype = {np.dtype(v): k for k, v in _V2_DTYPES.items()}.get(image.dtype)
    if datatype is None:
        raise ValueError(f"no v2 datatype for {image.dtype}")
    tensor = {"name": name, "shape": list(image.shape), "datatype": datatype,
              "data": image.ravel().tolist()}  # fmt: skip
    return json.dumps({"inputs": [tensor]}).encode(), "application/json"


def probabilities_of(answer: Any, protocol: Protocol) -> list[list[float]]:
    """The probability lists in a parsed JSON answer, one per image sent."""
    if protocol == "raw":
        return [answer]
    if protocol == "v1":
        return list(answer["predictions"])
    return [output["data"] for output in answer["outputs"]]
