"""KServe's v1 and v2 inference protocols: requests in, answers out, and the v2 model metadata.

Without an envelope (how we serve) the handler takes KServe requests itself, one per TorchServe
request, so they are batched like ``.npy`` bodies and fail alone (:func:`parse_raw_request`): a
v1 or v2 JSON body, or v2 with the binary-data extension (header
``Inference-Header-Content-Length``), on ``/predictions/<model>`` or, through our frontend plugin
(plugins/v2), on ``/v2/models/<model>/infer``. With TorchServe's ``service_envelope=kserve`` (v1)
the handler receives the request's ``instances``; with ``kservev2`` its ``inputs`` (BYTES data
already reduced to its first element). This module tells the forms apart, turns each item into
what :meth:`Classifier.decode` takes (``.npy`` bytes or an array) and each answer into the
caller's protocol. It also builds requests and reads answers, for deploy's smoke test and clients.

Accepted items:
- v1 instance: ``{"data": "<base64 of .npy bytes>"}`` (or ``"b64"``), or the image itself as a
  nested list (integers 0..255 as uint8, floats in [0, 1]).
- v2 input: datatype UINT8, FP32 or FP64 holding one image, shape [H, W, 3] (or [H, W],
  [H, W, 1|4]), or a batch of them, shape [N, H, W, C]; or BYTES, shape [N], each element the
  ``.npy`` bytes of one image (base64 in JSON, length-prefixed under the binary-data extension).
  A request may hold several inputs, whatever their names.
Each request is bounded (:class:`RequestLimits`): its images and their pixels are counted from
shapes and ``.npy`` headers before any array is built, and a request over either limit gets one
413. Whatever a request holds, parsing ends in its payloads or its own error (fuzz/).
A v2 answer has one output, :data:`OUTPUT_NAME`, FP32: shape [classes] for a request holding one
image without a batch dimension, [N, classes] for N images otherwise, in the order sent. It comes
as JSON, or under the binary-data extension when the request asks for it (``binary_data_output``,
or ``binary_data`` on the requested output), as tritonclient does by default.
TorchServe's envelopes answer one request per server batch (they read only the first request),
so a model behind one must be registered with ``batch_size=1``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from b4serve.serving.codec import check_body_size, declared_pixels, encode_npy, image_pixels
from b4serve.serving.config import DEFAULT_MAX_IMAGES, DEFAULT_MAX_REQUEST_PIXELS, ModelConfig
from b4serve.serving.errors import (
    InferenceError,
    InvalidInput,
    PayloadTooLarge,
    UnsupportedMediaType,
    error_body,
    error_fields,
)

__all__ = [
    "BINARY_HEADER",
    "INPUT_NAME",
    "METADATA_FILE",
    "OUTPUT_NAME",
    "ParsedRequest",
    "Protocol",
    "RawAnswer",
    "RequestLimits",
    "answer_of",
    "detect_protocol",
    "encode_request",
    "encode_v2_binary",
    "header_length",
    "model_metadata",
    "parse_raw_request",
    "parse_requests",
    "payload_of",
    "probabilities_of",
    "raw_answer",
    "write_model_metadata",
]

Protocol = Literal["raw", "v1", "v2"]
_V2_DTYPES = {"UINT8": np.uint8, "FP32": np.float32, "FP64": np.float64}
# The v2 binary-data extension: the JSON header's length in bytes; the tensors' bytes follow it.
BINARY_HEADER = "Inference-Header-Content-Length"
# The v2 names: the input our metadata declares (any name is accepted) and the one output.
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
# v2 model metadata, written into the archive at export; the frontend plugin serves it.
METADATA_FILE = "v2_metadata.json"
_PLATFORMS = {"torchscript": "pytorch_torchscript", "onnxruntime": "onnxruntime_onnx"}
# How much of a client's value an error message repeats (a name may be megabytes long).
_QUOTED_CHARS = 60

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold: images, and their pixels in all (ModelConfig's fields)."""

    images: int = DEFAULT_MAX_IMAGES
    pixels: int = DEFAULT_MAX_REQUEST_PIXELS

    @classmethod
    def of(cls, config: ModelConfig) -> RequestLimits:
        """The limits ``config`` records."""
        return cls(config.max_images, config.max_request_pixels)


class _Tally:
    """One request's images and pixels as its parts are found; 413 once either is over."""

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        self.images = 0
        self.pixels = 0

    def add(self, images: int, pixels: int = 0) -> None:
        self.images += images
        self.pixels += pixels
        if self.images > self.limits.images:
            raise PayloadTooLarge(
                f"the request holds at least {self.images} images; the limit is "
                f"{self.limits.images} per request: send them in several requests"
            )
        if self.pixels > self.limits.pixels:
            raise PayloadTooLarge(
                f"the request's images hold at least {self.pixels} pixels; the limit is "
                f"{self.limits.pixels} per request: send them in several requests"
            )


@dataclass
class ParsedRequest:
    """One TorchServe request: its images and the form of its answer.

    ``form`` is ``npy`` (a raw ``.npy`` body, answered with the JSON probability list), ``v1`` or
    ``v2`` (a KServe request, answered with a KServe response document: by the handler without
    an envelope, by TorchServe's envelope otherwise).
    """

    payloads: list[object]  # .npy bytes, arrays, or the InferenceError an item failed with
    form: Literal["npy", "v1", "v2"] = "npy"
    request_id: str | None = None
    # v2: one image sent without a batch dimension, answered with shape [classes], not [N, ...]
    single: bool = False
    binary_output: bool = False  # v2: answer under the binary-data extension


@dataclass(frozen=True)
class RawAnswer:
    """The body of one answer without an envelope, its content type and extra headers."""

    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def header_length(headers: Mapping[str, str]) -> int | None:
    """The binary-data extension's JSON header length, if the request declares one."""
    for name, value in headers.items():
        if name.lower() == BINARY_HEADER.lower():
            try:
                return int(value)
            except (TypeError, ValueError):
                return -1  # present but not a number: parse_raw_request refuses it
    return None


def parse_requests(
    data: list[Any],
    headers_of: Callable[[int], Mapping[str, str]],
    limits: RequestLimits | None = None,
) -> list[ParsedRequest]:
    """The requests of one server batch with their images (the handler's whole parse):
    ``.npy`` bytes or KServe requests in the body, each with its headers (``headers_of(i)``),
    or under a KServe envelope the instances or inputs of one KServe request.

    Never raises: a request the parser cannot take is that request's own error."""
    limits = limits or RequestLimits()
    protocol = detect_protocol(data)
    if protocol != "raw":  # one KServe request, opened by TorchServe's envelope
        return [_guarded(enveloped_request, data, protocol, limits)]
    return [
        _guarded(parse_raw_request, item, header_length(headers_of(i)), limits)
        for i, item in enumerate(data)
    ]


def _guarded(parse: Callable[..., ParsedRequest], *args: Any) -> ParsedRequest:
    """``parse(*args)``, or if it fails with anything but a request error (a parser bug the
    fuzz target missed) that request alone answered 400, the traceback in the log."""
    try:
        return parse(*args)
    except Exception:  # whatever it is, it must not fail the batch
        log.exception("the request parser failed; the request is answered 400")
        return ParsedRequest([InvalidInput("the request could not be parsed")])


def enveloped_request(
    items: list[Any], protocol: Literal["v1", "v2"], limits: RequestLimits | None = None
) -> ParsedRequest:
    """The one KServe request a TorchServe envelope delivered: its v1 instances or (kservev2)
    inputs, one image each, counted against ``limits`` before any is decoded."""
    tally = _Tally(limits or RequestLimits())
    try:
        tally.add(len(items))
        for item in items:
            tally.add(0, _declared_pixels(item, protocol))
    except PayloadTooLarge as error:  # one error, not one per instance: 20,000 would be 3 MB
        return ParsedRequest([error], form=protocol)
    return ParsedRequest([payload_of(item, protocol) for item in items], form=protocol)


def _declared_pixels(item: Any, protocol: Literal["v1", "v2"]) -> int:
    """The pixels an envelope's item declares: a v2 input's shape, a v1 nested list's sides."""
    if protocol == "v2":
        return _declared(item)[1] if isinstance(item, dict) else 0
    return _nested_pixels(item)


def parse_raw_request(
    item: Any, binary_header_length: int | None = None, limits: RequestLimits | None = None
) -> ParsedRequest:
    """What one request without an envelope carries: ``.npy`` bytes, or a KServe request.

    A body over the byte limit is refused before it is parsed (a JSON document costs many times
    its size in Python objects), one over ``limits`` before any image is decoded."""
    body = _raw_body(item)
    tally = _Tally(limits or RequestLimits())
    try:
        if isinstance(body, bytes | bytearray | memoryview):
            check_body_size(memoryview(body).nbytes)
        if binary_header_length is not None:
            return _v2_document(*_split_binary(body, binary_header_length), tally)
        if isinstance(body, bytes | bytearray) and body[:1] == b"{":
            return _json_document(bytes(body), tally)
    except InferenceError as error:  # a KServe request, if unusable: KServe's error object
        return ParsedRequest([error], form="v2")
    return ParsedRequest([body])


def _split_binary(body: object, length: int) -> tuple[dict[str, Any], memoryview]:
    if not isinstance(body, bytes | bytearray) or not 0 < length <= len(body):
        raise InvalidInput(f"{BINARY_HEADER} must be a length within the body, got {length}")
    document = _load_json(bytes(body[:length]))
    return document, memoryview(body)[length:]


def _load_json(text: bytes) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except RecursionError:
        raise InvalidInput("the JSON document is nested too deeply") from None
    except ValueError as error:  # not JSON, not UTF-8, or an integer of thousands of digits
        raise UnsupportedMediaType(
            f"body is neither .npy nor valid JSON: {_first_line(error)}"
        ) from None
    if not isinstance(document, dict):
        raise UnsupportedMediaType("a JSON body must be a KServe v1 or v2 request object")
    return document


def _json_document(text: bytes, tally: _Tally) -> ParsedRequest:
    document = _load_json(text)
    if "inputs" in document:
        return _v2_document(document, memoryview(b""), tally)
    if "instances" in document and isinstance(document["instances"], list):
        instances = document["instances"]
        tally.add(len(instances))
        payloads: list[object] = []
        for instance in instances:
            tally.add(0, _nested_pixels(instance))  # before np.asarray builds the image
            payloads.append(payload_of(instance, "v1"))
            tally.add(0, declared_pixels(payloads[-1]))  # base64 .npy: from its header
        return ParsedRequest(payloads or [_empty()], form="v1")
    raise UnsupportedMediaType(
        'a JSON body must be a KServe v1 request ({"instances": [...]}) or v2 request '
        '({"inputs": [...]}); for .npy bytes send Content-Type: application/octet-stream'
    )


def _empty() -> InferenceError:
    return InvalidInput("the request holds no image")


def _nested_pixels(rows: Any) -> int:
    """The pixels a v1 image sent as nested lists declares (rows x first row's length)."""
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], list):
        return 0
    return len(rows) * len(rows[0])


def _declared(tensor: dict[str, Any]) -> tuple[int, int]:
    """The images and pixels a v2 input's shape declares; (1, 0) if the shape is unusable
    (the input then fails alone). BYTES elements' pixels are in their own ``.npy`` headers."""
    try:
        shape = _shape(tensor)
    except ValueError:
        return 1, 0
    if str(tensor.get("datatype")) == "BYTES":
        return math.prod(shape), 0
    if len(shape) == 4:
        return shape[0], shape[0] * image_pixels(shape[1:])
    return 1, image_pixels(shape)


def _v2_document(document: dict[str, Any], binary: memoryview, tally: _Tally) -> ParsedRequest:
    request_id = document.get("id") if isinstance(document.get("id"), str) else None
    try:
        binary_output = _wants_binary_output(document)
    except InvalidInput as error:
        return ParsedRequest([error], form="v2", request_id=request_id)
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        return ParsedRequest([_empty()], form="v2", request_id=request_id)
    payloads: list[object] = []
    batched = False
    offset = 0
    for tensor in inputs:
        if not isinstance(tensor, dict):
            payloads.append(InvalidInput("each v2 input must be an object"))
            continue
        batched = batched or _has_batch_dimension(tensor)
        tally.add(*_declared(tensor))  # over a limit: 413 before any array is built
        try:
            size = _binary_data_size(tensor)
        except InvalidInput as error:
            payloads.append(error)
            continue
        if size is None:  # JSON data
            images = _v2_images(tensor)
        else:
            chunk = binary[offset : offset + size]
            offset += size
            images = _binary_images(tensor, chunk, size)
        tally.add(0, sum(declared_pixels(image) for image in images))  # BYTES: .npy headers
        payloads.extend(images)
    if offset < len(binary):  # (too little data is reported by the input it cut short)
        extra = InvalidInput(f"{len(binary) - offset} bytes of binary data no input claims")
        payloads = [extra] * len(payloads)
    return ParsedRequest(
        payloads or [_empty()],
        form="v2",
        request_id=request_id,
        single=len(inputs) == 1 and len(payloads) == 1 and not batched,
        binary_output=binary_output,
    )


def _wants_binary_output(document: dict[str, Any]) -> bool:
    """Whether the answer goes under the binary-data extension; refuses unknown outputs."""
    parameters = document.get("parameters")
    wanted = isinstance(parameters, dict) and parameters.get("binary_data_output") is True
    requested = document.get("outputs")
    if requested is None:
        return wanted
    if not isinstance(requested, list):
        raise InvalidInput(
            f'"outputs" must be a list of requested outputs, got {_quoted(requested)}'
        )
    for output in requested:
        name = output.get("name") if isinstance(output, dict) else None
        if name != OUTPUT_NAME:
            raise InvalidInput(
                f"unknown output {_quoted(name)}: this model has one output, {OUTPUT_NAME!r}"
            )
        options = output.get("parameters")
        if isinstance(options, dict) and "binary_data" in options:
            wanted = options["binary_data"] is True
    return wanted


def _has_batch_dimension(tensor: dict[str, Any]) -> bool:
    """A leading image dimension: [N, H, W, C] tensors, BYTES of shape [N] with N != 1."""
    shape = tensor.get("shape")
    if not isinstance(shape, list):
        return False
    if str(tensor.get("datatype")) == "BYTES":
        return shape != [1]
    return len(shape) == 4


def _binary_data_size(tensor: dict[str, Any]) -> int | None:
    """The input's ``binary_data_size`` parameter: its byte count in the binary part, if any."""
    parameters = tensor.get("parameters")
    if parameters is None:
        return None
    if not isinstance(parameters, dict):
        raise InvalidInput(f"input {_name(tensor)}: parameters must be an object")
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(
            f"input {_name(tensor)}: binary_data_size must be a byte count, got {_quoted(size)}"
        )
    return size


def _binary_images(tensor: dict[str, Any], chunk: memoryview, size: int) -> list[object]:
    """One input's images under the binary-data extension: a raw little-endian tensor, or BYTES
    elements each preceded by its 4-byte little-endian length (each the .npy of one image)."""
    name = _name(tensor)
    if len(chunk) < size:
        return [InvalidInput(f"input {name}: binary data truncated ({len(chunk)} of {size} bytes)")]
    datatype = str(tensor.get("datatype"))  # anything else JSON holds is no datatype
    try:
        shape = _shape(tensor)
        if datatype == "BYTES":
            return list(_bytes_elements(chunk, math.prod(shape)))
        if datatype not in _V2_DTYPES:
            return [_unsupported_datatype(name, datatype)]
        dtype = np.dtype(_V2_DTYPES[datatype]).newbyteorder("<")
        if math.prod(shape) * dtype.itemsize != size:
            raise ValueError(f"{size} bytes do not hold a {datatype} tensor of shape {list(shape)}")
        return _split_batch(np.frombuffer(chunk, dtype=dtype).reshape(shape))
    except (TypeError, ValueError) as error:
        return [InvalidInput(f"input {name}: {_first_line(error)}")]


def _bytes_elements(chunk: memoryview, count: int) -> list[bytes]:
    elements: list[bytes] = []
    offset = 0
    while offset < len(chunk):
        if len(chunk) - offset < 4:
            raise ValueError("BYTES data needs a 4-byte length before each element")
        (length,) = struct.unpack_from("<I", chunk, offset)
        if length > len(chunk) - offset - 4:
            raise ValueError(f"BYTES element of {length} bytes overruns the data")
        elements.append(bytes(chunk[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    if len(elements) != count or not elements:
        raise ValueError(f"{len(elements)} BYTES elements for shape of {count}")
    return elements


def _shape(tensor: dict[str, Any]) -> tuple[int, ...]:
    """The input's shape: a list of non-negative integers (nothing else is cast to one)."""
    shape = tensor.get("shape", [])
    if not isinstance(shape, list | tuple) or not all(
        isinstance(side, int) and not isinstance(side, bool) for side in shape
    ):
        raise ValueError(f"shape must be a list of integers, got {_quoted(shape)}")
    if min(shape, default=0) < 0:
        raise ValueError(f"shape {_quoted(shape)} has a negative side")
    return tuple(shape)


def _split_batch(array: np.ndarray) -> list[object]:
    """The images of one tensor: itself, or each [H, W, C] of an [N, H, W, C] batch."""
    return list(array) if array.ndim == 4 else [array]


def detect_protocol(items: list[Any]) -> Protocol:
    """Which protocol a handler's ``data`` came in (all items of one batch share it).

    Without an envelope every item is TorchServe's dict of request parameters holding bytes
    (``decode_input_request=false``); under ``kservev2`` each is a tensor dict; under ``kserve``
    each is whatever the v1 instances held.
    """
    if any(_is_torchserve_request(item) for item in items) or not items:
        return "raw"
    first = items[0]
    if isinstance(first, dict) and "datatype" in first and "shape" in first:
        return "v2"
    return "v1"


def _is_torchserve_request(item: Any) -> bool:
    return isinstance(item, dict) and (
        "body" in item or any(isinstance(v, bytes | bytearray) for v in item.values())
    )


def payload_of(item: Any, protocol: Literal["v1", "v2"]) -> object:
    """``.npy`` bytes or an ndarray for one KServe instance, or for an input under the kservev2
    envelope (one image each); an :class:`InferenceError` if it is unusable. (Without an
    envelope: :func:`parse_raw_request`.)

    Errors are returned, not raised, so the caller can fail that item alone.
    """
    try:
        if protocol == "v2":
            return _v2_payload(item)
        return _v1_payload(item)
    except InferenceError as error:
        return error


def _v2_images(tensor: dict[str, Any]) -> list[object]:
    """The images of one v2 input with JSON data (one, or N of a batch); each error alone."""
    datatype = str(tensor.get("datatype"))
    data = tensor.get("data")
    if datatype == "BYTES" and isinstance(data, list):
        try:
            count = math.prod(_shape(tensor))
        except ValueError as error:
            return [InvalidInput(f"input {_name(tensor)}: {error}")]
        if count != len(data) or not data:
            return [
                InvalidInput(
                    f"input {_name(tensor)}: {len(data)} BYTES elements for shape of {count}"
                )
            ]
        return [payload_of({**tensor, "data": element}, "v2") for element in data]
    try:
        return _split_batch(_v2_payload(tensor))
    except InferenceError as error:
        return [error]


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


def raw_answer(
    request: ParsedRequest,
    results: list[tuple[list[float] | None, InferenceError | None]],
    model_name: str,
    model_version: str,
) -> RawAnswer:
    """The answer to one request without an envelope, in the form it came in."""
    if request.form == "npy":
        ((probabilities, error),) = results
        return RawAnswer(answer_of(probabilities, error, "raw"))
    failed = next((error for _, error in results if error is not None), None)
    if failed is not None:  # KServe's error object (v1 and v2), with our fields beside it
        body = {"error": f"{failed.type}: {failed.message}", **error_fields(failed)}
        return RawAnswer(json.dumps(body).encode())
    if request.form == "v1":
        return RawAnswer(json.dumps({"predictions": [p for p, _ in results]}).encode())
    rows = np.asarray([p for p, _ in results], dtype=np.float32)
    probabilities = rows[0] if request.single else rows
    document: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.request_id:
        document["id"] = request.request_id
    output: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": "FP32",
                              "shape": list(probabilities.shape)}  # fmt: skip
    if not request.binary_output:
        output["data"] = probabilities.ravel().tolist()
        return RawAnswer(json.dumps({**document, "outputs": [output]}).encode())
    data = probabilities.astype("<f4").tobytes()
    output["parameters"] = {"binary_data_size": len(data)}
    header = json.dumps({**document, "outputs": [output]}).encode()
    return RawAnswer(header + data, "application/octet-stream", {BINARY_HEADER: str(len(header))})


def model_metadata(config: ModelConfig) -> dict[str, Any]:
    """The v2 model metadata of an exported model: platform, the input, the one output.

    The input declared is the plain tensor form; a request may also send FP32/FP64 pixels in
    [0, 1], BYTES holding ``.npy`` bytes, or a batch [N, H, W, 3] (module docstring).
    """
    return {
        "platform": _PLATFORMS.get(config.runtime, config.runtime),
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, -1, 3]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [config.num_classes]}],
    }


def write_model_metadata(config: ModelConfig, directory: str | Path) -> Path:
    """Write :func:`model_metadata` as ``v2_metadata.json`` into ``directory`` (the archive's)."""
    path = Path(directory) / METADATA_FILE
    path.write_text(json.dumps(model_metadata(config), indent=2) + "\n")
    return path


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
            f"list; got an object with keys {_quoted(sorted(instance)[:5])}"
        )
    if isinstance(instance, list):
        return _json_image(instance)
    if isinstance(instance, str):
        return _base64_npy(instance, "instance")
    kind = type(instance).__name__
    raise InvalidInput(f"a v1 instance must be an object or a nested list, not {kind}")


def _v2_payload(tensor: dict[str, Any]) -> Any:
    if not isinstance(tensor, dict):
        raise InvalidInput("each v2 input must be an object")
    datatype = str(tensor.get("datatype"))  # anything else JSON holds is no datatype
    data = tensor.get("data")
    if datatype == "BYTES":
        if isinstance(data, list) and data:
            data = data[0]
        if not isinstance(data, str | bytes | bytearray):
            raise InvalidInput("a BYTES input must hold the base64 of .npy bytes as its element")
        return _base64_npy(data, f"input {_name(tensor)}")
    if datatype not in _V2_DTYPES:
        raise _unsupported_datatype(_name(tensor), datatype)
    try:
        shape = _shape(tensor)  # before the array: its sides were already counted
        array = np.asarray(data, dtype=_V2_DTYPES[datatype])
        if array.size != math.prod(shape):
            raise ValueError(f"{array.size} values for shape {list(shape)}")
        return array.reshape(shape)
    except (TypeError, ValueError, OverflowError) as error:
        raise InvalidInput(f"input {_name(tensor)}: {_first_line(error)}") from None


def _name(tensor: dict[str, Any]) -> str:
    """An input's name as error messages quote it."""
    return _quoted(tensor.get("name"))


def _quoted(value: object) -> str:
    """``repr(value)``, cut short: a message never repeats megabytes a client sent."""
    text = repr(value)
    return text if len(text) <= _QUOTED_CHARS else text[: _QUOTED_CHARS - 3] + "..."


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return _quoted_text(lines[0]) if lines else type(error).__name__


def _quoted_text(text: str) -> str:
    return text if len(text) <= 4 * _QUOTED_CHARS else text[: 4 * _QUOTED_CHARS - 3] + "..."


def _unsupported_datatype(name: str, datatype: str) -> InvalidInput:
    return InvalidInput(
        f"input {name} has datatype {_quoted(datatype)}; send {', '.join(_V2_DTYPES)} [H, W, 3] "
        "(or [N, H, W, 3]) or BYTES (.npy)"
    )


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


def encode_request(
    image: np.ndarray, protocol: Protocol, name: str = INPUT_NAME
) -> tuple[bytes, str]:
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


def encode_v2_binary(image: np.ndarray, name: str = INPUT_NAME) -> tuple[bytes, dict[str, str]]:
    """A v2 request carrying ``image`` with the binary-data extension, and its headers."""
    datatype = {np.dtype(v): k for k, v in _V2_DTYPES.items()}.get(image.dtype)
    if datatype is None:
        raise ValueError(f"no v2 datatype for {image.dtype}")
    data = np.ascontiguousarray(image, dtype=image.dtype.newbyteorder("<")).tobytes()
    tensor = {"name": name, "shape": list(image.shape), "datatype": datatype,
              "parameters": {"binary_data_size": len(data)}}  # fmt: skip
    header = json.dumps({"inputs": [tensor]}).encode()
    headers = {"Content-Type": "application/octet-stream", BINARY_HEADER: str(len(header))}
    return header + data, headers


def probabilities_of(answer: Any, protocol: Protocol) -> list[list[float]]:
    """The probability lists in a parsed JSON answer, one per image sent.

    A v2 answer's :data:`OUTPUT_NAME` rows, from one [N, classes] output or (under TorchServe's
    kservev2 envelope) one [classes] output per image.
    """
    if protocol == "raw":
        return [answer]
    if protocol == "v1":
        return list(answer["predictions"])
    rows: list[list[float]] = []
    for output in answer["outputs"]:
        if output["name"] == OUTPUT_NAME:
            shape = output["shape"]
            data = np.asarray(output["data"], dtype=np.float64).reshape(shape)
            rows.extend(data.reshape(-1, shape[-1]).tolist())
    return rows
