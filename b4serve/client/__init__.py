"""What callers import: the concurrent client for the served model, and its CLI
(``python -m b4serve.client``)."""

from b4serve.client.http import (
    ImageInput,
    PredictionError,
    Result,
    RetryPolicy,
    StaticCredential,
    input_name,
    iter_results,
    main,
    npy_bytes,
    predict_batch,
    predict_many,
)

__all__ = [
    "ImageInput",
    "PredictionError",
    "Result",
    "RetryPolicy",
    "StaticCredential",
    "input_name",
    "iter_results",
    "main",
    "npy_bytes",
    "predict_batch",
    "predict_many",
]
