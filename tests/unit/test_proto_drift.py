"""The committed generated code must match the protos: regenerate into a temporary folder
and compare byte for byte. Fails when a .proto changes without `make protos`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "proto" / "ipaas" / "v1"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    _generator().generate(tmp_path)
    fresh = tmp_path / "ipaas" / "v1"
    fresh_files = {p.name: p.read_bytes() for p in fresh.iterdir() if p.is_file()}
    committed = {p.name: p.read_bytes() for p in GENERATED.iterdir() if p.is_file() and p.suffix in {".py", ".pyi"}}
    assert sorted(fresh_files) == sorted(committed), "generated file set differs: run `make protos`"
    stale = [name for name in fresh_files if fresh_files[name] != committed[name]]
    assert not stale, f"generated code is stale for {stale}: run `make protos`"


def test_drift_is_detected_when_a_proto_changes(tmp_path: Path, monkeypatch) -> None:
    gen = _generator()
    proto_copy = tmp_path / "proto"
    (proto_copy / "ipaas" / "v1").mkdir(parents=True)
    for proto in GENERATED.glob("*.proto"):
        (proto_copy / "ipaas" / "v1" / proto.name).write_text(proto.read_text())
    edited = proto_copy / "ipaas" / "v1" / "breakers.proto"
    edited.write_text(edited.read_text().replace("int32 failure_count = 3;", "int32 failure_count = 3;\n  int32 added_field = 7;"))
    monkeypatch.setattr(gen, "PROTO_ROOT", proto_copy)
    monkeypatch.setattr(gen, "PACKAGE_DIR", proto_copy / "ipaas" / "v1")
    out = tmp_path / "out"
    out.mkdir()
    gen.generate(out)
    fresh = (out / "ipaas" / "v1" / "breakers_pb2.py").read_bytes()
    assert fresh != (GENERATED / "breakers_pb2.py").read_bytes()


def test_every_rpc_has_an_http_rule_and_own_messages() -> None:
    from google.api import annotations_pb2

    from ipaas.service.server import SERVICES

    # gRPC only: the REST gateway coalesces single webhooks into it; over REST a sender posts
    # each webhook to its own URL, where its signature and rate limit apply.
    grpc_only = {"ipaas.v1.ExecutionService.ReceiveWebhooks"}
    seen_inputs: set[str] = set()
    for service in SERVICES:
        for method in service.methods:
            if method.full_name in grpc_only:
                continue
            rule = method.GetOptions().Extensions[annotations_pb2.http]
            assert rule.WhichOneof("pattern"), f"{method.full_name} has no google.api.http rule"
            assert rule.__getattribute__(rule.WhichOneof("pattern")).startswith("/api/")
            assert method.input_type.name == f"{method.name}Request", method.full_name
            assert method.output_type.name == f"{method.name}Response", method.full_name
            assert method.input_type.full_name not in seen_inputs
            seen_inputs.add(method.input_type.full_name)
