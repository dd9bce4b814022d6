"""The benchmark's rounds against the real server: served and in-process rows side by side."""

from __future__ import annotations

import pytest

from b4serve.lab import bench
from b4serve.lab.sandbox import Server
from b4serve.ops.manage import ManagementAPI
from b4serve.serving.codec import encode_npy

pytestmark = pytest.mark.integration


def test_rounds_interleave_served_and_in_process_rows_and_add_them_up(server: Server) -> None:
    version = ManagementAPI(server.endpoints, server.keys).default_version("b4")
    assert version is not None
    classifier = server.classifier(version)  # the served build, loaded here
    bodies = [encode_npy(image) for image in bench.demo_images(2)]
    images = [classifier.decode(body) for body in bodies]
    model = classifier.model
    beside_ours = bench.InProcess("in-process, beside ours", bench.DEFAULT, model, images)
    beside_seed = bench.InProcess("in-process, beside the seed", bench.SEED, model, images)
    plan = {"c1": 1, "c8": 2, "c32": 1}

    rounds = bench.measure_in_rounds(
        {bench.DEFAULT.name: server}, [(bench.DEFAULT, plan)], bodies,
        [beside_ours, beside_seed], micro_batches=(1,), seconds=0.0, rounds=2,
    )  # fmt: skip

    # each round: served rows, then the runtime paired with that configuration; the seed's is
    # not served here
    assert len(rounds) == 2
    for rows in rounds:
        assert [(r.section, r.config, r.setting) for r in rows] == [
            ("end to end", bench.DEFAULT.name, "1 clients"),
            ("end to end", bench.DEFAULT.name, "8 clients"),
            ("end to end", bench.DEFAULT.name, "32 clients"),
            ("in-process", "in-process, beside ours", "micro-batch 1"),
        ]
        # the plan's requests per round, and 3 forwards (timed() runs at least 3)
        assert [r.images for r in rows] == [1, 2, 1, 3]
        assert all(len(r.latencies_s) == r.images and r.seconds > 0 for r in rows[:3])
        assert rows[3].ceiling_of == bench.DEFAULT.name
    merged = bench.merge_rounds(rounds)
    assert [r.images for r in merged] == [2, 4, 2, 6]
    assert beside_seed.warm == set()  # never measured
