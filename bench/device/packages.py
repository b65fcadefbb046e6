"""What the device machine's Python lacks, for bench/device/prepare.sh.

The device (Python 3.12, its own torch and torchvision) has the scientific stack but not the
service's web stack. ``pins`` lists the packages the app imports that are carried, at the versions
installed here; ``closure`` turns pip's resolution report into the wheels to download; ``check``
verifies that every requirement of every carried wheel is met there.
"""

from __future__ import annotations

import json
import re
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

# Imported by app/ (or its test and benchmark paths on the device) and not on the device, or
# needed at least at the version tested here (the generated gRPC stubs need grpcio >= 1.85.1 and
# protobuf >= 7.35.1; Pillow's decoders are part of the accuracy guards).
CARRIED = [
    "fastapi", "starlette", "uvicorn", "httptools", "python-multipart", "pydantic",
    "pydantic-core", "pydantic-settings", "httpx", "grpcio", "protobuf", "prometheus-client",
    "pillow",
]  # fmt: skip

# On the device already (its image's package list) and left to it: never carried, whatever
# resolves to them. torch and torchvision above all: the device's own CUDA builds.
DEVICE_HAS = {
    canonicalize_name(n)
    for n in (
        "torch", "torchvision", "triton", "numpy", "matplotlib", "tqdm", "packaging", "sympy",
        "mpmath", "networkx", "jinja2", "markupsafe", "filelock", "fsspec", "setuptools",
        "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "python-dateutil", "six",
        "pytest", "pluggy", "iniconfig", "pygments", "pytest-timeout", "uvloop", "psutil",
        "pyyaml",
    )
}  # fmt: skip


# Imported by app/ only on paths the GPU run does not take, so not carried: int8 on the CPU
# (torchao), the CPU benchmark's peers (openvino, nncf, litserve), Ray Serve (ray) and the
# protobuf generator behind app/oip/codegen.py (grpcio-tools). captum is carried without its
# requirements (torch, numpy, matplotlib, tqdm are on the device), fastapi-offline without its
# one (fastapi, carried above).
NOT_CARRIED = {"torchao", "openvino", "nncf", "litserve", "ray", "grpcio-tools"}
CARRIED_ALONE = ["captum", "fastapi-offline"]  # the latter: static files, and fastapi


def pins() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in CARRIED]


def closure(report_path: str) -> list[str]:
    report = json.loads(Path(report_path).read_text())
    out = []
    for item in report["install"]:
        meta = item["metadata"]
        if canonicalize_name(meta["name"]) not in DEVICE_HAS:
            out.append(f"{meta['name']}=={meta['version']}")
    return sorted(out, key=str.lower)


def _device_env() -> dict[str, str]:
    env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    env.update(python_version="3.12", python_full_version="3.12.3", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64",
               implementation_name="cpython", platform_python_implementation="CPython")  # fmt: skip
    return env


def check(folder: str) -> int:
    wheels = {}
    for path in sorted(Path(folder).glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        if name in wheels:
            print(f"two versions of {name} in {folder}", file=sys.stderr)
            return 1
        wheels[name] = (version, path)
    env = _device_env()
    problems = []
    for name, (_, path) in wheels.items():
        with zipfile.ZipFile(path) as z:
            meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
            text = z.read(meta).decode()
        for line in text.splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            if dep in wheels:
                if not req.specifier.contains(wheels[dep][0], prereleases=True):
                    problems.append(f"{name} needs {req}, carried {wheels[dep][0]}")
            elif dep not in DEVICE_HAS:
                problems.append(f"{name} needs {req}: neither carried nor on the device")
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{len(wheels)} wheels for Python 3.12; requirements: "
          f"{'all met' if not problems else f'{len(problems)} unmet'}")  # fmt: skip
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    if argv[0] == "pins":
        print("\n".join(pins()))
    elif argv[0] == "alone":
        print("\n".join(f"{name}=={metadata.version(name)}" for name in CARRIED_ALONE))
    elif argv[0] == "closure":
        print("\n".join(closure(argv[1])))
    elif argv[0] == "check":
        return check(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
