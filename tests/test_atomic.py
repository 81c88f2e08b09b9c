"""The atomic-write helper: whole files or none, and the mode of an ordinary file; a finished directory
renamed into place unless a concurrent writer's copy is there."""

from __future__ import annotations

import os
import stat

import pytest

from pretrain.atomic import atomic_path, atomic_write, rename_if_absent


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


def test_rename_if_absent_keeps_the_first_copy(tmp_path):
    final = tmp_path / "cache"
    for who in ("first", "second"):
        tmp = tmp_path / f".cache.tmp-{who}"
        tmp.mkdir()
        (tmp / "who").write_text(who)
        assert rename_if_absent(tmp, final) is (who == "first")
        assert not tmp.exists()  # the loser's copy is removed
    assert (final / "who").read_text() == "first"
    # Something at `out` that is not a finished copy: the failed rename is raised, and ours stays.
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "x").write_text("")
    (tmp_path / ".half.tmp").mkdir()
    (tmp_path / ".half.tmp" / "y").write_text("")
    with pytest.raises(OSError):
        rename_if_absent(tmp_path / ".half.tmp", tmp_path / "half", present=lambda d: (d / "done").is_file())
    assert (tmp_path / ".half.tmp" / "y").is_file()
