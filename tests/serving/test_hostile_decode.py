"""Every hostile body fails in-process with its own status and a message naming the problem.

Bodies go through the same steps as in the handler: what the request carries (raw .npy bytes or
a KServe request in the body), then decode and classify.
"""

from __future__ import annotations

import pytest
import torch
from hostile_corpus import ACCEPTED_VARIANTS, HOSTILE, Case

from b4serve.serving.pipeline import Classifier
from b4serve.serving.protocol import parse_raw_request


def test_the_corpus_is_large_and_distinct() -> None:
    assert len(HOSTILE) >= 50
    assert len({case.body for case in HOSTILE}) == len(HOSTILE)


@pytest.mark.parametrize("case", HOSTILE, ids=[case.name for case in HOSTILE])
def test_hostile_body_gets_its_own_error(case: Case, config, toy_model) -> None:
    payloads = parse_raw_request({"body": case.body}).payloads
    (outcome,) = Classifier(toy_model, config, torch.device("cpu")).classify(payloads)
    assert outcome.error is not None, case.name
    assert outcome.status == case.status
    assert case.words in outcome.error.message


@pytest.mark.parametrize(
    "body", [b for _, b in ACCEPTED_VARIANTS], ids=[n for n, _ in ACCEPTED_VARIANTS]
)
def test_unusual_but_safe_arrays_are_served(body: bytes, config, toy_model) -> None:
    payloads = parse_raw_request({"body": body}).payloads
    (outcome,) = Classifier(toy_model, config, torch.device("cpu")).classify(payloads)
    assert outcome.error is None and abs(sum(outcome.probabilities) - 1) < 1e-5
