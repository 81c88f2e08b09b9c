"""What every command shares: one-line errors. `raise fail("data.train: no index.json in shards/")` prints
`error: ...` on stderr and exits with the code (2: bad input; 1: a run that failed). The line is redacted
(pretrain.redact): an error that names a URL or a `pipe:` command shows no credential it holds."""

from __future__ import annotations

import typer

from pretrain.redact import redact


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `error: <message>` on stderr; return the Exit to raise (so call sites read `raise fail(...)`)."""
    typer.echo(f"error: {redact(message)}", err=True)
    return typer.Exit(code)
