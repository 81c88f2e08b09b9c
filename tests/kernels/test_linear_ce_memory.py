"""The fused LM head + cross-entropy peaks at <= 25% of the unfused path's extra memory (fwd + bwd, fp32,
CPU), measured by tools/bench_linear_ce_memory.py at a smaller size than its default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernels

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_linear_ce_memory.py"


def test_fused_path_uses_a_quarter_of_the_memory_or_less():
    out = subprocess.run([sys.executable, str(TOOL), "--n", "1024", "--hidden", "128", "--vocab", "16384"],
                         capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["unfused_extra_mib"] > 2 * r["logits_mib"]  # the measurement sees the logits at all
    assert r["fused_extra_mib"] <= 0.25 * r["unfused_extra_mib"], r
    assert abs(r["loss_fused"] - r["loss_unfused"]) <= 1e-4 * abs(r["loss_unfused"])
