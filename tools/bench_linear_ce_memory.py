"""Peak extra memory of the LM head + cross-entropy, forward plus backward: fused vs unfused, on CPU.

Each path runs in a fresh subprocess. After the inputs exist (and a tiny warm-up has paid for lazy
initialisation), the process's peak-RSS counter is reset (/proc/self/clear_refs); the "extra" memory
is the peak RSS during forward + backward minus the RSS before it. Prints a table and one JSON line.

    python tools/bench_linear_ce_memory.py                      # 8192 tokens, hidden 512, vocab 50304, fp32
    python tools/bench_linear_ce_memory.py --n 2048 --vocab 16384 --hidden 256
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _worker(mode: str, n: int, hidden: int, vocab: int) -> dict:
    import torch

    from pretrain import kernels

    def run(h, w, t):
        if mode == "unfused":
            loss = kernels.linear_cross_entropy_unfused(h, w, t)
        else:
            loss = kernels.linear_cross_entropy(h, w, t, backend="reference" if mode == "fused" else "auto")
        loss.backward()
        return loss.item()

    torch.manual_seed(0)
    h = torch.randn(n, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden).mul_(hidden ** -0.5).requires_grad_(True)
    t = torch.randint(0, vocab, (n,))
    run(h[:8].detach().requires_grad_(), w[:64].detach().requires_grad_(), t[:8] % 64)  # warm-up, not measured
    gc.collect()
    base = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    loss = run(h, w, t)
    peak = _status_kb("VmHWM")
    return {"mode": mode, "extra_mib": (peak - base) / 1024, "loss": loss}


def measure(n: int, hidden: int, vocab: int) -> dict:
    rows = {}
    for mode in ("unfused", "fused"):
        # No PYTHONPATH tweak: `pretrain.kernels` exists only through the install (pyproject's package-dir
        # maps it to kernels/), so the worker imports the installed project like any other process.
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)  # the CPU path proper: chunked plain PyTorch
        cmd = [sys.executable, __file__, "--worker", mode, "--n", str(n), "--hidden", str(hidden), "--vocab", str(vocab)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        rows[mode] = json.loads(out.strip().splitlines()[-1])
    logits_mib = n * vocab * 4 / 2**20
    return {
        "n": n, "hidden": hidden, "vocab": vocab, "dtype": "fp32", "logits_mib": logits_mib,
        "unfused_extra_mib": rows["unfused"]["extra_mib"], "fused_extra_mib": rows["fused"]["extra_mib"],
        "ratio": rows["fused"]["extra_mib"] / rows["unfused"]["extra_mib"],
        "loss_unfused": rows["unfused"]["loss"], "loss_fused": rows["fused"]["loss"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--worker", choices=("unfused", "fused"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(_worker(a.worker, a.n, a.hidden, a.vocab)))
        return
    r = measure(a.n, a.hidden, a.vocab)
    print(f"linear_cross_entropy, {r['n']} tokens x hidden {r['hidden']} x vocab {r['vocab']}, fp32, CPU, fwd+bwd")
    print(f"(one full logits tensor: {r['logits_mib']:.0f} MiB)")
    print(f"{'path':<10}{'peak extra MiB':>16}{'loss':>12}")
    print(f"{'unfused':<10}{r['unfused_extra_mib']:>16.1f}{r['loss_unfused']:>12.5f}")
    print(f"{'fused':<10}{r['fused_extra_mib']:>16.1f}{r['loss_fused']:>12.5f}")
    print(f"fused / unfused extra memory: {r['ratio']:.1%}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
