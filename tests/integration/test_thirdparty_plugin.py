"""A third-party plugin, pip-installed into a fresh virtual environment, is found through its
entry point exactly like the built-in ones (and a broken one does not stop the core)."""

from __future__ import annotations

import json
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from ipaas.v1 import connectors_pb2, connectors_pb2_grpc
from tests.conftest import core_with

PLUGIN = Path(__file__).resolve().parents[1] / "thirdparty_plugin"


@pytest.fixture(scope="module")
def plugin_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv that sees this project's packages (through a .pth file, so nothing is
    downloaded) and has the third-party plugin really installed by pip."""
    root = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in site.getsitepackages() if p.startswith(sys.prefix)]
    # addsitedir (not a bare path) so the editable installs' own .pth finders run too.
    Path(purelib, "ipaas-project.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in ours))
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-build-isolation", str(PLUGIN)],
        check=True,
        capture_output=True,
        timeout=180,
    )
    return python


def test_cli_lists_the_third_party_connector(plugin_venv: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [str(plugin_venv), "-m", "ipaas", "connectors", "list", "--json"],
        capture_output=True,
        text=True,
        check=True,
        env={"IPAAS_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    data = json.loads(out.stdout)
    by_name = {c["name"]: c for c in data["connectors"]}
    assert {"echo", "slack", "discord", "openweather"} <= set(by_name)
    assert by_name["echo"]["distribution"] == "ipaas-echo" and by_name["echo"]["version"] == "1.2.3"


async def test_list_connectors_rpc_shows_installed_connectors(tmp_path: Path) -> None:
    async with core_with(tmp_path) as core:
        tenant = await core.new_tenant()
        stub = connectors_pb2_grpc.ConnectorServiceStub(core.channel)
        listed = await stub.ListConnectors(connectors_pb2.ListConnectorsRequest(), metadata=tenant.md)
    names = [c.name for c in listed.connectors]
    assert names == sorted(names) and {"slack", "discord", "openweather"} <= set(names)
    slack = next(c for c in listed.connectors if c.name == "slack")
    assert slack.actions[0].config_schema["required"] == ["text"]


async def test_core_serves_with_a_broken_plugin_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ipaas_exploding.py").write_text("raise RuntimeError('plugin bug at import')\n")
    dist = tmp_path / "ipaas_exploding-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ipaas-exploding\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ipaas.connectors]\nexploding = ipaas_exploding\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    async with core_with(tmp_path / "core") as core:
        assert ("ipaas-exploding:exploding", "import failed: RuntimeError: plugin bug at import") in core.server.registry.problems
        tenant = await core.new_tenant()
        stub = connectors_pb2_grpc.ConnectorServiceStub(core.channel)
        listed = await stub.ListConnectors(connectors_pb2.ListConnectorsRequest(), metadata=tenant.md)
        assert "slack" in [c.name for c in listed.connectors]
