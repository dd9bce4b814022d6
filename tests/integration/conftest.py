"""One real TorchServe for the integration session, always stopped at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from b4serve.lab.sandbox import ROOT, Server, server_env


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """TorchServe serving the demo model, deployed with the real scripts and no checkpoint."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.fail("Java is required for the integration tests (TorchServe's frontend)")
    root = tmp_path_factory.mktemp("torchserve")
    # 30-second keys: renewal happens while the tests run, and waiting one out is short. The v2
    # port cuts a body still arriving after 20 s (test_v2_hostile.py's trickles), not 60.
    env = {**server_env(root, token_expiration_min=0.5), "B4_V2_READ_TIMEOUT_S": "20"}
    running = Server(env=env, root=root)
    started = time.monotonic()
    try:
        running.deploy()
        print(f"\n[integration] first deploy took {time.monotonic() - started:.0f} s")
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def v2_plugin() -> None:
    """Fail with the reason if deploy.sh cannot build the v2 plugin (it would serve without)."""
    check = subprocess.run([str(ROOT / "scripts" / "build_plugin.sh"), "--check"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    if check.returncode != 0:
        pytest.fail(f"the v2 API tests need the plugin: {check.stderr.strip()}")
