"""A third-party plugin, pip-installed into a fresh virtual environment, is found through its
entry point exactly like the built-in ones (and a broken one does not stop the core)."""

from __future__ import annotations

import json
import os
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


def _blocks(markdown: str, language: str, section: str) -> str:
    """The first fenced `language` block after the heading that starts with `section`."""
    after = markdown.split(f"\n## {section}", 1)[1]
    return after.split(f"```{language}\n", 1)[1].split("\n```", 1)[0]


@pytest.mark.parametrize("asyncio_mode", [None, "auto"])
def test_the_contract_suite_runs_in_a_plugin_project_as_the_docs_show(asyncio_mode: str | None, tmp_path: Path) -> None:
    """The docs' own example, in a project of its own: pytest-asyncio's default (strict)
    mode, as a third party has it, and auto mode, as this repository has it. Before, strict
    mode gave 1 passed, 17 errors: the suite's async tests and fixture carried no marks."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "writing-a-connector.md").read_text()
    project = tmp_path / "ipaas-mychat"
    (project / "ipaas_mychat").mkdir(parents=True)
    (project / "tests").mkdir()
    pyproject = _blocks(docs, "toml", "1.")
    if asyncio_mode:
        pyproject += f'\n[tool.pytest.ini_options]\nasyncio_mode = "{asyncio_mode}"\n'
    (project / "pyproject.toml").write_text(pyproject)
    (project / "ipaas_mychat" / "__init__.py").write_text(_blocks(docs, "python", "2."))
    (project / "tests" / "test_mychat.py").write_text(_blocks(docs, "python", "3."))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(project), "tests"],
        cwd=project,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": os.pathsep.join([str(project), *sys.path]), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "18 passed" in out.stdout and "error" not in out.stdout.lower(), out.stdout[-3000:]
