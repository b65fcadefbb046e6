"""Where checkpoints live and how they are downloaded and verified.

Reading a checkpoint into a model is the engine's part: app/engine/checkpoint.py.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import secrets
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from app.catalog import ModelSpec
from app.engine.checkpoint import WeightsError, load_into, read_state_dict

__all__ = ["WeightsError", "download", "load_into", "pull", "read_state_dict", "resolve", "status"]


def pull_command(name: str) -> str:
    return f"imgcls weights pull {name}"


def source_url(spec: ModelSpec, mirror: str | None = None) -> str:
    if not spec.weights_url:
        raise WeightsError(f"{spec.name} has no published weights to download")
    if mirror:
        return mirror.rstrip("/") + "/" + Path(spec.weights_url).name
    return spec.weights_url


# A mirror that stops sending fails the download instead of holding it (and the model) forever:
# no byte for DOWNLOAD_STALL_S, or the whole file not in DOWNLOAD_LIMIT_S (vgg19's 548 MB at
# ~0.3 MB/s), is a failure like any network error.
DOWNLOAD_STALL_S = 30.0
DOWNLOAD_LIMIT_S = 1800.0
_CHUNK = 1 << 20


def _partial(dest: Path) -> Path:
    """The temporary file a download writes beside ``dest``: named by host, process and a random
    part, so two downloads of one file never share one (and a file left behind says whose)."""
    token = secrets.token_hex(4)
    return dest.with_name(f"{dest.name}.{socket.gethostname()}.{os.getpid()}.{token}.partial")


# A download writes to its temporary file at least every DOWNLOAD_STALL_S (or fails): one left
# untouched for longer than this is no download's, whichever host or container wrote it.
ABANDONED_AFTER_S = DOWNLOAD_STALL_S + 60.0


def _remove_abandoned(dest: Path) -> None:
    """Remove temporary files of ``dest`` that no download is writing (left by a download that
    was killed, or cut short when its process exited): those untouched for ABANDONED_AFTER_S.
    Host names and process ids are not trusted for this: containers may share both."""
    now = time.time()
    for f in dest.parent.glob(f"{glob.escape(dest.name)}.*.partial"):
        with contextlib.suppress(OSError):
            if now - f.stat().st_mtime > ABANDONED_AFTER_S:
                f.unlink()


# One download of a file at a time in this process: two models that share a checkpoint
# (resnet50 and resnet50:IMAGENET1K_V2, vgg16 and vgg16:int8) may both want it at start-up.
_dest_locks: dict[Path, threading.Lock] = {}
_dest_locks_guard = threading.Lock()


def _lock_for(dest: Path) -> threading.Lock:
    with _dest_locks_guard:
        return _dest_locks.setdefault(dest.resolve(), threading.Lock())


class Downloads:
    """A service's downloads, stopped at its shutdown: each stops at its next chunk, and their
    temporary files are removed at once (a download blocked on a stalled server, or a process
    that exits by the signal that stopped it, would leave them behind)."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self._partials: set[Path] = set()
        self._lock = threading.Lock()

    def started(self, tmp: Path) -> None:
        with self._lock:
            if self.stopped.is_set():
                raise OSError("the service is shutting down")
            self._partials.add(tmp)

    def ended(self, tmp: Path) -> None:
        with self._lock:
            self._partials.discard(tmp)

    def stop(self) -> None:
        with self._lock:
            self.stopped.set()
            for tmp in self._partials:
                with contextlib.suppress(OSError):
                    tmp.unlink()


def _fetch(
    url: str, tmp: Path, progress: bool, published: int | None, downloads: Downloads | None
) -> str:
    """Stream ``url`` into ``tmp``; the sha256 hex digest of what was written. More than the
    ``published`` size allows (announced or sent) is no such checkpoint: refused before it fills
    the disk."""
    digest = hashlib.sha256()
    started = time.monotonic()
    request = urllib.request.Request(url, headers={"User-Agent": "imgcls"})
    written = 0
    with (
        urllib.request.urlopen(request, timeout=DOWNLOAD_STALL_S) as response,
        tmp.open("wb") as out,
    ):
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        if downloads is not None and downloads.stopped.is_set():  # stopped while it connected
            raise OSError("stopped: the service is shutting down")
        if published is not None and expected is not None:
            _check_size(f"announces {expected:,} bytes", expected, published)
        with tqdm(total=expected, disable=not progress, unit="B", unit_scale=True,
                  unit_divisor=1024) as bar:  # fmt: skip
            while chunk := response.read1(_CHUNK):
                out.write(chunk)
                out.flush()  # on disk as it comes: its time says it is alive (_remove_abandoned)
                digest.update(chunk)
                written += len(chunk)
                bar.update(len(chunk))
                if published is not None:
                    _check_size(f"sent over {written:,} bytes", written, published)
                if downloads is not None and downloads.stopped.is_set():
                    raise OSError("stopped: the service is shutting down")
                if time.monotonic() - started > DOWNLOAD_LIMIT_S:
                    raise TimeoutError(f"not finished after {DOWNLOAD_LIMIT_S:g} s")
    # read1 ends quietly at a connection closed early: a file without a published hash would
    # pass for whole
    if expected is not None and written != expected:
        raise OSError(f"the server sent {written:,} of {expected:,} bytes")
    return digest.hexdigest()


def _check_size(what: str, size: int, published: int) -> None:
    """A file over 1% larger than published (torchvision's sizes are in MB to three decimals)
    is not the checkpoint."""
    limit = published * 101 // 100
    if size > limit:
        raise OSError(
            f"the server {what}; the published checkpoint is {published:,} bytes (refused past "
            f"{limit:,}): check the mirror"
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_file_or_missing(dest: Path) -> None:
    """A folder (or anything else) where a checkpoint belongs is no checkpoint: Docker makes
    one where a bind mount names a host file that does not exist."""
    if dest.exists() and not dest.is_file():
        raise WeightsError(
            f"{dest} is not a file (a folder? a container's bind mount of a host file that does "
            "not exist makes one): remove it, or mount the checkpoint there",
            problem="failed",
        )


def download(
    url: str,
    dest: Path,
    sha256_prefix: str | None,
    progress: bool = True,
    replace: bool = False,
    published_bytes: int | None = None,
    downloads: Downloads | None = None,
) -> Path:
    """Fetch ``url`` to ``dest`` atomically, verifying the sha256 prefix when one is known, and
    refusing more than 1% over ``published_bytes`` (the checkpoint's size) when that is known.

    The file is written to a temporary file beside ``dest``, its hash checked, and only then
    renamed into place; on any failure (network, HTTP, a stalled or too slow server, a hash
    mismatch) the temporary file is removed, so a partial or corrupted file never sits where the
    loader looks. Re-running when ``dest`` exists does nothing, unless ``replace``: then a good
    download takes the place of the file there.
    """
    _check_file_or_missing(dest)
    if dest.exists() and not replace:
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only volume, a path through a file: no retry will help
        raise WeightsError(
            f"cannot create the weights folder {dest.parent}: {exc}", problem="failed"
        ) from exc
    with _lock_for(dest):
        if dest.exists() and not replace:  # another thread got it while this one waited
            return dest
        return _download(url, dest, sha256_prefix, progress, published_bytes, downloads)


# Errors writing the file (a read-only volume, a full disk, no permission), as opposed to the
# network's: the model has "failed", and `imgcls weights pull` would fail the same way.
_CANNOT_WRITE = {
    errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EISDIR,
    errno.ENOTDIR,
}  # fmt: skip


def _download(
    url: str,
    dest: Path,
    sha256_prefix: str | None,
    progress: bool,
    published_bytes: int | None,
    downloads: Downloads | None,
) -> Path:
    _remove_abandoned(dest)
    tmp = _partial(dest)
    try:
        if downloads is not None:
            downloads.started(tmp)
        got = _fetch(url, tmp, progress, published_bytes, downloads)
        if sha256_prefix and not got.startswith(sha256_prefix):
            raise WeightsError(
                f"download of {url} failed: its sha256 {got[:16]}... does not start with the "
                f"published hash prefix {sha256_prefix}"
            )
        os.replace(tmp, dest)
    except WeightsError:
        raise
    except OSError as exc:
        if exc.errno in _CANNOT_WRITE:  # the volume's doing: no download will help
            raise WeightsError(f"cannot write {dest}: {exc}", problem="failed") from exc
        raise WeightsError(f"download of {url} failed: {exc}") from exc
    except Exception as exc:  # network errors, HTTP errors, a stalled server
        said = " ".join(str(exc).split())  # one line (urllib's redirect loop says it in three)
        raise WeightsError(f"download of {url} failed: {said}") from exc
    finally:  # also on KeyboardInterrupt and SystemExit (the CLI's SIGTERM)
        with contextlib.suppress(OSError):
            tmp.unlink()
        if downloads is not None:
            downloads.ended(tmp)
    return dest


def pull(
    spec: ModelSpec,
    weights_dir: Path,
    mirror: str | None = None,
    progress: bool = True,
    downloads: Downloads | None = None,
) -> Path:
    """Download ``spec``'s checkpoint unless it is there. A file already there is checked
    against the published sha256 prefix where there is one, and downloaded again if it does not
    match (the good download replaces it)."""
    path = spec.weights_path(weights_dir)
    if path is None:
        raise WeightsError(f"{spec.name} has no published weights to download")
    _check_file_or_missing(path)
    stale = (
        path.is_file()
        and spec.sha256_prefix is not None
        and not file_sha256(path).startswith(spec.sha256_prefix)
    )
    return download(
        source_url(spec, mirror), path, spec.sha256_prefix, progress=progress, replace=stale,
        published_bytes=spec.weights_bytes, downloads=downloads,
    )  # fmt: skip


@dataclass(frozen=True)
class WeightsStatus:
    name: str
    file: str | None
    present: bool
    size_bytes: int | None


def status(spec: ModelSpec, weights_dir: Path) -> WeightsStatus:
    path = spec.weights_path(weights_dir)
    if path is None:
        return WeightsStatus(spec.name, None, False, None)
    present = path.is_file()
    return WeightsStatus(spec.name, str(path), present, path.stat().st_size if present else None)


def resolve(
    spec: ModelSpec,
    weights_dir: Path,
    *,
    auto_download: bool,
    allow_random: bool,
    mirror: str | None = None,
    downloads: Downloads | None = None,
) -> Path | None:
    """The checkpoint to load for ``spec``, downloading it if allowed.

    Returns None when random weights are to be used; raises WeightsError when the model cannot be
    served, with the command that fixes it.
    """
    path = spec.weights_path(weights_dir)
    if path is not None and path.is_file():
        return path
    problem = "has no published weights" if path is None else f"weights not found at {path}"
    if path is not None and auto_download and spec.weights_url:
        try:
            return pull(spec, weights_dir, mirror=mirror, progress=False, downloads=downloads)
        except WeightsError as exc:
            if exc.problem == "failed" and not allow_random:
                raise WeightsError(f"{spec.name}: {exc}", problem="failed") from exc
            problem = f"weights not found at {path} and {exc}"
    if allow_random:
        return None
    fix = (
        f"run `{pull_command(spec.name)}`"
        if spec.weights_url
        else "provide a checkpoint through IMGCLS_MODEL_CONFIG"
    )
    raise WeightsError(
        f"{spec.name}: {problem}; {fix} (or set IMGCLS_ALLOW_RANDOM_WEIGHTS=1 for development)"
    )


def weights_label(spec: ModelSpec, path: Path | None) -> str:
    """What a response's ``weights`` says: the enum member for torchvision weights, the file for
    other checkpoints, ``random`` without one."""
    if path is None:
        return "random"
    if spec.source == "torchvision" and spec.weights_name:
        return spec.weights_name
    return path.name
