"""Generate the gRPC stubs in ``app/oip/generated`` from ``app/oip/proto``.

Run ``python -m app.oip.codegen`` after changing the ``.proto`` (needs the dev extra's
``grpcio-tools``, pinned so that the output is reproducible); the generated files are committed
and tests/test_oip_codegen.py checks that they are current. The proto is compiled under the
virtual path ``app/oip/generated/``, so the stubs import each other as package modules.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE / "proto"
GENERATED = HERE / "generated"
PROTO = "grpc_predict_v2.proto"
PACKAGE_PATH = "app/oip/generated"  # where the stubs live, relative to the project root


def generate(out_root: Path) -> list[Path]:
    """Compile the proto into ``out_root/app/oip/generated``; returns the files written."""
    from grpc_tools import protoc  # dev-only dependency

    target = out_root / PACKAGE_PATH
    target.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"  # well-known types shipped with the tools
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE_PATH}={PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"{PACKAGE_PATH}/{PROTO}",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_DIR / PROTO}")
    return sorted(p for p in target.iterdir() if p.suffix in (".py", ".pyi"))


def main() -> int:
    written = generate(HERE.parents[1])
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
