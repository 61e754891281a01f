"""The part of the download stage's cache key that DVC cannot see: a local source's content.

DVC re-runs `download` when its params or code change; `data.source` is a path string, so a
local folder or archive edited in place (an image replaced, an archive re-made) would leave it
"unchanged". The `source` stage (always run by DVC; stdlib only: 0.4 s for a URL, about 4 s for
a folder of 60,000 images on 2 CPU cores) writes data/source.json: for a local path, a digest of every file's relative
path, size and modification time under it; `download` depends on that file, so it re-runs
exactly when the source's files change. A file that is touched but not changed re-runs
`download` too; it writes the same data/cifar10.npz, so nothing after it re-runs.

A URL's content is pinned by `data.md5` (a param of `download`), so its key is the URL alone:
`source` never touches the network.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .fetch import is_url


def source_key(source: str) -> dict:
    """What data/source.json holds for ``source`` (a URL or a local path, relative to the
    working directory as the download stage reads it)."""
    if is_url(source):
        return {"source": source, "kind": "url"}
    path = Path(source).expanduser()
    if not path.exists():  # the download stage says what is wrong, in its own words
        return {"source": source, "kind": "missing"}
    digest, files, size = hashlib.sha256(), 0, 0
    if path.is_file():
        entries = [(path.name, path.stat())]
    else:
        entries = []
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                full = Path(root) / name
                entries.append((full.relative_to(path).as_posix(), full.stat()))
    for rel, st in entries:
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        files += 1
        size += st.st_size
    return {"source": source, "kind": "file" if path.is_file() else "folder", "files": files, "bytes": size,
            "digest": digest.hexdigest()}
