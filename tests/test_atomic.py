"""The atomic-write helper: whole files or none, and the mode of an ordinary file."""

from __future__ import annotations

import os
import stat

import pytest

from pretrain.atomic import atomic_path, atomic_write


def test_whole_or_nothing_and_ordinary_mode(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write(target, "first\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("torn")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "first\n"  # the old file survives, no temporary file is left
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600: others may read it
