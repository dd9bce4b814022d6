"""Every hostile body fails in-process with its own status and a message naming the problem."""

from __future__ import annotations

import pytest
import torch
from hostile_corpus import ACCEPTED_VARIANTS, HOSTILE, Case

from b4serve.pipeline import Classifier


def test_the_corpus_is_large_and_distinct() -> None:
    assert len(HOSTILE) >= 50
    assert len({case.body for case in HOSTILE}) == len(HOSTILE)


@pytest.mark.parametrize("case", HOSTILE, ids=[case.name for case in HOSTILE])
def test_hostile_body_gets_its_own_error(case: Case, config, toy_model) -> None:
    (outcome,) = Classifier(toy_model, config, torch.device("cpu")).classify([case.body])
    assert outcome.error is not None, case.name
    assert outcome.status == case.status
    assert case.words in outcome.error.message


@pytest.mark.parametrize(
    "body", [b for _, b in ACCEPTED_VARIANTS], ids=[n for n, _ in ACCEPTED_VARIANTS]
)
def test_unusual_but_safe_arrays_are_served(body: bytes, config, toy_model) -> None:
    (outcome,) = Classifier(toy_model, config, torch.device("cpu")).classify([body])
    assert outcome.error is None and abs(sum(outcome.probabilities) - 1) < 1e-5
