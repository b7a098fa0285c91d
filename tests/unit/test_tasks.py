"""tasks.py, the README's two commands: Ctrl-C stops what they run the way it stops itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Stands in for `ipaas serve`: on SIGINT it drains for a while, then exits 0.
DRAINING_CHILD = """
import signal, sys, time
stopping = []
signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
print("ready", flush=True)
while not stopping:
    time.sleep(0.05)
time.sleep(1.0)
print("drained", flush=True)
"""


@pytest.mark.parametrize(("sig", "to_group"), [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_the_command_waits_for_its_child_to_stop_and_answers_with_its_code(sig: signal.Signals, to_group: bool) -> None:
    """Ctrl-C reaches the terminal's whole group; a SIGTERM may reach tasks.py alone. Before,
    subprocess.call answered Ctrl-C with a KeyboardInterrupt traceback and killed the
    platform in the middle of its drain."""
    runner = f"import sys, tasks; sys.exit(tasks._run([sys.executable, '-c', {DRAINING_CHILD!r}]))"
    proc = subprocess.Popen([sys.executable, "-c", runner], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        if to_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Traceback" not in err, err
    assert out.strip() == "drained" and proc.returncode == 0, (out, err, proc.returncode)
