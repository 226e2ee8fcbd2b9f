"""md5 checks of dataset files, each file hashed once per process.

A sweep's preflight (``sam_bench.cli``) verifies a dataset's files, then the trainer verifies them
again in the same process (Hydra's basic launcher runs the jobs there), and torchvision's dataset
classes hash every file once more when they are built: CIFAR-10's 180 MB were hashed four times per
run. A digest is kept per (absolute path, size, mtime_ns), so a file replaced or rewritten since is
hashed again.
"""

from __future__ import annotations

import os
import time

from torchvision.datasets.utils import calculate_md5

#: A file modified this recently is hashed but its digest not kept: a rewrite within the
#: filesystem's timestamp granularity (a few ms; 2 s on FAT) would leave size and mtime unchanged.
RECENT_NS = 2_000_000_000
_digests: dict[tuple[str, int, int], str] = {}


def _hash(path: str) -> str:
    return calculate_md5(path)  # torchvision's own (its name bound here: counting its calls counts torchvision's alone)


def file_md5(path: str) -> str:
    """The md5 hex digest of ``path``, hashed once per process while the file stays as it was."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    digest = _digests.get(key)
    if digest is None:
        digest = _hash(path)
        if time.time_ns() - st.st_mtime_ns > RECENT_NS:
            _digests[key] = digest
    return digest


def md5_matches(path: str, md5: str | None) -> bool:
    """torchvision's ``check_integrity`` through the cache: False for a missing file, True for any
    file when ``md5`` is None."""
    if not os.path.isfile(path):
        return False
    return md5 is None or file_md5(path) == md5
