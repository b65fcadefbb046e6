"""Logs: with IMGCLS_LOG_FORMAT=json (the default) every line the service writes to stderr is a
JSON object, from the API process and from its workers, whoever logs it."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import httpx
from PIL import Image, TiffImagePlugin

from tests.conftest import ROOT, free_port, wait_until_ready
from tests.rawhttp import connect, read_until_closed, status_of


def tiff_with_a_tag_past_its_end() -> bytes:
    """A valid TIFF whose ImageDescription claims 10 MB: Pillow skips the tag with a Python
    warning ("Tag data larger than file") and decodes the picture."""
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[270] = "a description longer than four bytes"
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, "TIFF", tiffinfo=info)
    data = bytearray(buf.getvalue())
    assert data[:2] == b"II"
    (ifd,) = struct.unpack_from("<I", data, 4)
    (entries,) = struct.unpack_from("<H", data, ifd)
    for i in range(entries):
        at = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, at)[0] == 270:
            struct.pack_into("<I", data, at + 4, 10_000_000)  # its count
            return bytes(data)
    raise AssertionError("no ImageDescription entry")


def test_every_line_on_stderr_is_json(tmp_path: Path):
    """Not only the service's own lines: uvicorn's (it formats its own as plain text), other
    libraries' warnings (Pillow's about a broken TIFF, in the API process that reads its
    header and in the worker that decodes it: Python printed them as plain text, and a worker
    configured no logging at all) are JSON lines too, each with its level and logger."""
    port = free_port()
    env = {
        **os.environ, "IMGCLS_MODELS": "cifar10_plain20", "PORT": str(port),
        "IMGCLS_WEIGHTS_DIR": str(tmp_path), "IMGCLS_ALLOW_RANDOM_WEIGHTS": "1",
        "IMGCLS_AUTO_DOWNLOAD": "0", "IMGCLS_COMPILE": "0", "IMGCLS_GRPC_PORT": "0",
        "IMGCLS_DECODE": "worker", "IMGCLS_LOG_FORMAT": "json", "IMGCLS_LOG_LEVEL": "info",
    }  # fmt: skip
    env.pop("PYTHONWARNINGS", None)
    log = tmp_path / "stderr.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        try:
            wait_until_ready(url, 120)
            r = httpx.post(f"{url}/classify", files={"file": ("t.tif", tiff_with_a_tag_past_its_end())},
                           timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text
            with connect(url) as sock:  # a request uvicorn cannot parse: it logs a warning
                sock.sendall(b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n")
                data, _, _ = read_until_closed(sock, 10)
            assert status_of(data) == 400, data
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in records)
    loggers = {r["logger"] for r in records}
    assert {"imgcls.access", "uvicorn.error"} <= loggers, loggers
    tags = [r for r in records if "Tag data larger than file" in r["message"]]
    assert len(tags) >= 2 and {r["logger"] for r in tags} == {"py.warnings"}, tags  # both
    assert any("Invalid HTTP request" in r["message"] for r in records), loggers
