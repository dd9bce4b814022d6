"""Request errors, each with its HTTP status, and the one function that turns one into a body."""

from __future__ import annotations

import json

__all__ = [
    "InferenceError",
    "InvalidInput",
    "OutOfMemory",
    "PayloadTooLarge",
    "UnsupportedMediaType",
    "error_body",
    "error_fields",
]


class InferenceError(Exception):
    """Base of the errors one request can fail with; ``status`` is its HTTP code."""

    status: int = 400
    phrase: str = "Bad Request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def type(self) -> str:
        return type(self).__name__


class InvalidInput(InferenceError):
    """The body is an .npy array, but not one we can classify (shape, dtype, values)."""


class PayloadTooLarge(InferenceError):
    """The array is larger than the configured pixel limit."""

    status = 413
    phrase = "Payload Too Large"


class UnsupportedMediaType(InferenceError):
    """The body is not an .npy file at all (no NumPy magic, or not bytes)."""

    status = 415
    phrase = "Unsupported Media Type"


class OutOfMemory(InferenceError):
    """The device ran out of memory running the batch this request was in; the worker goes on."""

    status = 507
    phrase = "Insufficient Storage"


def error_fields(error: InferenceError) -> dict[str, object]:
    """``{"code", "type", "message"}``: what a client is told about a failed request."""
    return {"code": error.status, "type": error.type, "message": error.message}


def error_body(error: InferenceError) -> bytes:
    """JSON body for a failed request, shaped like TorchServe's own errors."""
    return json.dumps(error_fields(error)).encode()
