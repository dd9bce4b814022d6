"""KServe v1 and v2 on real TorchServe, with and without its envelopes, against the raw path.

Each protocol gets a throwaway server started by scripts/deploy.sh with B4_PROTOCOL set (so
TorchServe runs with service_envelope=kserve or kservev2); the session server (raw .npy bodies)
gives the reference answers for the same demo model.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import numpy as np
import pytest
import requests

from b4serve.lab.demo import generate_images
from b4serve.lab.sandbox import Server, server_env
from b4serve.serving.codec import encode_npy
from b4serve.serving.protocol import encode_request, encode_v2_binary

pytestmark = pytest.mark.integration

IMAGES, _ = generate_images(per_class=1, seed=21)


@pytest.fixture(scope="module")
def raw_answers(server: Server) -> list[list[float]]:
    headers = {"Content-Type": "application/octet-stream", **server.keys.auth_headers("inference")}
    answers = []
    for image in IMAGES[:2]:
        response = requests.post(server.endpoints.predictions_url, data=encode_npy(image),
                                 headers=headers, timeout=120)  # fmt: skip
        assert response.status_code == 200
        answers.append(response.json())
    return answers


@pytest.fixture(scope="module", params=["v1", "v2"])
def enveloped(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp(f"kserve-{request.param}")
    server = Server(env={**server_env(root), "B4_PROTOCOL": request.param}, root=root)
    try:
        # its smoke test already speaks the protocol; the runtime is not what this tests
        server.deploy(B4_RUNTIME="torchscript")
        yield server
    finally:
        server.stop()


def post_json(server: Server, payload: dict) -> requests.Response:
    headers = {"Content-Type": "application/json", **server.keys.auth_headers("inference")}
    return requests.post(server.endpoints.predictions_url, data=json.dumps(payload),
                         headers=headers, timeout=120)  # fmt: skip


def b64_npy(image: np.ndarray) -> str:
    return base64.b64encode(encode_npy(image)).decode()


def test_kserve_request_answers_equal_the_raw_path(enveloped: Server, raw_answers) -> None:
    first, second = IMAGES[0], IMAGES[1]
    if enveloped.env["B4_PROTOCOL"] == "v1":
        payload = {"instances": [{"data": b64_npy(first)}, {"data": b64_npy(second)}]}
        response = post_json(enveloped, payload)
        assert response.status_code == 200, response.text
        served = response.json()["predictions"]
    else:
        payload = {"id": "req-7", "inputs": [
            {"name": "tensor", "shape": list(first.shape), "datatype": "UINT8",
             "data": first.ravel().tolist()},
            {"name": "npy", "shape": [1], "datatype": "BYTES", "data": [b64_npy(second)]},
        ]}  # fmt: skip
        response = post_json(enveloped, payload)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["id"] == "req-7" and answer["model_name"] == "b4"
        assert [o["name"] for o in answer["outputs"]] == ["tensor", "npy"]
        assert all(o["datatype"] == "FP32" and o["shape"] == [6] for o in answer["outputs"])
        served = [o["data"] for o in answer["outputs"]]
    np.testing.assert_allclose(served, raw_answers, atol=1e-5)


def test_a_bad_kserve_input_gets_a_clear_4xx_and_the_server_goes_on(enveloped: Server) -> None:
    if enveloped.env["B4_PROTOCOL"] == "v1":
        bad = {"instances": [{"data": b64_npy(np.full((8, 8, 3), np.nan, np.float32))}]}
    else:
        bad = {
            "inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]}]
        }
    response = post_json(enveloped, bad)
    assert response.status_code == 400
    assert "InvalidInput" in response.text
    good = {"instances": [{"data": b64_npy(IMAGES[2])}]} if enveloped.env["B4_PROTOCOL"] == "v1" \
        else {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES",
                          "data": [b64_npy(IMAGES[2])]}]}  # fmt: skip
    assert post_json(enveloped, good).status_code == 200


def test_kserve_requests_without_an_envelope_match_the_raw_path(
    server: Server, raw_answers
) -> None:
    # The session server runs without an envelope: the handler reads KServe requests itself,
    # binary-data extension included, and batches them with everything else.
    auth = server.keys.auth_headers("inference")
    image = IMAGES[0]
    binary, binary_headers = encode_v2_binary(image, name="pixels")
    v2_json, json_type = encode_request(image, "v2")
    v1_json, _ = encode_request(image, "v1")
    sent = [(binary, binary_headers), (v2_json, {"Content-Type": json_type}),
            (v1_json, {"Content-Type": json_type})]  # fmt: skip
    answers = [
        requests.post(server.endpoints.predictions_url, data=body, headers={**h, **auth},
                      timeout=120)
        for body, h in sent
    ]  # fmt: skip
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    binary_answer, json_answer, v1_answer = (a.json() for a in answers)
    assert binary_answer["outputs"][0]["name"] == "pixels"
    assert binary_answer["model_name"] == "b4"
    for probabilities in (binary_answer["outputs"][0]["data"], json_answer["outputs"][0]["data"],
                          v1_answer["predictions"][0]):  # fmt: skip
        np.testing.assert_allclose(probabilities, raw_answers[0], atol=1e-5)
    truncated = requests.post(server.endpoints.predictions_url, data=binary[:-10],
                              headers={**binary_headers, **auth}, timeout=60)  # fmt: skip
    assert truncated.status_code == 400 and "truncated" in truncated.json()["error"]
