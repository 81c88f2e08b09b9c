"""The one home of other libraries' private APIs (pretrain/compat.py): every recorded version is the installed one, so
an upgrade fails here first, with one line per library; the check's line names the library and both versions;
importing the module imports none of the libraries."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from pretrain import compat


def test_every_recorded_version_is_the_installed_one():
    assert [line for lib in compat.VERSIONS if (line := compat.mismatch(lib))] == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for lib in compat.VERSIONS:
            compat.check(lib)  # neither raises nor warns


def test_another_release_fails_with_one_line_naming_library_and_versions():
    with pytest.raises(compat.PrivateAPIVersionError) as e:
        compat.check("ray", found="2.61.0")
    assert not isinstance(e.value, ValueError)  # not an error of the input (RunError): the code's
    assert str(e.value) == (
        "ray 2.61.0 is installed, but pretrain/compat.py's uses of private ray APIs were written against ray 2.60.0: "
        "check them and record 2.61.0 in pretrain.compat.VERSIONS"
    )
    with pytest.raises(compat.PrivateAPIVersionError, match=r"^deepspeed 0\.20\.0 is installed, .* deepspeed 0\.19\.8:"):
        compat.check("deepspeed", found="0.20.0")


def test_a_patch_release_warns_with_the_same_line_and_a_local_build_tag_is_ignored():
    with pytest.warns(compat.PrivateAPIVersionWarning) as w:
        compat.check("torch", found="2.13.1+cu128")
    assert [str(x.message) for x in w] == [compat.mismatch("torch", "2.13.1")]
    assert "\n" not in str(w[0].message) and "torch 2.13.1" in str(w[0].message) and "torch 2.13.0" in str(w[0].message)
    assert compat.mismatch("torch", found="2.13.0+cu128") is None


def test_importing_compat_imports_none_of_the_libraries():
    code = ("import sys, pretrain.compat\n"
            "assert not {'torch', 'ray', 'deepspeed'} & set(sys.modules), sorted(sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
