"""Where results come from: the code version that is part of every content key.

Keys use the package version plus ``CACHE_VERSION``, not a hash of the source, so editing code
that does not change what stages produce (a log message, a new stage kind) keeps every cache
valid. Bump ``CACHE_VERSION`` in the same change as anything that alters a stage's output
(numerics, rendering, data handling); the manifest also records ``source_hash`` so an artifact
can always be traced to the exact code that made it.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import posttrain

CACHE_VERSION = 2


def code_version() -> str:
    return f"{posttrain.__version__}/cache-{CACHE_VERSION}"


@lru_cache(maxsize=1)
def source_hash() -> str:
    """Hash of the package's source files (recorded in manifests, not part of keys)."""
    digest = hashlib.sha256()
    root = Path(posttrain.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
