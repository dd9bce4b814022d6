"""KServe v1/v2 items as TorchServe's envelopes deliver them -> payloads, and answers back."""

from __future__ import annotations

import base64
import json
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from b4serve.serving.codec import decode_npy, encode_npy
from b4serve.serving.config import MAX_BODY_BYTES, ModelConfig
from b4serve.serving.errors import (
    InferenceError,
    InvalidInput,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from b4serve.serving.protocol import (
    BINARY_HEADER,
    OUTPUT_NAME,
    ParsedRequest,
    answer_of,
    detect_protocol,
    encode_request,
    encode_v2_binary,
    header_length,
    model_metadata,
    parse_raw_request,
    payload_of,
    probabilities_of,
    raw_answer,
    write_model_metadata,
)

# Keys KServe requests use, so generated documents reach the parser's deeper paths.
KEYS = ["name", "shape", "datatype", "data", "parameters", "binary_data_size", "b64", "id"]
IMAGE = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)


def test_protocol_is_told_from_what_the_envelope_delivered() -> None:
    assert detect_protocol([{"body": b"\x93NUMPY"}]) == "raw"
    assert detect_protocol([{"data": bytearray(b"x")}]) == "raw"
    assert detect_protocol([{"body": None}]) == "raw"  # an empty raw body
    assert detect_protocol([{"name": "i", "shape": [1], "datatype": "UINT8", "data": [1]}]) == "v2"
    assert detect_protocol([{"data": "k5OVU..."}]) == "v1"  # base64 text, not bytes
    assert detect_protocol([[[1, 2, 3]]]) == "v1"


def test_v1_instances_carry_base64_npy_or_the_image_itself() -> None:
    text = base64.b64encode(encode_npy(IMAGE)).decode()
    for instance in ({"data": text}, {"b64": text}, text):
        np.testing.assert_array_equal(decode_npy(payload_of(instance, "v1"), 10**6), IMAGE)
    nested = payload_of(IMAGE.tolist(), "v1")
    assert nested.dtype == np.uint8 and np.array_equal(nested, IMAGE)
    floats = payload_of((IMAGE / 255.0).tolist(), "v1")
    assert floats.dtype == np.float64


@pytest.mark.parametrize(
    ("instance", "error", "words"),
    [
        ({"data": "not base64!"}, UnsupportedMediaType, "not base64"),
        ({"pixels": []}, InvalidInput, "keys ['pixels']"),
        ([[1, 2], [3]], InvalidInput, "rectangular"),
        ([[300, 2]], InvalidInput, "0..255"),
        (7, InvalidInput, "not int"),
    ],
)
def test_bad_v1_instances_become_their_own_error(instance, error, words) -> None:
    found = payload_of(instance, "v1")
    assert isinstance(found, error) and words in found.message


def test_v2_tensors_and_bytes_inputs() -> None:
    tensor = {"name": "image", "shape": [4, 5, 3], "datatype": "UINT8", "data": IMAGE.tolist()}
    assert np.array_equal(payload_of(tensor, "v2"), IMAGE)
    flat = {**tensor, "data": IMAGE.ravel().tolist()}  # flat data with a shape is valid v2
    assert payload_of(flat, "v2").shape == (4, 5, 3)
    fp32 = {"name": "x", "shape": [4, 5], "datatype": "FP32", "data": [0.5] * 20}
    assert payload_of(fp32, "v2").dtype == np.float32
    npy = {"name": "x", "shape": [1], "datatype": "BYTES",
           "data": base64.b64encode(encode_npy(IMAGE)).decode()}  # fmt: skip
    np.testing.assert_array_equal(decode_npy(payload_of(npy, "v2"), 10**6), IMAGE)


def test_bad_v2_inputs_name_the_problem() -> None:
    wrong_type = payload_of({"name": "x", "shape": [2], "datatype": "INT64", "data": [1, 2]}, "v2")
    assert isinstance(wrong_type, InvalidInput) and "'INT64'" in wrong_type.message
    short = payload_of({"name": "x", "shape": [2, 2], "datatype": "UINT8", "data": [1]}, "v2")
    assert isinstance(short, InvalidInput) and "1 values for shape [2, 2]" in short.message


def test_answers_take_each_protocols_form() -> None:
    assert json.loads(answer_of([0.25, 0.75], None, "raw")) == [0.25, 0.75]
    assert answer_of([0.25, 0.75], None, "v1") == [0.25, 0.75]
    v2 = answer_of([0.25, 0.75], None, "v2")
    assert v2.dtype == np.float32 and v2.shape == (2,)
    error = InvalidInput("NaN pixels")
    assert answer_of(None, error, "v1") == {"code": 400, "type": "InvalidInput",
                                            "message": "NaN pixels"}  # fmt: skip
    assert json.loads(answer_of(None, error, "raw"))["type"] == "InvalidInput"


@pytest.mark.parametrize("protocol", ["raw", "v1", "v2"])
def test_requests_built_for_each_protocol_decode_back_to_the_image(protocol) -> None:
    body, content_type = encode_request(IMAGE, protocol)
    if protocol == "raw":
        assert content_type == "application/octet-stream"
        np.testing.assert_array_equal(decode_npy(body, 10**6), IMAGE)
        return
    (payload,) = parse_raw_request({"body": body}).payloads
    decoded = payload if isinstance(payload, np.ndarray) else decode_npy(payload, 10**6)
    np.testing.assert_array_equal(decoded, IMAGE)


def test_probabilities_are_read_from_each_answer_form() -> None:
    assert probabilities_of([0.5, 0.5], "raw") == [[0.5, 0.5]]
    assert probabilities_of({"predictions": [[0.5, 0.5]]}, "v1") == [[0.5, 0.5]]
    one = {"outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [2], "data": [0.5, 0.5]}]}
    assert probabilities_of(one, "v2") == [[0.5, 0.5]]
    two = {"outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [2, 2],
                        "data": [1.0, 0.0, 0.25, 0.75]}]}  # fmt: skip
    assert probabilities_of(two, "v2") == [[1.0, 0.0], [0.25, 0.75]]
    # TorchServe's kservev2 envelope: one output per image
    assert probabilities_of({"outputs": one["outputs"] * 2}, "v2") == [[0.5, 0.5]] * 2


# --- KServe requests without an envelope: one per TorchServe request ---------------------------


def test_a_raw_npy_body_is_one_image() -> None:
    request = parse_raw_request({"body": encode_npy(IMAGE)})
    assert request.form == "npy" and len(request.payloads) == 1


def test_v2_json_and_v1_json_bodies_are_kserve_requests() -> None:
    body, _ = encode_request(IMAGE, "v2")
    v2 = parse_raw_request({"body": body})
    assert v2.form == "v2" and v2.single and not v2.binary_output
    assert np.array_equal(v2.payloads[0], IMAGE)
    v1 = parse_raw_request({"body": encode_request(IMAGE, "v1")[0]})
    assert v1.form == "v1" and decode_npy(v1.payloads[0], 10**6).shape == (4, 5, 3)


def test_v2_binary_data_extension_carries_tensors_and_npy_bytes() -> None:
    body, headers = encode_v2_binary(IMAGE)
    request = parse_raw_request({"body": body}, header_length(headers))
    assert request.form == "v2" and np.array_equal(request.payloads[0], IMAGE)
    npy = encode_npy(IMAGE)
    tensor = {"name": "npy", "shape": [1], "datatype": "BYTES",
              "parameters": {"binary_data_size": 4 + len(npy)}}  # fmt: skip
    header = json.dumps({"id": "r1", "inputs": [tensor]}).encode()
    element = len(npy).to_bytes(4, "little") + npy
    request = parse_raw_request({"body": header + element}, len(header))
    assert request.request_id == "r1"
    np.testing.assert_array_equal(decode_npy(request.payloads[0], 10**6), IMAGE)


@pytest.mark.parametrize(
    ("cut", "words"),
    [(-1, "truncated"), (+3, "3 bytes of binary data no input claims")],
)
def test_binary_data_that_does_not_add_up_is_refused(cut: int, words: str) -> None:
    body, headers = encode_v2_binary(IMAGE)
    body = body[:cut] if cut < 0 else body + b"\0" * cut
    (payload,) = parse_raw_request({"body": body}, header_length(headers)).payloads
    assert isinstance(payload, InvalidInput) and words in payload.message


def test_kserve_bodies_over_the_byte_limit_are_refused_before_parsing() -> None:
    # A valid v2 document of a 2048x2048 image, within the pixel limit but over the byte limit:
    # parsing it would cost hundreds of MB of Python objects before any size check could run.
    values = 2048 * 2048
    document = (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2048, 2048], '
                b'"data": [' + b"255, " * (values - 1) + b"255]}]}")  # fmt: skip
    assert len(document) > MAX_BODY_BYTES
    binary_header = b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [4096, 4097]}]}'
    binary = binary_header + bytes(MAX_BODY_BYTES)
    tracemalloc.start()
    try:
        (json_payload,) = parse_raw_request({"body": document}).payloads
        (binary_payload,) = parse_raw_request({"body": binary}, len(binary_header)).payloads
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for payload in (json_payload, binary_payload):
        assert isinstance(payload, PayloadTooLarge) and payload.status == 413
        assert f"the limit is {MAX_BODY_BYTES}" in payload.message
    assert peak < 1 << 20, f"{peak} bytes allocated while refusing"


def test_unusable_kserve_bodies_get_clear_errors() -> None:
    (bad_length,) = parse_raw_request({"body": b"{}"}, 99).payloads
    assert (
        isinstance(bad_length, InvalidInput)
        and "Inference-Header-Content-Length" in bad_length.message
    )
    (not_kserve,) = parse_raw_request({"body": b'{"image": [1, 2]}'}).payloads
    assert isinstance(not_kserve, UnsupportedMediaType) and "KServe v1" in not_kserve.message
    (broken,) = parse_raw_request({"body": b'{"inputs": [}'}).payloads
    assert isinstance(broken, UnsupportedMediaType) and "valid JSON" in broken.message
    (empty,) = parse_raw_request({"body": b'{"instances": []}'}).payloads
    assert isinstance(empty, InvalidInput) and "no image" in empty.message
    assert header_length({"inference-header-content-length": "12"}) == 12  # any case
    assert header_length({"Content-Type": "application/json"}) is None


def answer_json(request: ParsedRequest, results: list) -> dict:
    answer = raw_answer(request, results, "b4", "abc")
    assert answer.content_type == "application/json" and answer.headers == {}
    return json.loads(answer.body)


def test_raw_answers_are_kserve_documents() -> None:
    v2 = ParsedRequest([IMAGE], form="v2", request_id="r1", single=True)
    answer = answer_json(v2, [([0.25, 0.75], None)])
    assert answer == {"model_name": "b4", "model_version": "abc", "id": "r1", "outputs": [
        {"name": OUTPUT_NAME, "datatype": "FP32", "shape": [2], "data": [0.25, 0.75]}]}  # fmt: skip
    failed = answer_json(v2, [(None, InvalidInput("NaN"))])
    assert failed["error"] == "InvalidInput: NaN" and failed["code"] == 400
    v1 = ParsedRequest([IMAGE, IMAGE], form="v1")
    ok = answer_json(v1, [([1.0, 0.0], None), ([0.0, 1.0], None)])
    assert ok == {"predictions": [[1.0, 0.0], [0.0, 1.0]]}
    one_bad = answer_json(v1, [([1.0, 0.0], None), (None, InvalidInput("x"))])
    assert one_bad == {"error": "InvalidInput: x", "code": 400, "type": "InvalidInput",
                       "message": "x"}  # fmt: skip


def b64(image: np.ndarray) -> str:
    return base64.b64encode(encode_npy(image)).decode()


def test_several_images_in_one_v2_request_answer_one_output_with_a_row_each() -> None:
    batch = np.stack([IMAGE, IMAGE + 1])
    document = {"inputs": [
        {"name": "a", "shape": [4, 5, 3], "datatype": "UINT8", "data": IMAGE.ravel().tolist()},
        {"name": "b", "shape": [2, 4, 5, 3], "datatype": "UINT8", "data": batch.ravel().tolist()},
        {"name": "c", "shape": [2], "datatype": "BYTES", "data": [b64(IMAGE), b64(IMAGE + 2)]},
    ]}  # fmt: skip
    request = parse_raw_request({"body": json.dumps(document).encode()})
    assert len(request.payloads) == 5 and not request.single
    np.testing.assert_array_equal(request.payloads[2], IMAGE + 1)
    np.testing.assert_array_equal(decode_npy(request.payloads[4], 10**6), IMAGE + 2)
    rows = [[0.1 * i, 1 - 0.1 * i] for i in range(5)]
    answer = answer_json(request, [(row, None) for row in rows])
    (output,) = answer["outputs"]
    assert output["name"] == OUTPUT_NAME and output["shape"] == [5, 2]
    np.testing.assert_allclose(probabilities_of(answer, "v2"), rows, rtol=1e-6)
    # a batch of one keeps its batch dimension: [1, classes]
    alone = {"inputs": [document["inputs"][1] | {"shape": [1, 4, 5, 3],
                                                 "data": IMAGE.ravel().tolist()}]}  # fmt: skip
    one = parse_raw_request({"body": json.dumps(alone).encode()})
    assert not one.single
    assert answer_json(one, [([0.5, 0.5], None)])["outputs"][0]["shape"] == [1, 2]


def test_binary_bytes_inputs_carry_several_npy_elements() -> None:
    npys = [encode_npy(IMAGE), encode_npy(IMAGE + 3)]
    data = b"".join(len(n).to_bytes(4, "little") + n for n in npys)
    tensor = {"name": "npy", "shape": [2], "datatype": "BYTES",
              "parameters": {"binary_data_size": len(data)}}  # fmt: skip
    header = json.dumps({"inputs": [tensor]}).encode()
    request = parse_raw_request({"body": header + data}, len(header))
    assert [decode_npy(p, 10**6)[0, 0, 0] for p in request.payloads] == [0, 3]
    short = {**tensor, "shape": [3]}
    header = json.dumps({"inputs": [short]}).encode()
    (error,) = parse_raw_request({"body": header + data}, len(header)).payloads
    assert isinstance(error, InvalidInput) and "2 BYTES elements for shape of 3" in error.message


@pytest.mark.parametrize(
    ("document", "binary"),
    [
        ({"parameters": {"binary_data_output": True}}, True),  # tritonclient, no outputs named
        ({"outputs": [{"name": OUTPUT_NAME, "parameters": {"binary_data": True}}]}, True),
        ({"outputs": [{"name": OUTPUT_NAME, "parameters": {"binary_data": False}}]}, False),
        ({"outputs": [{"name": OUTPUT_NAME}]}, False),
        ({}, False),
    ],
)
def test_binary_output_is_what_the_request_asks_for(document: dict, binary: bool) -> None:
    body, headers = encode_v2_binary(IMAGE)
    header = json.loads(body[: header_length(headers)])
    header.update(document)
    text = json.dumps(header).encode()
    request = parse_raw_request({"body": text + body[header_length(headers) :]}, len(text))
    assert request.binary_output is binary
    answer = raw_answer(request, [([0.25, 0.75], None)], "b4", "abc")
    if not binary:
        assert json.loads(answer.body)["outputs"][0]["data"] == [0.25, 0.75]
        return
    length = int(answer.headers[BINARY_HEADER])
    assert answer.content_type == "application/octet-stream"
    (output,) = json.loads(answer.body[:length])["outputs"]
    assert output == {"name": OUTPUT_NAME, "datatype": "FP32", "shape": [2],
                      "parameters": {"binary_data_size": 8}}  # fmt: skip
    np.testing.assert_array_equal(np.frombuffer(answer.body[length:], "<f4"), [0.25, 0.75])


def test_an_unknown_requested_output_fails_the_request_naming_ours() -> None:
    body, _ = encode_request(IMAGE, "v2")
    document = {**json.loads(body), "outputs": [{"name": "image"}]}
    request = parse_raw_request({"body": json.dumps(document).encode()})
    (error,) = request.payloads
    assert isinstance(error, InvalidInput)
    assert f"unknown output 'image': this model has one output, '{OUTPUT_NAME}'" in error.message


def test_model_metadata_declares_the_input_and_the_output_answers_use(tmp_path) -> None:
    config = ModelConfig.for_arch("efficientnet_b4", 6)
    metadata = model_metadata(config)
    assert metadata == {
        "platform": "pytorch_torchscript",
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, 3]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [6]}],
    }
    path = write_model_metadata(config, tmp_path)
    assert path.name == "v2_metadata.json" and json.loads(path.read_text()) == metadata
    # what the metadata declares is what a request gets back
    body, _ = encode_request(np.zeros((8, 8, 3), np.uint8), "v2")
    answer = answer_json(parse_raw_request({"body": body}), [([1 / 6] * 6, None)])
    (output,) = answer["outputs"]
    declared = metadata["outputs"][0]
    assert {k: output[k] for k in declared} == declared


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS), children, max_size=4),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["inputs", "instances"]), st.lists(JSON, max_size=3), st.binary(max_size=16))
def test_no_kserve_body_raises_each_item_is_a_payload_or_its_error(
    key: str, items: list, tail: bytes
) -> None:
    header = json.dumps({key: items}).encode()
    for request in (parse_raw_request({"body": header}),
                    parse_raw_request({"body": header + tail}, len(header))):  # fmt: skip
        assert request.payloads
        for payload in request.payloads:
            assert isinstance(payload, bytes | np.ndarray | InferenceError)
