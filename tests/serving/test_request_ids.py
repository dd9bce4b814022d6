"""Client request ids: read from the header, written per batch, read back from a model log."""

from b4serve.serving.request_ids import (
    REQUEST_ID_HEADER,
    Handled,
    handled_line,
    handled_requests,
    is_request_id,
    request_id_of,
)


def test_the_id_is_read_case_insensitively_and_only_as_a_plain_token() -> None:
    assert request_id_of({"x-client-request-id": "job-7:3"}) == "job-7:3"
    assert request_id_of({REQUEST_ID_HEADER.upper(): "a.b_c"}) == "a.b_c"
    assert request_id_of({"Content-Type": "application/octet-stream"}) is None
    # TorchServe also lists each body parameter here, as a dict of its own headers
    assert request_id_of({"body": {"content-type": "application/octet-stream"}}) is None
    for forged in ("a=200 b", "a\nhandled requests: x=200", "", "x" * 129, "é"):
        assert request_id_of({REQUEST_ID_HEADER: forged}) is None, forged
        assert not is_request_id(forged)
    assert is_request_id("x" * 128) and is_request_id("soak-3f9c01aa-warm-17")


def test_batches_written_are_read_back_from_a_model_log() -> None:
    first = [Handled("job-0", 200), Handled(None, 415), Handled("job-2", 400)]
    second = [Handled("job-0", 200)]
    prefix = "2026-12-01T10:00:00.000+0000 [INFO ] W-9000-b4_1-stdout MODEL_LOG -"
    log = [
        f"{prefix} batch of 3 images: 1 failed ['UnsupportedMediaType']",
        f"{prefix} {handled_line(first)}",
        f"{prefix} something else",
        f"{prefix} {handled_line(second)}",
    ]
    assert handled_line(first) == "handled requests: job-0=200 -=415 job-2=400"
    assert handled_requests(log) == [first, second]
