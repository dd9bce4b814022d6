"""A batch that runs out of device memory, through TorchServe's own worker-side classes: its
requests get 507 with our JSON body, a bad request beside them keeps its own status, and the
same worker answers the next batch."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from gpu_fakes import OutOfMemoryInScript, scripted

from b4serve.lab.inprocess_worker import decode_replies, load_service, request, unpack_archive
from b4serve.serving.codec import encode_npy


def test_out_of_memory_batch_gets_507_and_the_worker_serves_the_next(tmp_path, config, rng):
    model = scripted(tmp_path / "model.pt", OutOfMemoryInScript(limit=4))  # 2 images + mirrors
    model_dir = unpack_archive(
        tmp_path / "unpacked", model, dataclasses.replace(config, micro_batch=4)
    )
    service = load_service(model_dir, batch_size=4)
    good = [encode_npy(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]

    batch = [request(0, good[0]), request(1, b"junk"), request(2, good[1]), request(3, good[2])]
    replies = decode_replies(service.predict(batch))
    assert [r.status for r in replies] == [507, 415, 507, 507]
    assert {r.phrase for r in replies if r.status == 507} == {"Insufficient Storage"}
    body = json.loads(replies[0].body)
    assert body["code"] == 507 and body["type"] == "OutOfMemory"
    assert "ran out of memory" in body["message"] and "CUDA out of memory" in body["message"]
    assert json.loads(replies[1].body)["type"] == "UnsupportedMediaType"

    replies = decode_replies(service.predict([request(0, good[0]), request(1, good[1])]))
    assert [r.status for r in replies] == [200, 200]
    assert all(len(json.loads(r.body)) == 6 for r in replies)
