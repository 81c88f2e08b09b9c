"""`pretrain bench kernels` and tools/gpu_check.sh on a CPU: the long-format CSV, the plots, the W&B run, the
correctness sweep under the Triton interpreter, and the check script's CPU part.

The in-process sweep times only providers that need no interpreter (torch eager and SDPA on tiny shapes),
so it costs milliseconds; the script's run is the one end-to-end pass through the interpreter."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pretrain.bench import report, timing
from pretrain.bench.kernels import app, interpreter, sweep

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"


@pytest.fixture(scope="module")
def attention_rows():
    rows, failures = sweep(("attention",), ("torch", "sdpa"), "fp32", True, torch.device("cpu"), reps=2)
    assert not failures
    return rows


def test_sweep_rows_are_liger_long_format(attention_rows):
    assert all(tuple(r) == report.COLUMNS for r in attention_rows)
    got = {(r["kernel_provider"], r["kernel_operation_mode"], r["x_name"]) for r in attention_rows}
    assert got == {(p, m, x) for p in ("torch", "sdpa") for m in timing.MODES for x in ("T", "H")}
    # Two points per axis, one row per (provider, mode, point); a CPU writes no memory rows.
    assert len(attention_rows) == 2 * 3 * 4 and {r["metric_name"] for r in attention_rows} == {"speed"}
    for r in attention_rows:
        assert 0 < r["y_value_20"] <= r["y_value_50"] <= r["y_value_80"] and r["metric_unit"] == "ms"
        extra = json.loads(r["extra_benchmark_config_str"])
        assert extra["dtype"] == "fp32" and r["x_name"] not in extra and {"B", "D"} <= set(extra)


def test_csv_plots_and_wandb(attention_rows, tmp_path):
    report.write_csv(attention_rows, tmp_path / "kernels.csv")
    with open(tmp_path / "kernels.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == report.COLUMNS
    back = report.read_csv(tmp_path / "kernels.csv")
    assert [(r["x_value"], r["y_value_50"]) for r in back] == [
        (r["x_value"], r["y_value_50"]) for r in attention_rows]
    # A GPU's memory rows add a fourth panel; these stand in for them (a CPU measures none).
    memory = [dict(r, metric_name="memory", metric_unit="MB") for r in back
              if r["kernel_operation_mode"] == "full"]
    plots = report.plot(back + memory, tmp_path / "plots")
    assert sorted(p.name for p in plots) == ["attention_H.png", "attention_T.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)

    os.environ.pop("WANDB_API_KEY", None)
    files = Path(report.log_wandb(attention_rows, [{"op": "attention", "ok": True}], plots, tmp_path))
    logged = {p.name.split("_")[0] for p in (files / "media").rglob("*") if p.is_file()}
    assert {"kernels", "correctness", "attention"} <= logged  # both tables and the plot images


def test_interpreter_switch_does_not_leak(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with interpreter(True):
        assert os.environ["TRITON_INTERPRET"] == "1"
    assert "TRITON_INTERPRET" not in os.environ


def test_unknown_op_is_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["--ops", "rms_norm,softmax", "--out", str(tmp_path), "--no-wandb"])
    assert result.exit_code == 2 and "--ops: unknown op 'softmax'" in result.output


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_check_cpu_part(tmp_path):
    """The script's CPU part end to end: the interpreter correctness sweep and the quick timing sweep of one
    op, its CSV, plots and log, and a clear line that the GPU parts were skipped."""
    env = {**os.environ, "GPU_CHECK_RESULTS": str(tmp_path), "GPU_CHECK_OPS": "swiglu",
           "GPU_CHECK_DTYPE": "fp32"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([str(SCRIPT), "--cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "PASS  kernel correctness" in log and "SKIP  GPU parts" in log
    checks = list(csv.DictReader((tmp_path / "kernels" / "correctness.csv").open()))
    assert checks and all(r["ok"] == "True" for r in checks)
    assert {r["tensor"] for r in checks} >= {"out", "grad:0"}
    rows = report.read_csv(tmp_path / "kernels" / "kernels.csv")
    assert {(r["kernel_provider"], r["kernel_operation_mode"]) for r in rows} == {
        (p, m) for p in ("triton", "torch") for m in timing.MODES}
    assert {r["gpu_name"] for r in rows} == {"cpu (Triton interpreter)"}
    plots = sorted(p.name for p in (tmp_path / "kernels" / "plots").iterdir())
    assert plots == ["swiglu_H.png", "swiglu_T.png"]
