"""The operator's command line: what an operator can fix (a wrong URL or data dir, a database
down, a port taken) is said in one line, not in a traceback."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port


def run_cli(*args: str, cwd: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    # Nothing of the caller's IPAAS_* settings: each test says where the platform is.
    base = {k: v for k, v in os.environ.items() if not k.startswith("IPAAS_")}
    return subprocess.run([sys.executable, "-m", "ipaas", *args], cwd=cwd, env={**base, **env}, capture_output=True, text=True, timeout=timeout)


def said(stderr: str) -> list[str]:
    """What the command told the operator on stderr, without log lines: ours (JSON) and gRPC
    C-core's own ("E1201 05:02:13.457917 14377 add_port.cc:83] Failed to add port ...")."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{") and not re.match(r"[EWI]\d{4} ", line)]


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = said(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("IPAAS_DATABASE_URL", "postgresql://nobody@127.0.0.1:{port}/x", "cannot connect to the database postgresql://nobody@127.0.0.1:{port}/x"),
        ("IPAAS_DATABASE_URL", "mysql://x/y", "IPAAS_DATABASE_URL is mysql://x/y: simple-ipaas uses sqlite:///<path> or postgresql://"),
        ("IPAAS_DATA_DIR", "/proc/nope", "/proc/nope"),
    ],
)
@pytest.mark.parametrize("command", [["tenants", "list"], ["migrate"]])
def test_database_problems_are_one_line_errors(tmp_path: Path, command: list[str], setting: str, value: str, expected: str) -> None:
    port = free_port()  # nothing listens there
    env = {setting: value.format(port=port)}
    done = run_cli(*command, cwd=tmp_path, **env)
    line = one_error_line(done)
    assert done.returncode == 1 and expected.format(port=port) in line, line

    debug = run_cli(*command, cwd=tmp_path, IPAAS_LOG_LEVEL="DEBUG", **env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and said(debug.stderr)[-1] == line, "the traceback is there with DEBUG"


def busy_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_core_on_a_busy_port_fails_to_start_in_one_line(tmp_path: Path) -> None:
    with busy_port() as taken:
        listen = "127.0.0.1:%d" % taken.getsockname()[1]
        done = run_cli("core", cwd=tmp_path, IPAAS_DATA_DIR=str(tmp_path / "data"), IPAAS_GRPC_LISTEN=listen, IPAAS_ENGINE_PROCESSES="0")
    line = one_error_line(done)
    assert done.returncode == 3, done.returncode
    assert f"cannot listen on {listen}" in line and "IPAAS_GRPC_LISTEN" in line, line


@pytest.mark.parametrize("blocked", ["core", "gateway"])
def test_serve_does_not_restart_a_process_that_fails_to_start(tmp_path: Path, blocked: str) -> None:
    """A core (or gateway) that cannot start would fail the same way again: serve stops
    with its one line instead of restarting it five times, a traceback each."""
    with busy_port() as taken:
        ports = {"core": free_port(), "gateway": free_port()}
        ports[blocked] = taken.getsockname()[1]
        done = run_cli(
            "serve",
            cwd=tmp_path,
            timeout=90,
            IPAAS_DATA_DIR=str(tmp_path / "data"),
            IPAAS_GRPC_LISTEN=f"127.0.0.1:{ports['core']}",
            IPAAS_HTTP_LISTEN=f"127.0.0.1:{ports['gateway']}",
            IPAAS_ENGINE_PROCESSES="0",
            IPAAS_ADMIN_KEY="ipk_admin_" + "x" * 32,  # no generated key printed
        )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "restarting" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    if blocked == "core":
        assert said(done.stderr) == [f"error: cannot listen on 127.0.0.1:{ports['core']} (IPAAS_GRPC_LISTEN): the address is in use or not available here; stop what holds it or set IPAAS_GRPC_LISTEN"], done.stderr[-3000:]
    else:
        (line,) = said(done.stderr)
        assert "address already in use" in line, done.stderr[-3000:]
