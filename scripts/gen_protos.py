"""Regenerate the Python code for proto/ipaas/v1 (messages, gRPC stubs and .pyi stubs).

Run with `make protos` (or `python scripts/gen_protos.py`). The generated files are
committed next to the .proto files and form the package `ipaas.v1`; the drift test in
tests/unit/test_proto_drift.py regenerates into a temporary folder and compares.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE_DIR = PROTO_ROOT / "ipaas" / "v1"


def include_dirs() -> list[str]:
    """Include paths: our protos, googleapis-common-protos, and protobuf's well-known types."""
    import google.api  # googleapis-common-protos ships annotations.proto/http.proto here

    googleapis = Path(next(iter(google.api.__path__))).parent.parent
    well_known = resources.files("grpc_tools") / "_proto"
    return [str(PROTO_ROOT), str(googleapis), str(well_known)]


def generate(out_dir: Path) -> None:
    """Generate the code for every .proto under proto/ipaas/v1 into out_dir."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PACKAGE_DIR.glob("*.proto"))
    args = ["grpc_tools.protoc", *(f"-I{d}" for d in include_dirs())]
    args += [f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    if protoc.main([*args, *protos]) != 0:
        raise SystemExit("protoc failed")
    init = out_dir / "ipaas" / "v1" / "__init__.py"
    init.write_text('"""Generated from proto/ipaas/v1 by scripts/gen_protos.py. Do not edit."""\n')


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT)
