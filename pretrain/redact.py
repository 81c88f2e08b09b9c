"""Credentials out of everything the project writes: one function, `redact`, masks them in a URL, a `pipe:`
command or any line of text; `redacted_tree` does it to every string of a config tree; `redact_yaml` to a
dumped config.

What is masked (the value becomes `***`, the rest of the text stays, so a path still says where it points):

- a URL's user information: `https://user:SECRET@host` -> `https://user:***@host`, and a lone user part
  (`https://TOKEN@host`, as git hosts take tokens) -> `https://***@host`;
- query parameters that carry a credential, whatever their case: the presigned-URL signatures of S3 and
  GCS (`X-Amz-Signature`, `X-Amz-Credential`, `X-Amz-Security-Token`, `X-Goog-Signature`, ...), Azure SAS's
  `sig`, `token`, `access_token`, `key`, `password`, and any name holding token, secret, signature,
  password, credential or api key;
- in commands (`pipe:curl -H 'Authorization: Bearer abc' ...`): the value of an Authorization, Cookie or
  token/key/secret header (the scheme word stays: `Bearer ***`), a bare `Bearer abc`, curl's `-u user:pw`,
  `--password=...`, and shell assignments of variables named like secrets (`AWS_SECRET_ACCESS_KEY=...`).

Redaction is one-way and idempotent (`redact(redact(s)) == redact(s)`). What is written redacted is never
read back for its secret: a run and its resume take the config of the command line, not `config.yaml`.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# Query parameter names that are credentials as a whole word, and words that make any name one.
_SECRET_PARAMS = frozenset({
    "sig", "signature", "token", "access_token", "refresh_token", "id_token", "key", "apikey", "api_key",
    "api-key", "password", "passwd", "pwd", "secret", "client_secret", "auth", "x-amz-signature",
    "x-amz-credential", "x-amz-security-token", "x-goog-signature", "x-goog-credential", "googleaccessid",
})
_SECRET_WORDS = ("token", "secret", "signature", "password", "credential", "apikey", "api_key", "api-key")

# scheme://userinfo@ : the authority ends at the first / ? # (RFC 3986); greedy, so a user part that holds
# an @ (unencoded, as people write them) is masked up to the last @ of the authority.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<info>[^/?#\s'\"<>@]*(?:@[^/?#\s'\"<>@]*)*)@")
_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[A-Za-z0-9_.\-]+)=(?P<value>[^&#;\s'\"<>()]*)")
# A header: Authorization and Cookie wherever they appear; a header named like a token, key or secret only as
# curl's or wget's -H/--header (elsewhere "tokenizer: ..." is no header). The value runs to the closing quote
# or the end of the line; an auth scheme word stays.
_SCHEME = r"(?P<scheme>(?:bearer|basic|token|digest|aws4-hmac-sha256)\s+)?(?P<value>[^'\"\r\n]+)"
_HEADER = re.compile(r"(?P<name>\b(?:proxy-)?authorization|\bcookie)(?P<sep>\s*:\s*)" + _SCHEME, re.IGNORECASE)
_OPT_HEADER = re.compile(r"(?P<name>(?:-H|--header)[\s=]*['\"]?[\w-]*(?:token|api-key|apikey|secret|key)[\w-]*)"
                         r"(?P<sep>\s*:\s*)" + _SCHEME, re.IGNORECASE)
_BEARER = re.compile(r"(?P<scheme>\bBearer\s+)(?P<value>[^\s'\"]+)")
# curl's -u/--user user:password, wget's and others' --password=... / --password ...
_USER_OPT = re.compile(r"(?P<opt_user>(?:^|\s)(?:-u|--user|--proxy-user)[\s=]+['\"]?[^:\s'\"]*:)(?P<value>[^\s'\"]+)")
_PASSWORD_OPT = re.compile(r"(?P<opt>--(?:[\w-]*-)?(?:password|passwd|secret|token|api-key)[\s=]+['\"]?)"
                           r"(?P<value>[^\s'\"]+)",
                           re.IGNORECASE)
# NAME=value in a shell command, for variable names that say secret (AWS_SECRET_ACCESS_KEY, HF_TOKEN, ...).
_ASSIGN = re.compile(r"(?P<name>\b[A-Z][A-Z0-9_]*(?:SECRET|TOKEN|PASSWORD|PASSWD|KEY|CREDENTIALS?)[A-Z0-9_]*=)"
                     r"(?P<value>[^\s'\";&|]+)")


def secret_param(name: str) -> bool:
    """Whether a query parameter of this name carries a credential (case-insensitive)."""
    low = name.lower()
    return low in _SECRET_PARAMS or any(w in low for w in _SECRET_WORDS)


def _userinfo(m: re.Match) -> str:
    if not m["info"] or m["info"].startswith(MASK):
        return m[0]
    user, colon, _ = m["info"].partition(":")
    return f"{m['scheme']}{user}:{MASK}@" if colon else f"{m['scheme']}{MASK}@"


def _param(m: re.Match) -> str:
    if not secret_param(m["name"]) or not m["value"] or m["value"].startswith(MASK):
        return m[0]
    return f"{m['lead']}{m['name']}={MASK}"


def _masked(prefix: str):
    """A replacement that keeps the match's `prefix` group and masks its `value`; a masked value stays as it is
    (so that redacting twice changes nothing)."""
    return lambda m: m[0] if m["value"].startswith(MASK) else f"{m[prefix]}{MASK}"


def _header(m: re.Match) -> str:
    value = m["value"].rstrip()
    if not value or value.startswith(MASK):
        return m[0]
    return f"{m['name']}{m['sep']}{m['scheme'] or ''}{MASK}{m['value'][len(value):]}"


def redact(text: str) -> str:
    """`text` (a URL, a `pipe:` command, a log or error line) with every credential it holds masked."""
    if not isinstance(text, str) or not text:
        return text
    # Each pass masks values; a masked value can end a match that the text had held together (a mask
    # splitting "user:pw@host" and a header), so passes repeat until nothing changes (twice, in practice).
    for _ in range(8):
        text, before = _once(text), text
        if text == before:
            break
    return text


def _once(text: str) -> str:
    text = _USERINFO.sub(_userinfo, text)
    text = _PARAM.sub(_param, text)
    text = _HEADER.sub(_header, text)
    text = _OPT_HEADER.sub(_header, text)
    text = _BEARER.sub(_masked("scheme"), text)
    text = _USER_OPT.sub(_masked("opt_user"), text)
    text = _PASSWORD_OPT.sub(_masked("opt"), text)
    return _ASSIGN.sub(_masked("name"), text)


def redacted_tree(tree: Any) -> Any:
    """A copy of a config tree (dicts, lists, scalars, as `model_dump(mode="json")` gives) with every string
    redacted; keys and non-string values are kept."""
    if isinstance(tree, dict):
        return {k: redacted_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(redacted_tree(v) for v in tree)
    return redact(tree) if isinstance(tree, str) else tree


def redact_yaml(text: str) -> str:
    """A dumped YAML config with every string value redacted; the text itself when nothing needed masking
    (so its layout and comments stay as written)."""
    import yaml

    tree = yaml.safe_load(text)
    masked = redacted_tree(tree)
    return text if masked == tree else yaml.safe_dump(masked, sort_keys=False)


def leaked(tree: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, redacted value) for each string of a config tree that holds a credential."""
    if isinstance(tree, dict):
        return [hit for k, v in tree.items() for hit in leaked(v, f"{prefix}{k}.")]
    if isinstance(tree, (list, tuple)):
        return [hit for i, v in enumerate(tree) for hit in leaked(v, f"{prefix.rstrip('.')}[{i}].")]
    if isinstance(tree, str) and redact(tree) != tree:
        return [(prefix.rstrip("."), redact(tree))]
    return []
