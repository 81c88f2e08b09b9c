"""The one place that decides whether a data, tokenizer or storage path is a URL rather than a local path,
and that reads one: whole, through a library client, retried with backoff when the error may pass.

URLs are `scheme://...` (s3, gs, http(s), file, ...) and webdataset's `pipe:` commands; anything else is
a path on this machine's file system. `scheme://` URLs are read with fsspec (s3fs for s3://; gs:// and
az:// need gcsfs or adlfs installed), never through a shell; endpoint and credentials come from the
client's standard variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION for s3), so AWS, GCS's S3 interface, MinIO or Ceph need no setting of ours. A `pipe:`
command runs in a shell: only a path the user wrote in their own config may be one (see
`pretrain.data.manifest`), never one built from what a manifest says.

Retries: a read that fails in a way that may pass (a timeout, a reset connection, an HTTP 5xx, an I/O
error) is tried again, `PRETRAIN_READ_ATTEMPTS` times in all (4), after 0.5, 1, 2, ... s (at most 8 s,
plus up to 0.5 s of jitter so ranks that fail together do not retry together). Each socket read of s3
and http(s) times out after `PRETRAIN_READ_TIMEOUT_S` (60 s), so a stalled read ends in about 4 minutes,
well before a rank's collective timeout. A missing or forbidden object is not retried. The clients' own
retry loops are turned off, so the number of attempts is this one. The retry log and ReadFailed's line show a
URL redacted (pretrain.redact): no password, signature or token.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import tenacity

from pretrain.errors import first_line  # also re-exported: `from pretrain.urls import first_line`
from pretrain.redact import redact

log = logging.getLogger(__name__)

ATTEMPTS = 4  # default of PRETRAIN_READ_ATTEMPTS
TIMEOUT_S = 60.0  # default of PRETRAIN_READ_TIMEOUT_S: seconds one socket read may stall
BACKOFF_S = (0.5, 8.0)  # first and longest wait between attempts (doubling)

# Errors that say the object is not there, not readable by these credentials, or not addressable: trying
# again gives the same answer. ImportError: fsspec's "install gcsfs to access gs://".
_PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError, ImportError)


class ReadFailed(Exception):
    """A URL or path that could not be read; the message is one line (without the URL: callers name it)."""


def is_url(path: str) -> bool:
    """True for `scheme://...` and `pipe:...`, False for local paths (relative or absolute)."""
    return "://" in path or is_command(path)


def is_command(path: str) -> bool:
    """True for webdataset's `pipe:<shell command>` form, which runs a command to read."""
    return path.startswith("pipe:")


def read_bytes(url: str, limit: int | None = None) -> bytes:
    """The whole content of a local path, a `scheme://` URL or a `pipe:` command's output. Transient
    failures are retried (module docstring); raises ReadFailed with one line: "cannot read: <why>" for
    a permanent failure, "unreadable after N attempts: <why>" when every attempt failed. With `limit`, a
    file or a `scheme://` object is read only up to `limit + 1` bytes (a ranged GET), enough for a caller
    expecting `limit` to see that it is larger without fetching it whole; a `pipe:` command is the user's
    own and is read whole."""
    attempts = max(1, int(_env_number("PRETRAIN_READ_ATTEMPTS", ATTEMPTS)))
    timeout = _env_number("PRETRAIN_READ_TIMEOUT_S", TIMEOUT_S)
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=BACKOFF_S[0], max=BACKOFF_S[1]) + tenacity.wait_random(0, 0.5),
        retry=tenacity.retry_if_not_exception_type(_PERMANENT),
        before_sleep=lambda state: log.warning("read %s failed (attempt %d of %d: %s); retrying", redact(url),
                                               state.attempt_number, attempts,
                                               redact(first_line(state.outcome.exception()))),
        reraise=True,
    )
    try:
        return retrying(_read_once, url, timeout, limit)
    except FileNotFoundError as e:  # s3fs and fsspec's http say only the path: say what it means
        raise ReadFailed(redact(f"cannot read: not found ({first_line(e)})")) from None
    except _PERMANENT as e:
        raise ReadFailed(redact(f"cannot read: {first_line(e)}")) from None
    except Exception as e:  # every attempt failed in a way that might have passed
        raise ReadFailed(redact(f"unreadable after {attempts} attempts: {first_line(e)}")) from None


def _read_once(url: str, timeout: float, limit: int | None) -> bytes:
    if is_command(url):
        import webdataset as wds

        stream = wds.gopen(url, "rb")
        try:
            return stream.read()
        finally:
            stream.close()  # webdataset's Pipe raises here when the command failed
    if "://" not in url:
        with Path(url).open("rb") as f:
            return f.read(-1 if limit is None else limit + 1)
    import fsspec

    protocol = url.split("://", 1)[0]
    fs, path = fsspec.core.url_to_fs(url, **_client_options(protocol, timeout))
    if protocol in ("s3", "s3a"):
        fs.retries = 1  # s3fs's own loop (5 tries on timeouts) is not a constructor option; counted here
    return fs.cat_file(path) if limit is None else fs.cat_file(path, start=0, end=limit + 1)


def _client_options(protocol: str, timeout: float) -> dict:
    """fsspec options per protocol: the per-read timeout, and no retry loop of the client's own."""
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                                  "retries": {"max_attempts": 1, "mode": "standard"}}}
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                                                   sock_read=timeout)}}
    return {}


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name)
    try:
        value = default if text is None else float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ReadFailed(f"{name} must be a positive number (got {text!r})")
    return value
