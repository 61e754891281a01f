"""Writing outputs: atomically (a reader or DVC never sees a half-written file), as a set (a
stage's outputs appear together or not at all), with the umask's modes, and with one clear
line when the disk is full or the folder is not writable."""
from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import yaml

from .errors import UserError

STAGING_PREFIX = ".staging-"


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(path: str | os.PathLike, err: BaseException) -> UserError:
    """``err`` (writing ``path``) as one line that says what to do."""
    path = Path(path)
    reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
    code = getattr(err, "errno", None)
    try:
        free = shutil.disk_usage(next(p for p in [path, *path.parents] if p.exists())).free
    except (OSError, StopIteration):
        free = None
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and free is not None and free < 64 * 1024 * 1024):
        # torch's writer says "unexpected pos ..." for a full disk: name the cause instead
        return UserError(f"could not write {path}: the disk is full ({free if free is not None else '?'} bytes "
                         f"free); free space and re-run")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"could not write {path}: {reason}; {path.parent} is not writable: fix its permissions "
                         f"(or mount) and re-run")
    return UserError(f"could not write {path}: {reason}; fix the cause and re-run")


def read_json(path: str | os.PathLike) -> dict:
    """A JSON file a stage wrote; a missing, truncated or garbled one is one line naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; run `dvc repro` (or `dvc checkout {path}`) to bring it back") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({str(err).splitlines()[0]}); it is damaged: "
                        f"`dvc checkout --force {path}` restores it (plain checkout refuses a changed file), or `dvc repro -f` "
                        "the stage that writes it") from None


def parse_yaml(text: str):
    """yaml.safe_load's rules, in C where PyYAML has libyaml (its wheels do): params.yaml in
    1.5 ms instead of 14, in every stage."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    On any exception the temporary file is removed and ``path`` is left as it was; an OS error
    (disk full, read-only folder) becomes a one-line :class:`UserError` naming ``path``.
    ``suffix`` keeps an extension for writers that append one (``np.savez`` adds ``.npz``).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs follow the umask like any file
        os.close(fd)
    except OSError as err:
        raise write_error(path, err) from err
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as err:
        raise write_error(path, err) from err
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_outputs(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder inside ``directory``; its files move into ``directory`` together
    when the block succeeds, and are thrown away when it fails, so a failed stage never leaves
    a mix of new and missing outputs. Staging folders left by a killed process are removed."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(old, ignore_errors=True)
        stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
    except OSError as err:
        raise write_error(directory / STAGING_PREFIX, err) from err
    try:
        yield stage
        for file in sorted(stage.iterdir()):
            try:
                os.replace(file, directory / file.name)
            except OSError as err:
                raise write_error(directory / file.name, err) from err
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def split_metrics(values: dict, keys: tuple[str, ...]) -> tuple[dict, dict]:
    """(the numbers among ``keys``, everything else): DVC shows a metrics file's every key as a
    column, so metrics files hold numbers only and the rest goes beside them."""
    numbers = {k: values[k] for k in keys
               if isinstance(values.get(k), (int, float)) and not isinstance(values.get(k), bool)}
    return numbers, {k: v for k, v in values.items() if k not in numbers}


def csv_text(rows: list[dict], fields: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


DIGEST_CHUNK = 1 << 20  # bytes read at a time


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(DIGEST_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def try_lock(path: str | os.PathLike) -> int | None:
    """An exclusive lock on ``path`` (created) for as long as this process holds the returned
    descriptor, or None when another process holds it. The kernel drops it when the process
    dies, even by SIGKILL, so a killed run never leaves it held. Safe against release_lock's
    removal: a lock taken on a file that was removed meanwhile is dropped and taken again."""
    path = Path(path)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        except OSError as err:
            raise write_error(path, err) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # removed (and perhaps made again) between our open and our lock


def release_lock(fd: int, path: str | os.PathLike, remove: bool) -> None:
    """Let go of try_lock's lock; ``remove`` the lock file first (still holding it), so nothing
    is left beside a run that has nothing left to resume."""
    try:
        if remove:
            Path(path).unlink(missing_ok=True)
    finally:
        os.close(fd)


def is_locked(path: str | os.PathLike) -> bool:
    """Whether another process holds ``path``'s lock (try_lock) now."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
