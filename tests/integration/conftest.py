"""One real TorchServe for the integration session, always stopped at the end."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator

import pytest

from b4serve.lab.sandbox import Server, server_env


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """TorchServe serving the demo model, deployed with the real scripts and no checkpoint."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.fail("Java is required for the integration tests (TorchServe's frontend)")
    root = tmp_path_factory.mktemp("torchserve")
    # 1-minute keys: renewal happens while the tests run
    running = Server(env=server_env(root, token_expiration_min=1), root=root)
    started = time.monotonic()
    try:
        running.deploy()
        print(f"\n[integration] first deploy took {time.monotonic() - started:.0f} s")
        yield running
    finally:
        running.stop()
