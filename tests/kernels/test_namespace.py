"""Our kernels install as `pretrain.kernels` beside Hugging Face's `kernels` (import name `kernels`, which
transformers probes for hub kernels), and neither overwrites the other.

The coexistence check runs in a fresh interpreter in isolated mode (`-I`: neither the working directory
nor PYTHONPATH on sys.path) from a scratch directory, i.e. the installed environment as any program
sees it. Inside this pytest process the repository root is on sys.path (tests/ is a package), and
there the folder kernels/ itself is importable as a top-level `kernels` and hides Hugging Face's: that
comes from the folder's name, not from the installation, and holds for any process started at the root.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli comes with Hugging Face's kernels
    import tomli as tomllib

import pretrain.kernels

ROOT = Path(__file__).resolve().parents[2]
OURS = ROOT / "pretrain" / "kernels"

PROBE = r"""
import importlib.util, json, site, sys

import torch

import kernels as hf
from pretrain.kernels import attention, rms_norm
import pretrain.kernels as ours

torch.manual_seed(0)
q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
out = attention(q, k, v, causal=True, backend="reference")
ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
x, w = torch.randn(3, 16), torch.randn(16)
y = rms_norm(x, w, 1e-6, backend="reference")
y_ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
try:
    torch.ops.kernels.rms_norm_fwd
    old_op = True
except (AttributeError, RuntimeError):
    old_op = False
print(json.dumps({
    "hf_file": hf.__file__,
    "hf_get_kernel": callable(getattr(hf, "get_kernel", None)),
    "spec_origin": importlib.util.find_spec("kernels").origin,
    "site_packages": site.getsitepackages(),
    "ours_name": ours.__name__,
    "ours_file": ours.__file__,
    "attention_err": (out - ref).abs().max().item(),
    "rms_norm_err": (y - y_ref).abs().max().item(),
    "op": str(torch.ops.pretrain_kernels.rms_norm_fwd),
    "old_op": old_op,
}))
"""


def _under(path: str | Path, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


def test_hugging_face_kernels_and_pretrain_kernels_coexist(tmp_path):
    r = subprocess.run([sys.executable, "-I", "-c", PROBE], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    # `import kernels` is Hugging Face's, from site-packages, not our folder.
    assert seen["hf_get_kernel"], seen
    assert not _under(seen["hf_file"], OURS), seen  # (not ROOT: the venv may live in the repository)
    assert any(_under(seen["hf_file"], Path(p)) for p in seen["site_packages"]), seen
    assert not _under(seen["spec_origin"], OURS), seen
    # Ours is `pretrain.kernels`: the folder pretrain/kernels/, editable or from a wheel.
    assert seen["ours_name"] == "pretrain.kernels"
    ours_file = Path(seen["ours_file"])
    assert ours_file.resolve() == (OURS / "__init__.py").resolve() or ours_file.parts[-3:-1] == ("pretrain", "kernels"), seen
    assert seen["attention_err"] < 1e-5 and seen["rms_norm_err"] < 1e-5, seen
    # The custom ops live in torch.ops.pretrain_kernels; nothing is left under torch.ops.kernels.
    assert "pretrain_kernels" in seen["op"] and not seen["old_op"], seen


def test_pretrain_kernels_resolves_to_the_folder_from_the_repository_root():
    """`pretrain.kernels` is the folder pretrain/kernels/, with no search-path hack in `pretrain`."""
    assert Path(pretrain.kernels.__file__).resolve() == (OURS / "__init__.py").resolve()
    assert pretrain.kernels.attention.__module__ == "pretrain.kernels.attention"
    assert hasattr(torch.ops.pretrain_kernels, "attention_fwd")
    assert "__path__.append" not in (ROOT / "pretrain" / "__init__.py").read_text()


def test_every_package_is_found_for_setuptools():
    """setuptools finds the packages (`pretrain*`): every folder with an __init__.py under pretrain/ goes
    into the wheel, and nothing outside it does."""
    from setuptools import find_packages

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set(find_packages(str(ROOT), **cfg["packages"]["find"]))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pretrain").rglob("__init__.py")}
    assert found == on_disk and "pretrain.kernels" in found
