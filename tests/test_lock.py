"""The lock (constraints.txt) covers every declared dependency, so a clean install resolves nothing.

CI once spent half an hour in pip's resolver (boto3 / botocore / aiobotocore) and gave up; a dependency
added to pyproject.toml without `make lock` would bring that back."""

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_dependency_is_locked():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(meta["dependencies"]) + [r for group in meta["optional-dependencies"].values() for r in group]
    locked = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            locked[_norm(req.name)] = req
    missing = [r for r in declared if _norm(Requirement(r).name) not in locked]
    assert not missing, f"not in constraints.txt (run make lock): {missing}"
    for r in map(Requirement, declared):
        pin = locked[_norm(r.name)]
        version = next(iter(pin.specifier)).version
        assert r.specifier.contains(version, prereleases=True), f"{r} does not admit the locked {pin}"
