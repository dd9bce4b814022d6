"""The v2 REST API (plugins/v2) on the session's real TorchServe, driven by NVIDIA's tritonclient.

tritonclient.http is what most Open Inference Protocol users reach for: health, metadata and
infer (JSON and the binary-data extension) must work with it unchanged. Answers are checked
against the raw .npy route of the same server. KServe's own v2 REST client is not
used: its SDK, installed with its dependencies, replaces our protobuf and psutil (docs/V2.md).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from b4serve.lab.demo import generate_images
from b4serve.lab.sandbox import Server
from b4serve.ops.manage import ManagementAPI
from b4serve.serving.codec import encode_npy
from b4serve.serving.protocol import OUTPUT_NAME

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("v2_plugin")]

IMAGES, LABELS = generate_images(per_class=1, seed=19)


def client(server: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(urlsplit(server.endpoints.v2_url).netloc)


def auth(server: Server) -> dict[str, str]:
    """A fresh dict each call: tritonclient writes Inference-Header-Content-Length into the
    headers it is given, which would then mislead the next JSON request sent with them."""
    return dict(server.keys.auth_headers("inference"))


@pytest.fixture(scope="module")
def raw(server: Server) -> np.ndarray:
    """Each image's probabilities from the raw .npy route, which tests/integration/test_server.py
    proves equal to the served version's exported model run in-process."""

    def post(image: np.ndarray) -> list[float]:
        response = server.post(encode_npy(image))
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(4) as pool:
        return np.array(list(pool.map(post, IMAGES)))


def tensor(name: str, array: np.ndarray, binary: bool) -> triton.InferInput:
    item = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    item.set_data_from_numpy(array, binary_data=binary)
    return item


def test_tritonclient_sees_a_live_ready_server_with_model_b4_ready(server: Server) -> None:
    v2 = client(server)
    assert v2.is_server_live(headers=auth(server))
    assert v2.is_server_ready(headers=auth(server))
    assert v2.is_model_ready("b4", headers=auth(server))
    version = ManagementAPI(server.endpoints, server.keys).default_version("b4")
    assert v2.is_model_ready("b4", model_version=version, headers=auth(server))
    assert not v2.is_model_ready("b5", headers=auth(server))
    assert not v2.is_server_live()  # TorchServe's token authorization holds here too
    refused = requests.get(f"{server.endpoints.v2_url}/v2/health/live", timeout=10)
    assert refused.status_code == 400 and refused.json()["type"] == "InvalidKeyException"


def test_metadata_declares_the_input_and_the_output_every_answer_uses(server: Server) -> None:
    v2 = client(server)
    assert v2.get_server_metadata(headers=auth(server))["extensions"] == ["binary_tensor_data"]
    metadata = v2.get_model_metadata("b4", headers=auth(server))
    version = ManagementAPI(server.endpoints, server.keys).default_version("b4")
    assert metadata["name"] == "b4" and version in metadata["versions"]
    assert metadata["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, 3]}]
    assert metadata["outputs"] == [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [6]}]
    result = v2.infer("b4", [tensor("image", IMAGES[0], True)], headers=auth(server))
    (output,) = result.get_response()["outputs"]
    declared = metadata["outputs"][0]
    assert {key: output[key] for key in declared} == declared


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_gives_the_served_models_probabilities(
    server: Server, raw: np.ndarray, binary: bool
) -> None:
    v2 = client(server)
    for image, row in zip(IMAGES[:2], raw[:2], strict=True):
        requested = [triton.InferRequestedOutput(OUTPUT_NAME, binary_data=binary)]
        result = v2.infer("b4", [tensor("image", image, binary)], outputs=requested,
                          headers=auth(server), request_id="r-19")  # fmt: skip
        answer = result.get_response()
        assert answer["id"] == "r-19" and answer["model_name"] == "b4"
        assert ("parameters" in answer["outputs"][0]) is binary  # binary_data_size
        probabilities = result.as_numpy(OUTPUT_NAME)
        assert probabilities.dtype == np.float32 and probabilities.shape == (6,)
        np.testing.assert_allclose(probabilities, row, atol=1e-5, rtol=0)


def test_several_images_in_one_request_come_back_as_rows_in_order(
    server: Server, raw: np.ndarray
) -> None:
    batch = np.stack(IMAGES[:2])  # UINT8 [2, H, W, 3]
    npy = np.array([encode_npy(IMAGES[2])], dtype=np.object_)  # BYTES [1]: .npy bytes
    result = client(server).infer(
        "b4", [tensor("pixels", batch, True), tensor("npy", npy, True)], headers=auth(server)
    )
    probabilities = result.as_numpy(OUTPUT_NAME)
    assert probabilities.shape == (3, 6)
    np.testing.assert_allclose(probabilities, raw[:3], atol=1e-5)
    assert list(probabilities.argmax(axis=1)) == list(LABELS[:3])  # the demo knows its colours


def test_a_bad_input_gets_its_own_clear_error_while_the_others_are_served(
    server: Server, raw: np.ndarray
) -> None:
    def send(array: np.ndarray) -> np.ndarray | InferenceServerException:
        try:  # one client per thread: tritonclient's client is not thread-safe
            result = client(server).infer("b4", [tensor("image", array, True)],
                                          headers=auth(server))  # fmt: skip
            return result.as_numpy(OUTPUT_NAME)
        except InferenceServerException as error:
            return error

    good = list(IMAGES[:3])
    bad = np.ones((4, 4), dtype=np.int64)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, [good[0], bad, good[1], good[2]]))
    refused = answers.pop(1)
    assert isinstance(refused, InferenceServerException), refused
    assert refused.status() == "400"
    assert "input 'image' has datatype 'INT64'; send UINT8, FP32, FP64" in refused.message()
    assert all(isinstance(a, np.ndarray) for a in answers), answers
    np.testing.assert_allclose(answers, raw[:3], atol=1e-5)
    unknown = client(server)
    with pytest.raises(InferenceServerException, match="unknown output 'label'"):
        unknown.infer("b4", [tensor("image", good[0], True)], headers=auth(server),
                      outputs=[triton.InferRequestedOutput("label")])  # fmt: skip


def test_requests_from_many_clients_share_server_batches(server: Server, raw: np.ndarray) -> None:
    log = server.log_dir / "model_log.log"
    offset = log.stat().st_size
    order = [i % len(IMAGES) for i in range(8)]
    images = [IMAGES[i] for i in order]
    barrier = threading.Barrier(len(images))

    def send(image: np.ndarray) -> np.ndarray:
        v2 = client(server)
        barrier.wait()  # all at once, so the queue holds several when a batch forms
        return v2.infer("b4", [tensor("image", image, True)], headers=auth(server)).as_numpy(
            OUTPUT_NAME
        )

    with ThreadPoolExecutor(len(images)) as pool:
        answers = list(pool.map(send, images))
    np.testing.assert_allclose(answers, raw[order], atol=1e-5)
    deadline = time.monotonic() + 15  # the model log is written asynchronously
    while True:
        with open(log, errors="replace") as stream:
            stream.seek(offset)
            sizes = [int(line.split("batch of ")[1].split()[0])
                     for line in stream if "batch of " in line]  # fmt: skip
        if sum(sizes) >= len(images) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sum(sizes) >= len(images) and max(sizes) > 1, sizes


def test_torchserve_port_answers_health_and_metadata_as_oip(
    server: Server, raw: np.ndarray
) -> None:
    headers = auth(server)
    base = server.endpoints.inference_url
    ready = requests.get(f"{base}/oip/models/b4/ready", headers=headers, timeout=10)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    metadata = requests.get(f"{base}/oip/models/b4", headers=headers, timeout=10).json()
    assert metadata["outputs"][0]["name"] == OUTPUT_NAME
    # TorchServe routes no v2 model readiness itself: the reason the plugin exists
    assert (
        requests.get(f"{base}/v2/models/b4/ready", headers=headers, timeout=10).status_code == 404
    )
    # ...but does route infer, to the same handler
    body = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8",
                                   "shape": list(IMAGES[0].shape),
                                   "data": IMAGES[0].ravel().tolist()}]})  # fmt: skip
    served = requests.post(f"{base}/v2/models/b4/infer", data=body, headers=headers, timeout=60)
    assert served.status_code == 200, served.text
    np.testing.assert_allclose(served.json()["outputs"][0]["data"], raw[0], atol=1e-5)
