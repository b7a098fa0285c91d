#!/usr/bin/env python3
"""Set-up and everyday commands, with nothing needed but Python 3.11+.

    python3 tasks.py run     create/update .venv, install everything, run the platform
    python3 tasks.py test    create/update .venv, install everything, run the whole test suite
    python3 tasks.py protos  regenerate proto/ipaas/v1 after editing a .proto
    python3 tasks.py bench   run the benchmark suite

Each command (re)installs the main package and the three plugin distributions into .venv
when their pyproject.toml files changed since the last install.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PLUGINS = ["plugins/slack", "plugins/discord", "plugins/openweather"]
STAMP = VENV / ".installed"


def _fingerprint() -> str:
    digest = hashlib.sha256(sys.version.encode())
    for path in [ROOT / "pyproject.toml", *(ROOT / p / "pyproject.toml" for p in PLUGINS)]:
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest()


def ensure_env() -> None:
    if sys.version_info < (3, 11):
        raise SystemExit("simple-ipaas needs Python 3.11 or newer")
    if not (BIN / "python").exists():
        print("creating .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    fingerprint = _fingerprint()
    if STAMP.exists() and STAMP.read_text() == fingerprint:
        return
    pip = [str(BIN / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
    targets = ["-e", f"{ROOT}[dev]"]
    for plugin in PLUGINS:
        if (ROOT / plugin / "pyproject.toml").exists():
            targets += ["-e", str(ROOT / plugin)]
    print("installing simple-ipaas and its plugins into .venv", flush=True)
    subprocess.run([*pip, "install", *targets], check=True)
    STAMP.write_text(fingerprint)


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if command not in {"run", "test", "protos", "bench"}:
        print(__doc__)
        return 0 if command == "help" else 2
    ensure_env()
    py = str(BIN / "python")
    os.chdir(ROOT)
    if command == "run":
        return _run([py, "-m", "ipaas", "serve", *rest])
    if command == "test":
        return _run([py, "-m", "pytest", *rest])
    if command == "protos":
        return _run([py, "scripts/gen_protos.py", *rest])
    return _run([py, "-m", "bench", *rest])


def _run(cmd: list[str]) -> int:
    """Run cmd and answer with its exit code. Ctrl-C reaches the child from the terminal
    itself, so this process ignores it and waits for the child's own stop, as a shell does
    (subprocess.call printed a KeyboardInterrupt traceback and killed the platform mid-drain);
    a SIGTERM sent to this process alone is passed on."""
    proc = subprocess.Popen(cmd)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda sig, _frame: proc.send_signal(sig))
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
