"""Raw HTTP/1.1 over sockets, for clients no HTTP library will play: silent, stalled, slow,
oversized, or gone mid-request."""

from __future__ import annotations

import contextlib
import socket
import time


def connect(url: str, timeout: float = 10.0) -> socket.socket:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float, str]:
    """Everything the server sends until it closes the connection (or ``limit_s`` passes).
    Returns the bytes, the seconds waited, and how it ended: "closed", "reset" or "open"."""
    start = time.monotonic()
    data = b""
    how = "closed"
    try:
        while True:
            left = limit_s - (time.monotonic() - start)
            if left <= 0:
                how = "open"
                break
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        how = "open"
    except ConnectionResetError:
        how = "reset"
    return data, time.monotonic() - start, how


def status_of(response: bytes) -> int | None:
    """The status code of the first non-1xx response in ``response``, if any."""
    for line in response.split(b"\r\n"):
        if line.startswith(b"HTTP/1.1 "):
            code = int(line.split()[1])
            if code >= 200:
                return code
    return None


def read_response(sock: socket.socket, limit_s: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length body, leaving the connection open."""
    sock.settimeout(limit_s)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def multipart(data: bytes, boundary: str = "imgclsboundary", name: str = "file") -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="x"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )


def healthz_on(sock: socket.socket) -> tuple[int, bytes]:
    """``GET /healthz`` on a connection left open: whether it still serves (status, body)."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    status, _, answer = read_response(sock)
    return status, answer


def chunked_head(path: str) -> bytes:
    """A POST's head with a chunked body (of a size no header tells)."""
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()  # fmt: skip


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def send_endless_chunked(url: str, path: str, up_to: int) -> int:
    """A chunked body of 64 KB chunks with no end, sent until the server stops reading (its
    reset) or ``up_to`` bytes: how many were sent."""
    sent = 0
    sock = connect(url)
    try:
        sock.sendall(chunked_head(path))
        piece = chunk(b"x" * 65536)
        with contextlib.suppress(OSError):  # reset, once the server stopped reading
            while sent < up_to:
                sock.sendall(piece)
                sent += len(piece)
    finally:
        sock.close()
    return sent
