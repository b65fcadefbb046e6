"""The committed gRPC stubs are what the committed .proto compiles to (python -m app.oip.codegen)."""

from __future__ import annotations

from pathlib import Path

from app.oip import codegen


def test_generated_stubs_are_current(tmp_path: Path):
    written = codegen.generate(tmp_path)
    committed = sorted(p for p in codegen.GENERATED.iterdir() if p.suffix in (".py", ".pyi"))
    assert [p.name for p in written] == [p.name for p in committed if p.name != "__init__.py"]
    for fresh in written:
        assert fresh.read_bytes() == (codegen.GENERATED / fresh.name).read_bytes(), (
            f"{fresh.name} is stale: run python -m app.oip.codegen"
        )
