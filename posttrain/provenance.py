"""Where results come from: the code version that is part of every content key."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import posttrain


@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the package's source: new code means new keys (no stale artifacts after a fix)."""
    digest = hashlib.sha256(posttrain.__version__.encode())
    root = Path(posttrain.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
