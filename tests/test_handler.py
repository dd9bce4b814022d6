"""handler.py driven by TorchServe's own Python service (loader, Service, response encoder).

No server and no sockets: the worker-side code path a real request takes, in-process, with a
tiny TorchScript model so it runs in well under a second.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from b4serve.lab.inprocess_worker import decode_replies
from b4serve.serving import protocol
from b4serve.serving.codec import encode_npy
from b4serve.serving.config import DEFAULT_MAX_IMAGES, ModelConfig
from b4serve.serving.pipeline import Classifier
from b4serve.serving.protocol import (
    BINARY_HEADER,
    OUTPUT_NAME,
    encode_request,
    encode_v2_binary,
    probabilities_of,
)
from b4serve.serving.request_ids import Handled, handled_requests
from b4serve.serving.runtime import load_torchscript

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_dir(tmp_path: Path, config: ModelConfig, toy_model) -> Path:
    """An unpacked archive as TorchServe lays it out: handler, metadata, TorchScript, manifest."""
    torch.jit.script(toy_model).save(str(tmp_path / "model.pt"))
    config.save(tmp_path)
    shutil.copy(ROOT / "handler.py", tmp_path / "handler.py")
    manifest = {
        "runtime": "python",
        "model": {"modelName": "b4", "serializedFile": "model.pt", "handler": "handler.py",
                  "modelVersion": "1"},
    }  # fmt: skip
    (tmp_path / "MAR-INF").mkdir()
    (tmp_path / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))
    return tmp_path


@pytest.fixture
def service(model_dir: Path):
    return _load_service(model_dir)


def _load_service(model_dir: Path, envelope: str | None = None):
    """TorchServe's own loader and Service for the unpacked archive in ``model_dir``."""
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import ModelLoaderFactory

    metrics = MetricsCacheYamlImpl(config_file_path=str(ROOT / "metrics.yaml"))  # the one we ship
    metrics.initialize_cache()
    loader = ModelLoaderFactory.get_model_loader()
    service = loader.load(
        "b4", str(model_dir), "handler.py", None, 4, envelope=envelope, metrics_cache=metrics
    )
    service.cl_socket = None  # the worker sets its frontend socket here; only streaming uses it
    return service


def _request(index: int, body: object, content_type: str = "application/octet-stream") -> dict:
    return {
        "requestId": f"req-{index}".encode(),
        "parameters": [{"name": "body", "contentType": content_type, "value": body}],
        "headers": [],
    }


def _decode_response(message: bytes) -> list[dict]:
    """TorchServe's worker->frontend prediction message as per-request dicts."""
    return [{**dataclasses.asdict(r), "id": r.request_id} for r in decode_replies(message)]


def test_batch_with_a_bad_request_fails_only_that_request(service, model_dir, config, rng) -> None:
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    batch = [
        _request(0, encode_npy(images[0])),
        _request(1, b"definitely not npy"),
        _request(2, bytearray(encode_npy(images[1]))),
        _request(3, encode_npy(np.zeros((4, 4, 3), dtype=np.int64))),
    ]
    responses = _decode_response(service.predict(batch))
    assert [r["id"] for r in responses] == ["req-0", "req-1", "req-2", "req-3"]
    assert [r["status"] for r in responses] == [200, 415, 200, 400]
    assert all(r["content_type"] == "application/json" for r in responses)

    reference = Classifier(load_torchscript(model_dir / "model.pt", torch.device("cpu")), config,
                           torch.device("cpu"))  # fmt: skip
    expected = [o.probabilities for o in reference.classify([encode_npy(images[0]),
                                                               encode_npy(images[1])])]  # fmt: skip
    np.testing.assert_allclose(json.loads(responses[0]["body"]), expected[0], atol=1e-6)
    np.testing.assert_allclose(json.loads(responses[2]["body"]), expected[1], atol=1e-6)

    bad = json.loads(responses[1]["body"])
    assert bad["code"] == 415 and bad["type"] == "UnsupportedMediaType"
    assert "numpy.save" in bad["message"] and responses[1]["phrase"] == "Unsupported Media Type"
    wrong_dtype = json.loads(responses[3]["body"])
    assert wrong_dtype["type"] == "InvalidInput" and "int64" in wrong_dtype["message"]


def test_all_bad_batch_never_calls_the_model_and_answers_each(service) -> None:
    responses = _decode_response(service.predict([_request(0, b""), _request(1, b"\x93NUMPY")]))
    assert [r["status"] for r in responses] == [400, 400]
    assert [json.loads(r["body"])["type"] for r in responses] == ["InvalidInput"] * 2


def test_json_content_decoded_by_torchserve_is_refused_with_415(service) -> None:
    responses = _decode_response(
        service.predict([_request(0, {"instances": [1]}, "application/json")])
    )
    assert responses[0]["status"] == 415


def test_probabilities_are_a_distribution_in_class_order(service, rng, config) -> None:
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)  # resized by the handler
    (response,) = _decode_response(service.predict([_request(0, encode_npy(image))]))
    probabilities = json.loads(response["body"])
    assert response["status"] == 200
    assert len(probabilities) == config.num_classes
    assert abs(sum(probabilities) - 1) < 1e-5 and min(probabilities) > 0


def test_onnxruntime_archive_answers_like_torchscript(model_dir, config, toy_model, rng) -> None:
    torch.onnx.export(
        toy_model, (torch.zeros(1, 3, 32, 32),), str(model_dir / "model.onnx"),
        input_names=["images"], dynamic_axes={"images": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    dataclasses.replace(config, runtime="onnxruntime").save(model_dir)
    manifest_path = model_dir / "MAR-INF" / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["serializedFile"] = "model.onnx"
    manifest_path.write_text(json.dumps(manifest))
    onnx_service = _load_service(model_dir)
    image = encode_npy(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    (response,) = _decode_response(onnx_service.predict([_request(0, image)]))
    reference = Classifier(load_torchscript(model_dir / "model.pt", torch.device("cpu")), config,
                           torch.device("cpu"))  # fmt: skip
    (expected,) = reference.classify([image])
    assert response["status"] == 200
    np.testing.assert_allclose(json.loads(response["body"]), expected.probabilities, atol=1e-5)


def test_non_ascii_in_an_error_message_keeps_the_reply_stream_intact(service, rng) -> None:
    # a header of latin-1 junk ends up quoted in the message; the reply must still parse
    junk = "\xff\xfe\xe9\u00e8".encode("latin1") * 4
    body = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(junk)) + junk
    good = encode_npy(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    responses = _decode_response(service.predict([_request(0, body), _request(1, good)]))
    assert [r["status"] for r in responses] == [400, 200]
    assert responses[0]["phrase"] == "Bad Request"
    assert json.loads(responses[0]["body"])["type"] == "InvalidInput"


def test_each_batch_emits_our_metrics_in_torchserve_format(service, rng, caplog) -> None:
    good = encode_npy(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    with caplog.at_level(logging.INFO):
        service.predict([_request(0, good), _request(1, b"nope"), _request(2, good)])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]b4_")]
    assert any(
        line.startswith("[METRICS]b4_requests.Count:2.0|#ModelName:b4,Outcome:ok,ErrorType:none|")
        for line in lines
    ), lines
    assert any("b4_requests.Count:1.0|#ModelName:b4,Outcome:error,ErrorType:UnsupportedMediaType|"
               in line for line in lines), lines  # fmt: skip
    assert sum(line.startswith("[METRICS]b4_decode_seconds.Seconds:") for line in lines) == 3
    forwards = [line for line in lines if line.startswith("[METRICS]b4_images_per_forward.Count:")]
    assert forwards and all("#type:HISTOGRAM" in line for line in forwards)
    assert sum(float(line.split(":")[1].split("|")[0]) for line in forwards) == 2  # good images
    runtime = "b4_runtime.Count:1.0|#ModelName:b4,Runtime:torchscript,Recorded:torchscript,"
    assert any(f"{runtime}Fallback:none|" in line for line in lines), lines


def test_an_archive_its_host_cannot_run_is_served_in_fp32_torchscript_loudly(
    model_dir, config, rng, caplog, monkeypatch
) -> None:
    from small_models import AVX2_ONLY

    from b4serve.serving import runtime

    dataclasses.replace(config, runtime="torchscript-bf16").save(model_dir)  # built with bf16
    monkeypatch.setattr(runtime, "host_caps", lambda: AVX2_ONLY)  # copied to an AVX2-only node
    body = encode_npy(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    with caplog.at_level(logging.INFO):
        fallback_service = _load_service(model_dir)
        (response,) = _decode_response(fallback_service.predict([_request(0, body)]))
    messages = [r.getMessage() for r in caplog.records]
    (loud,) = [m for m in messages if m.startswith("RUNTIME FALLBACK")]
    assert "records runtime torchscript-bf16" in loud and "AVX512_BF16 or AMX-BF16" in loud
    assert any(
        "b4_runtime.Count:1.0|#ModelName:b4,Runtime:torchscript,Recorded:torchscript-bf16,"
        "Fallback:no-bf16|" in m
        for m in messages
    ), messages
    reference = Classifier(load_torchscript(model_dir / "model.pt", torch.device("cpu")), config,
                           torch.device("cpu"))  # fmt: skip
    (expected,) = reference.classify([body])
    assert response["status"] == 200
    np.testing.assert_allclose(json.loads(response["body"]), expected.probabilities, atol=1e-6)


@pytest.mark.parametrize(("protocol", "envelope"), [("v1", "kserve"), ("v2", "kservev2")])
def test_kserve_envelopes_answer_like_the_raw_path(model_dir, rng, protocol, envelope) -> None:
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    raw = [json.loads(r["body"]) for r in _decode_response(
        _load_service(model_dir).predict([_request(i, encode_npy(x)) for i, x in enumerate(images)])
    )]  # fmt: skip
    enveloped = _load_service(model_dir, envelope)
    bodies = [json.loads(encode_request(image, protocol)[0]) for image in images]
    key = "instances" if protocol == "v1" else "inputs"
    request = {key: [body[key][0] for body in bodies]}  # two images in one KServe request
    if protocol == "v2":
        request["inputs"][1]["name"] = "second"
    (response,) = _decode_response(
        enveloped.predict([_request(0, json.dumps(request).encode(), "application/json")])
    )
    assert response["status"] == 200
    answer = json.loads(response["body"])
    np.testing.assert_allclose(probabilities_of(answer, protocol), raw, atol=1e-6)
    if protocol == "v2":  # the envelope gives each image its own output, named for what it is
        assert [o["name"] for o in answer["outputs"]] == [OUTPUT_NAME, OUTPUT_NAME]
        assert all(o["datatype"] == "FP32" and o["shape"] == [6] for o in answer["outputs"])


def test_a_bad_instance_fails_its_kserve_request_with_the_reason(model_dir, rng) -> None:
    good = base64.b64encode(encode_npy(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    request = {"instances": [{"data": good.decode()}, {"data": "%%% not base64"}]}
    service = _load_service(model_dir, "kserve")
    (response,) = _decode_response(
        service.predict([_request(0, json.dumps(request).encode(), "application/json")])
    )
    assert response["status"] == 415
    ok, bad = json.loads(response["body"])["predictions"]
    assert len(ok) == 6 and bad["type"] == "UnsupportedMediaType"


def test_kserve_requests_without_an_envelope_share_a_batch_and_fail_alone(service, rng) -> None:
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    binary, headers = encode_v2_binary(image, name="pixels")
    # as tritonclient sends it by default: binary in, and binary out asked for
    length = int(headers[BINARY_HEADER])
    wants_binary = json.loads(binary[:length]) | {"parameters": {"binary_data_output": True}}
    header = json.dumps(wants_binary).encode()
    both = header + binary[length:]
    batch = [
        _request(0, encode_npy(image)),
        _request(1, encode_request(image, "v2")[0], "application/json"),
        {**_request(2, binary), "headers": _headers(headers)},
        _request(3, encode_request(image, "v1")[0], "application/json"),
        _request(4, b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [1]}]}'),
        {**_request(5, both), "headers": _headers({**headers, BINARY_HEADER: str(len(header))})},
    ]  # fmt: skip
    responses = _decode_response(service.predict(batch))
    assert [r["status"] for r in responses] == [200, 200, 200, 200, 400, 200]
    expected = json.loads(responses[0]["body"])
    v2_json, v2_binary, v1, bad = (json.loads(r["body"]) for r in responses[1:5])
    assert v2_json["model_name"] == "b4" and v2_json["model_version"] == "1"
    assert v2_binary["outputs"][0]["name"] == OUTPUT_NAME  # not the input's name
    for probabilities in (v2_json["outputs"][0]["data"], v2_binary["outputs"][0]["data"],
                          v1["predictions"][0]):  # fmt: skip
        np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    assert bad["type"] == "InvalidInput" and "'INT64'" in bad["error"]
    binary_out = responses[5]
    assert binary_out["content_type"] == "application/octet-stream"
    length = int(binary_out["headers"][BINARY_HEADER])
    (output,) = json.loads(binary_out["body"][:length])["outputs"]
    assert output["shape"] == [6] and output["parameters"] == {"binary_data_size": 24}
    np.testing.assert_allclose(np.frombuffer(binary_out["body"][length:], "<f4"), expected,
                               atol=1e-6)  # fmt: skip


def _headers(headers: dict[str, str]) -> list[dict[str, bytes]]:
    return [{"name": k.encode(), "value": v.encode()} for k, v in headers.items()]


def test_each_batch_logs_the_client_id_and_status_of_every_request(service, rng, caplog) -> None:
    good = encode_npy(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))

    def with_id(request: dict, request_id: str) -> dict:
        return {
            **request,
            "headers": [{"name": b"X-Client-Request-Id", "value": request_id.encode()}],
        }

    batch = [with_id(_request(0, good), "job-0"), _request(1, good),
             with_id(_request(2, b"nope"), "job-2")]  # fmt: skip
    with caplog.at_level(logging.INFO):
        statuses = [r["status"] for r in _decode_response(service.predict(batch))]
    lines = [r.getMessage() for r in caplog.records]
    assert statuses == [200, 200, 415]
    assert handled_requests(lines) == [
        [Handled("job-0", 200), Handled(None, 200), Handled("job-2", 415)]
    ]


def test_requests_over_a_limit_or_unparseable_fail_alone_beside_good_ones(service, rng) -> None:
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    thousands, headers = encode_v2_binary(np.zeros((3000, 1, 1, 3), np.uint8))
    instances = json.dumps({"instances": [[[[0, 0, 0]]]] * 3000}).encode()
    overflow = b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1e400], "data": [1]}]}'
    batch = [
        {**_request(0, thousands), "headers": _headers(headers)},
        _request(1, encode_npy(image)),
        _request(2, instances, "application/json"),
        _request(3, overflow, "application/json"),
        _request(4, encode_request(image, "v1")[0], "application/json"),
    ]
    responses = _decode_response(service.predict(batch))
    assert [r["status"] for r in responses] == [413, 200, 413, 400, 200]
    errors = [json.loads(responses[i]["body"]) for i in (0, 2, 3)]
    assert [e["type"] for e in errors] == ["PayloadTooLarge", "PayloadTooLarge", "InvalidInput"]
    assert f"at least 3000 images; the limit is {DEFAULT_MAX_IMAGES}" in errors[0]["message"]
    assert "shape must be a list of integers" in errors[2]["message"]
    (good,) = json.loads(responses[4]["body"])["predictions"]
    np.testing.assert_allclose(good, json.loads(responses[1]["body"]), atol=1e-6)


@pytest.mark.parametrize("envelope", ["kserve", "kservev2"])
def test_an_enveloped_request_over_the_image_limit_gets_413(model_dir, envelope) -> None:
    if envelope == "kserve":
        request = {"instances": [[[[0, 0, 0]]]] * (DEFAULT_MAX_IMAGES + 1)}
    else:
        request = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 1, 3],
                               "data": [0, 0, 0]}] * (DEFAULT_MAX_IMAGES + 1)}  # fmt: skip
    service = _load_service(model_dir, envelope)
    (response,) = _decode_response(
        service.predict([_request(0, json.dumps(request).encode(), "application/json")])
    )
    assert response["status"] == 413
    over = DEFAULT_MAX_IMAGES + 1
    assert f"at least {over} images; the limit is {DEFAULT_MAX_IMAGES}" in response["body"].decode()


def test_a_parser_bug_fails_its_request_alone_with_400(service, rng, monkeypatch, caplog) -> None:
    good = encode_npy(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    real = protocol.parse_raw_request

    def buggy(item: dict, *args: object) -> object:
        if item.get("body") == b"{trigger}":
            raise KeyError("a bug the fuzz target missed")
        return real(item, *args)

    monkeypatch.setattr(protocol, "parse_raw_request", buggy)
    batch = [_request(0, good), _request(1, b"{trigger}"), _request(2, good)]
    with caplog.at_level(logging.ERROR):
        responses = _decode_response(service.predict(batch))
    assert [r["status"] for r in responses] == [200, 400, 200]
    assert json.loads(responses[1]["body"])["message"] == "the request could not be parsed"
    assert any("a bug the fuzz target missed" in r.exc_text for r in caplog.records if r.exc_text)


def test_a_decoder_bug_fails_its_image_alone_with_400(service, rng, monkeypatch) -> None:
    good = encode_npy(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    real = Classifier.decode

    def buggy(self: Classifier, body: object) -> object:
        if body == b"trigger":
            raise IndexError("a bug the fuzz target missed")
        return real(self, body)

    monkeypatch.setattr(Classifier, "decode", buggy)
    responses = _decode_response(
        service.predict([_request(0, good), _request(1, b"trigger"), _request(2, good)])
    )
    assert [r["status"] for r in responses] == [200, 400, 200]
    assert json.loads(responses[1]["body"])["message"] == "the image could not be decoded"
