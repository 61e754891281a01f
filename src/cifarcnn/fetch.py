"""Fetch one file from a URL (or take it from a local path), verified by checksum.

This is the only module that touches the network. Every fetched input of the pipeline is a
URL plus checksum in params.yaml; a verified copy is kept in a download cache so a stage that
re-runs for another reason does not fetch it again.
"""
from __future__ import annotations

import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .errors import UserError
from .fsutil import atomic_path, file_digest

USER_AGENT = "cifarcnn/0.1 (reproducible DVC/MLflow pipeline for a CIFAR-10 CNN report; bot) python-urllib"  # Wikimedia asks for a descriptive one
CHUNK = 1 << 20  # bytes per read
RETRIES = 4  # attempts per file; a broken transfer resumes with an HTTP Range request
TIMEOUT_S = 30  # per socket operation, so a dead server fails instead of hanging
TOTAL_LIMIT_S = 3600  # per file, all attempts together (CIFAR-10's 163 MB at >= 45 kB/s)
STALL_WINDOW_S = 60  # a server that sends less than STALL_MIN_BYTES in this long is given up on
STALL_MIN_BYTES = 16 * 1024


class _TooSlow(Exception):
    pass


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(str(source)).scheme in ("http", "https", "ftp")


def verify(path: Path, algorithm: str, expected: str | None, what: str) -> None:
    """Raise a UserError naming the file when its checksum is not ``expected``."""
    if expected is None:
        return
    actual = file_digest(path, algorithm)
    if actual.lower() != expected.lower():
        raise UserError(
            f"{what}: {algorithm} of {path} is {actual}, expected {expected} "
            "(corrupt or wrong file; delete it and fetch again, or fix the checksum in params.yaml)"
        )


def _read_with_deadlines(response, out, bar, deadline: float) -> None:
    """Copy ``response`` into ``out``, one socket read at a time, so that neither a server that
    trickles (a byte now and then resets a per-read timeout) nor a slow one holds us forever."""
    window_start, window_bytes = time.monotonic(), 0
    while block := response.read1(CHUNK):
        out.write(block)
        bar.update(len(block))
        now = time.monotonic()
        window_bytes += len(block)
        if now > deadline:
            raise _TooSlow(f"took longer than the {TOTAL_LIMIT_S} s limit")
        if now - window_start >= STALL_WINDOW_S:
            if window_bytes < STALL_MIN_BYTES:
                raise _TooSlow(f"sent {window_bytes} bytes in {now - window_start:.0f} s (less than "
                               f"{STALL_MIN_BYTES} bytes per {STALL_WINDOW_S} s)")
            window_start, window_bytes = now, 0


def _download(url: str, dest: Path, what: str, final: Path) -> None:
    """Stream ``url`` into ``dest`` with a progress bar, resuming broken transfers."""
    last_error: Exception | None = None
    deadline = time.monotonic() + TOTAL_LIMIT_S
    for attempt in range(1, RETRIES + 1):
        have = dest.stat().st_size if dest.exists() else 0
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                if have and response.status != 206:  # server ignored Range: start again
                    have = 0
                mode = "ab" if have else "wb"
                length = response.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with open(dest, mode) as out, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, desc=f"fetch {what}",
                    disable=None, leave=False,
                ) as bar:
                    _read_with_deadlines(response, out, bar, deadline)
                if total is not None and dest.stat().st_size < total:
                    raise ConnectionError(f"transfer ended at {dest.stat().st_size} of {total} bytes")
                return
        except _TooSlow as err:
            received = dest.stat().st_size if dest.exists() else 0
            dest.unlink(missing_ok=True)
            raise UserError(f"{what}: {url} {err}; gave up after {received} bytes. Download it another way "
                            f"and put it at {final} (it is verified there)") from None
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:  # asked past the end: the partial file is stale
                dest.unlink()
            elif 400 <= err.code < 500 and err.code not in (408, 429):
                raise UserError(f"{what}: {url} answered HTTP {err.code} {err.reason}") from err
            last_error = err
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
            last_error = err
        if time.monotonic() > deadline:
            break
        if attempt < RETRIES:
            time.sleep(min(2 ** attempt, 10) * 0.1)
    reason = getattr(last_error, "reason", last_error)
    raise UserError(
        f"{what}: could not download {url} after {RETRIES} attempts ({reason}); check the connection, "
        f"or download that file yourself and put it at {final} (it is verified there)"
    )


def fetch(
    source: str,
    cache_dir: str | os.PathLike,
    *,
    algorithm: str,
    expected: str | None,
    what: str,
    filename: str | None = None,
    require_checksum: bool = True,
) -> Path:
    """Return a local, verified copy of ``source`` (a URL or a local path).

    A URL is downloaded into ``cache_dir`` (kept between runs; reused when its checksum
    matches). ``expected=None`` skips verification and is only allowed for local files.
    """
    if not is_url(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(f"{what}: local source {path} does not exist")
        if path.is_file():
            verify(path, algorithm, expected, what)
        return path
    if expected is None and require_checksum:
        raise UserError(f"{what}: a checksum is required for a URL source ({source}); set it in params.yaml")
    name = filename or Path(urllib.parse.urlparse(source).path).name or "download"
    cached = Path(cache_dir) / name
    if cached.exists() and (expected is None or file_digest(cached, algorithm).lower() == expected.lower()):
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(cached.name + ".part")
    _download(source, partial, what, cached)
    try:
        verify(partial, algorithm, expected, what)
    except UserError:
        partial.unlink(missing_ok=True)
        raise
    with atomic_path(cached) as tmp:
        shutil.move(partial, tmp)
    return cached
