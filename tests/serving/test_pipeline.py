"""Classifier: per-request outcomes in order, micro-batches, and the JSON each outcome becomes."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import weakref

import numpy as np
import torch

from b4serve.serving.codec import encode_npy
from b4serve.serving.errors import InvalidInput
from b4serve.serving.pipeline import Classifier, Outcome, replies
from b4serve.serving.protocol import (
    OUTPUT_NAME,
    ParsedRequest,
    encode_request,
    encode_v2_binary,
    parse_raw_request,
)
from b4serve.serving.request_ids import Handled
from b4serve.serving.runtime import micro_batch_size

CPU = torch.device("cpu")


class Recording(torch.nn.Module):
    """Wraps a model and records the batch size of every forward pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.sizes: list[int] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.sizes.append(images.shape[0])
        return self.model(images)


def bodies(rng: np.random.Generator, count: int) -> list[bytes]:
    return [encode_npy(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


def test_micro_batches_give_the_same_answers_as_one_forward(config, toy_model, rng) -> None:
    requests = bodies(rng, 5)
    whole = Recording(toy_model)
    single = Recording(toy_model)
    together = Classifier(whole, dataclasses.replace(config, micro_batch=8), CPU)
    one_by_one = Classifier(single, dataclasses.replace(config, micro_batch=1), CPU)
    expected = [o.probabilities for o in together.classify(requests)]
    got = [o.probabilities for o in one_by_one.classify(requests)]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert whole.sizes == [10]  # 5 images + their mirrors, one pass
    assert single.sizes == [2] * 5


def test_micro_batch_default_is_one_image_on_cpu_and_all_on_gpu() -> None:
    assert micro_batch_size(0, CPU) == 1
    assert micro_batch_size(0, torch.device("cuda", 0)) is None
    assert micro_batch_size(3, torch.device("cuda", 0)) == 3


def test_outcomes_keep_request_order_with_errors_in_place(config, toy_model, rng) -> None:
    good = bodies(rng, 2)
    outcomes = Classifier(toy_model, config, CPU).classify([good[0], b"junk", good[1], b""])
    assert [o.status for o in outcomes] == [200, 415, 200, 400]
    assert outcomes[0].probabilities != outcomes[2].probabilities
    assert json.loads(outcomes[0].answer()) == outcomes[0].probabilities
    assert json.loads(outcomes[3].answer()) == {
        "code": 400,
        "type": "InvalidInput",
        "message": "empty body: expected the bytes written by numpy.save",
    }


def test_a_bad_body_does_not_keep_its_batch_alive_after_the_answers(config, toy_model, rng) -> None:
    # A bad body's error once kept its traceback, whose frames held the batch's bodies and
    # decoded images in a cycle with the outcomes: freed only by a later garbage collection.
    classifier = Classifier(toy_model, config, CPU)
    preprocess, decoded = classifier.preprocess, []

    def recording(array: np.ndarray) -> torch.Tensor:
        image = preprocess(array)
        decoded.append(weakref.ref(image))
        return image

    classifier.preprocess = recording  # type: ignore[assignment]
    good = bodies(rng, 2)
    gc.disable()  # what reference counting frees, at once
    try:
        outcomes = classifier.classify([good[0], b"junk", good[1]])
        assert [o.status for o in outcomes] == [200, 415, 200] and len(decoded) == 2
        assert outcomes[1].error is not None and outcomes[1].error.__traceback__ is None
        del outcomes
        assert [image() for image in decoded] == [None, None]
    finally:
        gc.enable()


def test_plain_baseline_model_gets_contiguous_nchw_batches(config, toy_model, rng) -> None:
    seen: list[bool] = []

    def model(images: torch.Tensor) -> torch.Tensor:
        seen.append(images.is_contiguous())
        return toy_model(images)

    baseline = dataclasses.replace(config, optimize=False, micro_batch=4)
    Classifier(model, baseline, CPU).classify(bodies(rng, 2))
    assert seen == [True]


def test_raw_request_body_takes_data_then_body() -> None:
    assert parse_raw_request({"data": b"a", "body": b"b"}).payloads == [b"a"]
    assert parse_raw_request({"body": bytearray(b"b")}).payloads == [bytearray(b"b")]
    assert parse_raw_request({"other": 1}).payloads == [None]
    assert Outcome(error=InvalidInput("x")).status == 400


def test_replies_regroup_images_into_their_requests() -> None:
    requests = [
        ParsedRequest([b"npy"]),
        ParsedRequest([b"a", b"b"], form="v2"),
        ParsedRequest([b"bad"]),
    ]
    outcomes = [Outcome([0.5, 0.5]), Outcome([1.0, 0.0]), Outcome(error=InvalidInput("no")),
                Outcome(error=InvalidInput("NaN"))]  # fmt: skip
    first, second, third = replies(requests, outcomes, "raw", "b4", "7")
    assert json.loads(first.body) == [0.5, 0.5] and first.error is None
    assert second.failures == [(1, outcomes[2].error)] and second.images == 2
    assert json.loads(second.body)["error"] == "InvalidInput: no"
    assert third.error is outcomes[3].error
    assert first.content_type == second.content_type == "application/json"
    binary = ParsedRequest([b"a"], form="v2", single=True, binary_output=True)
    (answer,) = replies([binary], [Outcome([0.5, 0.5])], "raw", "b4", "7")
    assert answer.content_type == "application/octet-stream"
    assert int(answer.headers["Inference-Header-Content-Length"]) == len(answer.body) - 8


def test_under_an_envelope_one_reply_holds_every_images_answer() -> None:
    outcomes = [Outcome([0.25, 0.75]), Outcome(error=InvalidInput("x"))]
    (reply,) = replies([ParsedRequest([b"a", b"b"], form="v1")], outcomes, "v1", "b4", "1")
    assert reply.body[0] == [0.25, 0.75] and reply.body[1]["type"] == "InvalidInput"
    assert reply.error is outcomes[1].error


def test_one_call_answers_a_server_batch_of_every_form_each_request_alone(
    config, toy_model, rng, caplog
) -> None:
    """The whole worker path without TorchServe: TorchServe's request items in, one reply per
    request out, each bad request failing alone beside good ones, ids logged in batch order."""
    classifier = Classifier(toy_model, config, CPU)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    (expected,) = [o.probabilities for o in classifier.classify([encode_npy(image)])]
    v1, _ = encode_request(image, "v1")
    v2_binary, v2_headers = encode_v2_binary(image[None])
    items = [{"body": encode_npy(image)}, {"body": b"junk"}, {"body": v1},
             {"body": v2_binary}, {"body": encode_npy(image[:, :, :2])}]  # fmt: skip
    headers = [{"X-Client-Request-Id": f"id-{i}"} for i in range(len(items))]
    headers[3].update(v2_headers)
    with caplog.at_level(logging.INFO):
        batch = classifier.answer(items, headers.__getitem__, "b4", "7")

    assert batch.protocol == "raw" and batch.images == 5 and batch.output_names is None
    assert [h.status for h in batch.handled] == [200, 415, 200, 200, 400]
    assert [h.request_id for h in batch.handled] == [f"id-{i}" for i in range(5)]
    npy, junk, kserve_v1, kserve_v2, two_channels = batch.bodies
    np.testing.assert_allclose(json.loads(npy), expected, atol=1e-6)
    assert json.loads(junk)["type"] == "UnsupportedMediaType"
    assert "channel" in json.loads(two_channels)["message"]
    np.testing.assert_allclose(json.loads(kserve_v1)["predictions"], [expected], atol=1e-6)
    document = json.loads(kserve_v2)  # binary in, JSON out: no binary output was asked for
    assert document["model_version"] == "7"
    assert document["outputs"][0]["shape"] == [1, config.num_classes]
    np.testing.assert_allclose(document["outputs"][0]["data"], expected, atol=1e-6)
    logged = [r.getMessage() for r in caplog.records]
    assert "handled requests: id-0=200 id-1=415 id-2=200 id-3=200 id-4=400" in logged
    assert sum("request 1 of 5 failed: 415 Unsupported" in m for m in logged) == 1


def test_one_call_answers_an_enveloped_request_with_the_envelopes_output_names(
    config, toy_model, rng
) -> None:
    classifier = Classifier(toy_model, config, CPU)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    tensor = {"name": "image", "shape": list(image.shape), "datatype": "UINT8",
              "data": image.ravel().tolist()}  # fmt: skip
    broken = {**tensor, "shape": [7]}
    batch = classifier.answer([tensor, broken], lambda _: {}, "b4", "7")
    assert batch.protocol == "v2" and batch.output_names == [OUTPUT_NAME] * 2
    good, bad = batch.bodies
    assert good.dtype == np.float32 and good.shape == (config.num_classes,)
    assert bad["code"] == 400 and batch.handled == [Handled(None, 400)]
