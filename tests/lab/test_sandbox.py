"""A process with throwaway servers stops them when it is sent SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys

from b4serve.lab.sandbox import ROOT

# Stands in for bench/soak: a finally block that stops a server, then a long wait.
WAITS = """
import time
from b4serve.lab.sandbox import exit_on_sigterm
exit_on_sigterm()
try:
    print("ready", flush=True)
    time.sleep(60)
finally:
    print("servers stopped", flush=True)
"""


def test_sigterm_runs_the_finally_blocks_that_stop_servers() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", WAITS], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "ready\n"
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert output == "servers stopped\n"
    assert process.returncode == 128 + signal.SIGTERM
