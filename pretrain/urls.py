"""The one place that decides whether a data, tokenizer or storage path is a URL rather than a local path.

URLs are `scheme://...` (s3, gs, http(s), file, ...) and webdataset's `pipe:` commands; anything else is
a path on this machine's file system.
"""

from __future__ import annotations


def is_url(path: str) -> bool:
    """True for `scheme://...` and `pipe:...`, False for local paths (relative or absolute)."""
    return "://" in path or path.startswith("pipe:")
