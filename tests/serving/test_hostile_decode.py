"""Every hostile body fails in-process with its own status and a message naming the problem.

Bodies go through the same steps as in the handler: what the request carries (raw .npy bytes,
a KServe request in the body, or one under the v2 binary-data extension), then decode and
classify.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from hostile_corpus import (
    ACCEPTED_VARIANTS,
    EVERY_HOSTILE,
    HOSTILE,
    OVER_LIMITS,
    WITH_HEADERS,
    Case,
)

from b4serve.serving.config import DEFAULT_MAX_IMAGES, DEFAULT_MAX_REQUEST_PIXELS
from b4serve.serving.errors import PayloadTooLarge
from b4serve.serving.pipeline import Classifier
from b4serve.serving.protocol import header_length, parse_raw_request


def test_the_corpus_is_large_and_distinct() -> None:
    assert len(HOSTILE) >= 80 and len(EVERY_HOSTILE) >= 100
    sent = {(case.body, tuple(case.headers.items())) for case in EVERY_HOSTILE}
    assert len(sent) == len(EVERY_HOSTILE)
    assert len({case.name for case in EVERY_HOSTILE}) == len(EVERY_HOSTILE)


@pytest.mark.parametrize("case", EVERY_HOSTILE, ids=[case.name for case in EVERY_HOSTILE])
def test_hostile_body_gets_its_own_error(case: Case, config, toy_model) -> None:
    payloads = parse_raw_request({"body": case.body}, header_length(case.headers)).payloads
    outcomes = Classifier(toy_model, config, torch.device("cpu")).classify(payloads)
    outcome = next(o for o in outcomes if o.error is not None)  # the one that sets the status
    assert outcome.status == case.status, outcome.error
    assert case.words in outcome.error.message
    assert len(outcome.error.message) < 400  # whatever the client sent, never echoed whole


# KServe requests over a limit (a raw .npy body holds one image: over the pixel limit it fails
# from its header alone, tests/serving/test_codec.py)
KSERVE_OVER = [case for case in EVERY_HOSTILE if case.status == 413 and case.body[:1] == b"{"]


@pytest.mark.parametrize("case", KSERVE_OVER, ids=[case.name for case in KSERVE_OVER])
def test_requests_over_a_limit_are_refused_before_any_image_is_decoded(case: Case) -> None:
    (payload,) = parse_raw_request({"body": case.body}, header_length(case.headers)).payloads
    assert isinstance(payload, PayloadTooLarge)  # one error: nothing left to decode or run


def test_the_over_limit_cases_cover_every_body_form() -> None:
    names = " ".join(case.name for case in OVER_LIMITS + EVERY_HOSTILE if case.status == 413)
    for form in ("v1,", "v2,", "BYTES", "binary,"):
        assert form in names, form


@pytest.mark.parametrize(
    "body", [b for _, b in ACCEPTED_VARIANTS], ids=[n for n, _ in ACCEPTED_VARIANTS]
)
def test_unusual_but_safe_arrays_are_served(body: bytes, config, toy_model) -> None:
    payloads = parse_raw_request({"body": body}).payloads
    (outcome,) = Classifier(toy_model, config, torch.device("cpu")).classify(payloads)
    assert outcome.error is None and abs(sum(outcome.probabilities) - 1) < 1e-5


def test_the_readme_states_the_corpus_and_the_limits_as_they_are() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    flat = " ".join(readme.split())
    statuses = Counter(case.status for case in EVERY_HOSTILE)
    assert f"{len(EVERY_HOSTILE)} hostile bodies" in flat
    assert f"{len(WITH_HEADERS)} under the v2 binary-data extension" in flat
    assert (f"({statuses[400]} get 400, {statuses[413]} get 413, {statuses[415]} get 415)"
            in flat)  # fmt: skip
    assert f"up to {DEFAULT_MAX_IMAGES} images and {DEFAULT_MAX_REQUEST_PIXELS:,} pixels" in flat
