"""`pretrain bench kernels` without a GPU: the interpreter correctness sweep, its table and its CSV."""

from __future__ import annotations

import csv
import os

import pytest
from typer.testing import CliRunner

from pretrain.bench.kernels import app

pytestmark = pytest.mark.kernels


def test_cpu_mode_runs_the_sweep_and_writes_csv(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    result = CliRunner().invoke(app, ["--op", "rms_norm", "--dtype", "bf16", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "TRITON_INTERPRET" not in os.environ  # the sweep's interpreter switch does not leak
    assert "timings need a GPU" in result.output
    rows = list(csv.DictReader((tmp_path / "correctness.csv").open()))
    assert rows and {r["op"] for r in rows} == {"rms_norm"} and {r["dtype"] for r in rows} == {"bf16"}
    assert {r["tensor"] for r in rows} >= {"out", "grad:0", "grad:1"}
    assert all(r["ok"] == "True" and float(r["err"]) <= float(r["bound"]) for r in rows)


def test_unknown_op_is_one_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["--op", "softmax", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown op" in result.output
