"""pretrain: distributed pretraining on Ray + DeepSpeed ZeRO + Triton + webdataset + W&B."""

from pathlib import Path as _Path

# In a source tree (a checkout, or the working_dir a Ray job uploads) the Triton kernels live in the
# top-level folder kernels/, installed as `pretrain.kernels` (pyproject's package-dir). Listing the tree's
# root in this package's search path makes `pretrain.kernels` that folder of the same tree, whatever was
# installed elsewhere; an installed wheel has pretrain/kernels/ itself and skips this.
_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "kernels").is_dir() and (_root / "kernels" / "__init__.py").is_file():
    __path__.append(str(_root))  # noqa: F821  (__path__ is defined for packages)
