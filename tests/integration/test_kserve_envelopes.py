"""KServe requests on real TorchServe: without an envelope (how we serve), and under TorchServe's
kservev2 envelope, which KServe's retired TorchServe runtime turned on.

The session server (no envelope) gives the reference answers for the demo model; a throwaway
server started by scripts/deploy.sh with B4_ENVELOPE=kservev2 runs the envelope.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest

from b4serve.lab.demo import generate_images
from b4serve.lab.sandbox import Server, server_env
from b4serve.serving.codec import encode_npy
from b4serve.serving.protocol import OUTPUT_NAME, encode_request, encode_v2_binary

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("v2_plugin")]

IMAGES, _ = generate_images(per_class=1, seed=21)


@pytest.fixture(scope="module")
def raw_answers(server: Server) -> list[list[float]]:
    answers = []
    for image in IMAGES[:2]:
        response = server.post(encode_npy(image))
        assert response.status_code == 200
        answers.append(response.json())
    return answers


@pytest.fixture(scope="module")
def enveloped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("kservev2")
    env = {**server_env(root), "B4_ENVELOPE": "kservev2", "B4_PROTOCOL": "v2"}
    server = Server(env=env, root=root)
    try:
        # its smoke test already speaks v2 JSON through the envelope. The envelope is no archive
        # setting: this is the session server's build, exported once (b4serve/build/identity.py)
        server.deploy()
        yield server
    finally:
        server.stop()


def test_the_envelope_answers_json_with_outputs_named_for_what_they_are(
    enveloped: Server, raw_answers: list[list[float]]
) -> None:
    first, second = encode_request(IMAGES[0], "v2")[0], encode_request(IMAGES[1], "v2")[0]
    inputs = [json.loads(first)["inputs"][0], json.loads(second)["inputs"][0] | {"name": "b"}]
    body = json.dumps({"id": "req-7", "inputs": inputs}).encode()
    v2_infer = f"{enveloped.endpoints.v2_url}/v2/models/b4/infer"
    response = enveloped.post(body, {"Content-Type": "application/json"}, url=v2_infer)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["id"] == "req-7" and answer["model_name"] == "b4"
    # the envelope gives each input its own output; the handler names them all the same
    assert [o["name"] for o in answer["outputs"]] == [OUTPUT_NAME, OUTPUT_NAME]
    assert all(o["datatype"] == "FP32" and o["shape"] == [6] for o in answer["outputs"])
    np.testing.assert_allclose([o["data"] for o in answer["outputs"]], raw_answers, atol=1e-5)


def test_a_binary_body_under_the_envelope_gets_a_clear_415_and_the_server_goes_on(
    enveloped: Server,
) -> None:
    binary, headers = encode_v2_binary(IMAGES[0])
    v2_infer = f"{enveloped.endpoints.v2_url}/v2/models/b4/infer"
    refused = enveloped.post(binary, headers, url=v2_infer)
    assert refused.status_code == 415
    assert "kservev2 envelope, which reads JSON bodies only" in refused.json()["error"]
    bad = {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]}]}
    invalid = enveloped.post(
        json.dumps(bad).encode(), {"Content-Type": "application/json"}, url=v2_infer
    )
    assert invalid.status_code == 400 and "InvalidInput" in invalid.text
    good, content_type = encode_request(IMAGES[2], "v2")
    assert enveloped.post(good, {"Content-Type": content_type}, url=v2_infer).status_code == 200


def test_kserve_requests_without_an_envelope_match_the_raw_path(
    server: Server, raw_answers: list[list[float]]
) -> None:
    # The session server runs without an envelope: the handler reads KServe requests itself,
    # binary-data extension included, and batches them with everything else.
    image = IMAGES[0]
    binary, binary_headers = encode_v2_binary(image, name="pixels")
    v2_json, json_type = encode_request(image, "v2")
    v1_json, _ = encode_request(image, "v1")
    url = server.endpoints.predictions_url
    sent = [(binary, binary_headers), (v2_json, {"Content-Type": json_type}),
            (v1_json, {"Content-Type": json_type})]  # fmt: skip
    answers = [server.post(body, headers, url=url) for body, headers in sent]
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    binary_answer, json_answer, v1_answer = (a.json() for a in answers)
    assert binary_answer["outputs"][0]["name"] == OUTPUT_NAME  # not the input's name
    assert binary_answer["model_name"] == "b4"
    for probabilities in (binary_answer["outputs"][0]["data"], json_answer["outputs"][0]["data"],
                          v1_answer["predictions"][0]):  # fmt: skip
        np.testing.assert_allclose(probabilities, raw_answers[0], atol=1e-5)
    truncated = server.post(binary[:-10], binary_headers, url=url)
    assert truncated.status_code == 400 and "truncated" in truncated.json()["error"]
