"""The GPU run's preparation (bench/device): the device machine's Python lacks the service's web
stack, which travels as wheels, and an import the device cannot satisfy stops the whole run there
(it did once). Here, where it is cheap: every package that app/ and the tests the device runs
import directly is carried or on the device. Their own requirements are resolved by pip and
checked by bench/device/prepare.sh (``packages.check``, tested below on made-up wheels)."""

from __future__ import annotations

import ast
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench" / "device"))
import packages

# What bench/gpu.sh runs on the device besides app/: these test files and what they import.
DEVICE_TESTS = ["tests/test_gpu.py", "tests/test_soak.py", "tests/conftest.py"]
# Imported there inside fixtures the device's tests do not use: the browser (page tests only).
UNUSED_THERE = {"playwright"}


def _sources() -> list[Path]:
    """app/, and the device's test files with the modules of tests/ they import, transitively."""
    files = list((ROOT / "app").rglob("*.py"))
    todo = [ROOT / f for f in DEVICE_TESTS]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen or not path.exists():
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "tests":
                todo += [ROOT / "tests" / f"{alias.name}.py" for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests."):
                todo.append(ROOT / f"{str(node.module).replace('.', '/')}.py")
    return files + sorted(seen)


def _imported_distributions() -> dict[str, set[str]]:
    """Every third-party distribution imported by those files, with the files that do."""
    tops: dict[str, set[str]] = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in ("app", "tests") and top not in sys.stdlib_module_names:
                    tops.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    by_dist: dict[str, set[str]] = {}
    where = metadata.packages_distributions()
    for name, files in tops.items():
        dists = where.get(name.split(".")[0], [name])
        if len(dists) > 1:  # a namespace package (google.*): the one holding this module
            prefix = "/".join(name.split(".")[:2]) + "/"
            dists = [
                d for d in dists
                if any(str(f).startswith(prefix) for f in metadata.files(d) or [])
            ]  # fmt: skip
        for dist in dists:
            by_dist.setdefault(canonicalize_name(dist), set()).update(files)
    return by_dist


def test_every_package_the_app_imports_is_carried_or_on_the_device():
    covered = (
        {
            canonicalize_name(n)
            for n in [*packages.CARRIED, *packages.CARRIED_ALONE, *packages.NOT_CARRIED]
        }
        | packages.DEVICE_HAS
        | UNUSED_THERE
    )
    imported = _imported_distributions()
    # the scan sees the app's imports and the device tests' (httpx: conftest; pytest: test files)
    assert {"fastapi", "torch", "httpx", "pytest"} <= set(imported)
    assert any(f.startswith("tests/test_decoding") for f in imported["torch"])  # via test_gpu
    missing = {d: sorted(f) for d, f in imported.items() if d not in covered}
    assert not missing, f"imported but neither carried to the device nor there: {missing}"


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    dist = f"{name.replace('-', '_')}-{version}"
    meta = "\n".join(
        ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        + [f"Requires-Dist: {r}" for r in requires]
    )
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", meta + "\n")


def test_check_finds_a_requirement_that_is_neither_carried_nor_on_the_device(tmp_path, capsys):
    _wheel(tmp_path, "web", "1.0", ["helper>=2", "torch", 'oldpy; python_version < "3.10"',
                                    'extra-thing; extra == "all"'])  # fmt: skip
    _wheel(tmp_path, "helper", "2.1", [])
    assert packages.check(str(tmp_path)) == 0  # torch is on the device; markers do not apply

    _wheel(tmp_path, "web2", "1.0", ["opentelemetry-api>=1.44"])
    assert packages.check(str(tmp_path)) == 1
    assert "web2 needs opentelemetry-api>=1.44: neither carried nor on the device" in (
        capsys.readouterr().err
    )


def test_check_finds_a_carried_version_too_old(tmp_path, capsys):
    _wheel(tmp_path, "web", "1.0", ["helper>=2"])
    _wheel(tmp_path, "helper", "1.9", [])
    assert packages.check(str(tmp_path)) == 1
    assert "web needs helper>=2, carried 1.9" in capsys.readouterr().err
