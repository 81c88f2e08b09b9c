"""The markers declared in pyproject.toml sit on the tests they describe, checked statically (no test runs).

A test starts Ray when its body, a function of its module it calls, or a fixture it takes (its module's or a
conftest.py's, transitively) calls `ray.init`, `launch(...)` (a run on the embedded or a named Ray),
`ray.cluster_utils.Cluster(...)`, or runs `ray start`: it must carry `ray`. A test that starts training
processes (spawned gloo ranks, a Ray run) must carry `slow`. Markers come from `@pytest.mark.X` decorators and
the module's `pytestmark`. Every declared marker is used, by a test or by a `-m` in tools/ or the Makefile.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"

RAY_CALLS = {"ray.init", "launch", "Cluster", "cluster_utils.Cluster"}
# Training processes: spawned ranks (tests.helpers.run_gloo_ranks, torch/multiprocessing) or a Ray run.
SPAWN_CALLS = {"run_gloo_ranks", "start_processes", "Process", "mp.spawn", *RAY_CALLS}


def _name(node: ast.AST) -> str:
    """`a.b.c` for a Name/Attribute chain, '' otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def _called(fn: ast.AST) -> set[str]:
    """Every callee of `fn` as written (`ray.init`) and by its last part (`init`)."""
    names = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            n = _name(node.func)
            names |= {n, n.rsplit(".", 1)[-1], ".".join(n.split(".")[-2:])}
    return names


def _runs_ray_start(fn: ast.AST) -> bool:
    """An argv list with `ray` (the executable, possibly a path) followed by "start"."""
    for node in ast.walk(fn):
        if isinstance(node, (ast.List, ast.Tuple)):
            for a, b in zip(node.elts[:-1], node.elts[1:], strict=True):
                if isinstance(b, ast.Constant) and b.value == "start" and any(
                        isinstance(c, ast.Constant) and c.value in ("ray", "ray.exe") for c in ast.walk(a)):
                    return True
    return False


def _is_fixture(fn: ast.FunctionDef) -> bool:
    return any("fixture" in _name(d.func if isinstance(d, ast.Call) else d) for d in fn.decorator_list)


def _marks(node: ast.AST) -> set[str]:
    """X for every `pytest.mark.X` (or `pytest.mark.X(...)`) in a decorator list or a pytestmark value."""
    out = set()
    for n in ast.walk(node):
        m = re.fullmatch(r"pytest\.mark\.(\w+)", _name(n))
        if m and m.group(1) not in ("parametrize", "usefixtures", "filterwarnings", "skipif", "skip", "xfail"):
            out.add(m.group(1))
    return out


class Module:
    """One test module or conftest: its module-level functions, fixtures and pytestmark."""

    def __init__(self, source: str, parent: Module | None = None):
        tree = ast.parse(source)
        self.parent = parent
        self.functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        self.fixtures = {k: f for k, f in self.functions.items() if _is_fixture(f)}
        self.module_marks = set()
        for n in tree.body:
            if isinstance(n, ast.Assign) and any(_name(t) == "pytestmark" for t in n.targets):
                self.module_marks |= _marks(n.value)

    def fixture(self, name: str) -> tuple[Module, ast.FunctionDef] | None:
        if name in self.fixtures:
            return self, self.fixtures[name]
        return self.parent.fixture(name) if self.parent else None

    def reaches(self, fn: ast.FunctionDef, calls: set[str], ray_start: bool, seen: set | None = None) -> bool:
        """Whether `fn`, a function of this module it calls, or a fixture it takes makes one of `calls`."""
        seen = set() if seen is None else seen
        if (id(self), fn.name) in seen:
            return False
        seen.add((id(self), fn.name))
        called = _called(fn)
        if called & calls or (ray_start and _runs_ray_start(fn)):
            return True
        for name in called & set(self.functions):
            if not _is_fixture(self.functions[name]) and self.reaches(self.functions[name], calls, ray_start, seen):
                return True
        for arg in fn.args.args:
            found = self.fixture(arg.arg)
            if found and found[0].reaches(found[1], calls, ray_start, seen):
                return True
        return False

    def problems(self, where: str) -> list[str]:
        out = []
        for name, fn in self.functions.items():
            if not name.startswith("test") or _is_fixture(fn):
                continue
            marks = self.module_marks | set().union(*(_marks(d) for d in fn.decorator_list))
            if "ray" not in marks and self.reaches(fn, RAY_CALLS, True):
                out.append(f"{where}::{name} starts Ray but is not marked ray")
            if "slow" not in marks and self.reaches(fn, SPAWN_CALLS, False):
                out.append(f"{where}::{name} starts training processes but is not marked slow")
        return out


def _conftest_chain(path: Path) -> Module | None:
    """The conftest.py modules from tests/ down to `path`'s directory, the nearest last (as pytest finds them)."""
    chain = None
    for d in [TESTS, *reversed([p for p in path.parents if TESTS in p.parents])]:
        if (d / "conftest.py").is_file():
            chain = Module((d / "conftest.py").read_text(), chain)
    return chain


def test_ray_and_multi_process_tests_are_marked():
    problems = []
    for path in sorted(TESTS.rglob("test_*.py")):
        module = Module(path.read_text(), _conftest_chain(path))
        problems += module.problems(str(path.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


def test_the_check_finds_unmarked_tests():
    """The analysis itself: an unmarked run, a helper that starts Ray, a fixture that does and a spawn are
    all found; marked ones are not."""
    conftest = Module("import pytest\n@pytest.fixture\ndef head():\n    subprocess.run(['ray', 'start', '--head'])\n")
    src = """
import pytest
pytestmark = pytest.mark.kernels
def _run(cfg):
    launch(cfg, quiet=True)
def test_run():
    _run(1)
def test_head(head):
    pass
def test_ranks(gloo_ranks):
    gloo_ranks(print)
@pytest.mark.ray
@pytest.mark.slow
def test_marked():
    ray.init(num_cpus=1)
def test_mentions_only():
    assert "ray start" in "ray start --head"
@pytest.fixture
def gloo_ranks():
    return lambda fn: run_gloo_ranks(fn, rendezvous=None)
"""
    got = Module(src, conftest).problems("m")
    assert got == ["m::test_run starts Ray but is not marked ray",
                   "m::test_run starts training processes but is not marked slow",
                   "m::test_head starts Ray but is not marked ray",
                   "m::test_ranks starts training processes but is not marked slow"], got


def test_every_declared_marker_is_used():
    # [tool.pytest.ini_options] markers = ["name: what it means", ...] (tomllib is Python 3.11+)
    block = re.search(r"^markers = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    declared = re.findall(r'^\s*"(\w+):', block.group(1), re.M)
    assert "slow" in declared and "ray" in declared, declared
    used = set()
    for path in TESTS.rglob("*.py"):
        used |= _marks(ast.parse(path.read_text()))
    for path in [ROOT / "Makefile", *(ROOT / "tools").glob("*")]:
        if path.is_file():
            used |= set(re.findall(r"-m\s+['\"]?(?:not\s+)?(\w+)", path.read_text(errors="replace")))
    assert [m for m in declared if m not in used] == []
