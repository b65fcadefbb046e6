"""Logs: with IMGCLS_LOG_FORMAT=json (the default) every line the service writes to stderr is a
JSON object, from the API process and from its workers, whoever logs it."""

from __future__ import annotations

import functools
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

from tests.conftest import ROOT, children, free_port, wait_until_ready
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
    """Not only the service's own lines: uvicorn's and torch's (each formats its own as plain
    text), and the workers' (a worker configured no logging at all: its info lines were lost,
    its warnings plain text) are JSON lines too, each with its level and logger. A TIFF that
    Pillow reads with a warning (a tag past the file's end) is answered and not logged: a
    client could fill the log with such warnings. A worker killed after it compiled (the
    watchdog, a crash) leaves nothing behind for multiprocessing's resource tracker, which
    would print a plain-text warning of "leaked semaphore objects" when the service stops."""
    port = free_port()
    env = {
        **os.environ, "IMGCLS_MODELS": "cifar10_plain20", "PORT": str(port),
        "IMGCLS_WEIGHTS_DIR": str(tmp_path), "IMGCLS_ALLOW_RANDOM_WEIGHTS": "1",
        "IMGCLS_AUTO_DOWNLOAD": "0", "IMGCLS_COMPILE": "1", "IMGCLS_MAX_BATCH_SIZE": "auto",
        "IMGCLS_GRPC_PORT": "0", "IMGCLS_DECODE": "worker", "IMGCLS_LOG_FORMAT": "json",
        "IMGCLS_LOG_LEVEL": "info",
    }  # fmt: skip
    env.pop("PYTHONWARNINGS", None)
    log = tmp_path / "stderr.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        try:
            wait_until_ready(url, 300)
            r = httpx.post(f"{url}/classify", files={"file": ("t.tif", tiff_with_a_tag_past_its_end())},
                           timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text
            with connect(url) as sock:  # a request uvicorn cannot parse: it logs a warning
                sock.sendall(b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n")
                data, _, _ = read_until_closed(sock, 10)
            assert status_of(data) == 400, data
            (worker,) = _workers_of(proc.pid)
            os.kill(worker, signal.SIGKILL)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    records = _json_lines(log.read_text())
    loggers = {r["logger"] for r in records}
    assert {"imgcls.access", "imgcls.worker", "uvicorn.error"} <= loggers, loggers
    assert any("Invalid HTTP request" in r["message"] for r in records), loggers
    assert not [r for r in records if "Tag data larger than file" in r["message"]]


def _workers_of(pid: int) -> list[int]:
    """The service's CPU workers: the children of its multiprocessing fork server."""
    servers = [c for c in children(pid) if b"multiprocessing.forkserver" in _cmdline(c)]
    return [w for server in servers for w in children(server)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it ended meanwhile
        return b""


def _json_lines(text: str) -> list[dict]:
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in records)
    return records


CONFIGURE = """
import logging, sys, warnings
import torch  # it puts a plain-text handler of its own on its logger, not propagating
assert logging.getLogger("torch").handlers and not logging.getLogger("torch").propagate
{before}
from app.observability import configure_logging
configure_logging("info", "json")
configure_logging("info", "json")  # each app made configures again: no second handler
warnings.warn("a library's warning")
logging.getLogger("torch._dynamo").warning("a torch warning")
logging.getLogger("somelib").error("a library's error")
logging.getLogger("somelib").info("below the root's warning level")
logging.getLogger("imgcls.test").info("imgcls at info")
"""


def test_configured_logging_formats_what_python_logs():
    """configure_logging: Python's warnings, torch's logger (its own handler) and any
    library's warnings and errors become one JSON line each, at the root's WARNING; imgcls's
    own at the configured level. A root logger the host process configured itself keeps its
    handlers alone (no line twice)."""
    run = functools.partial(subprocess.run, capture_output=True, text=True, cwd=ROOT, timeout=120)
    r = run([sys.executable, "-c", CONFIGURE.format(before="")])
    assert r.returncode == 0, r.stderr
    records = _json_lines(r.stderr)
    said = [(x["logger"], x["level"]) for x in records]
    assert said == [("py.warnings", "warning"), ("torch._dynamo", "warning"),
                    ("somelib", "error"), ("imgcls.test", "info")], said  # fmt: skip
    host = "logging.basicConfig(format='HOST %(name)s %(message)s')"
    r = run([sys.executable, "-c", CONFIGURE.format(before=host)])
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines.count("HOST somelib a library's error") == 1, lines
    assert not any("a library's error" in x and x.startswith("{") for x in lines), lines
