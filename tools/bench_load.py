"""Benchmark: peak resident memory per rank while a released checkpoint loads into ZeRO-3 partitions.

Writes a Llama-shaped Hugging Face checkpoint of random weights (default: Llama-3.2-1B's shape, 1.24B
parameters, tied embeddings) with `pretrain.hub.hf_write`, then starts `--workers` gloo processes that
each run the trainer's own `build_model` (zero.Init construction, tensors streamed into the partitions) and
report their peak resident set size (VmHWM) before and after, against the fp32 size of the whole model.
Prints a table and writes JSON.

    .venv/bin/python tools/bench_load.py [--workers 2] [--layers 16] [--out bench-out/bench_load.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _model_section(args) -> dict:
    return {"type": "llama", "n_layers": args.layers, "d_model": 2048, "n_heads": 32, "n_kv_heads": 8, "d_ff": 8192,
            "vocab_size": 128256, "max_seq_len": 2048, "rope_theta": 500000.0, "tie_embeddings": True,
            "kernels": "reference"}


def _write_checkpoint(out: Path, section: dict) -> int:
    from pretrain.config import typed_section
    from pretrain.hub import write_hf
    from pretrain.models import get_family

    cfg = typed_section("model", section)
    with torch.device("meta"):
        shapes = [(n, tuple(p.shape)) for n, p in get_family("llama").build(cfg).named_parameters()]

    def tensors():
        g = torch.Generator().manual_seed(0)
        for name, shape in shapes:
            yield name, (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    write_hf(out, cfg, tensors(), max_shard_bytes=1e9)
    return sum(torch.Size(s).numel() for _, s in shapes)


def _rss_mb() -> float:
    """Peak resident set of this process so far (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _worker(rank: int, world: int, port: int, ckpt: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from pretrain.hub.sources import resolve
    from pretrain.load import config_from_dict
    from pretrain.train.build import build_model

    cfg = resolve(config_from_dict({
        "data": {"train": "unused"}, "init": {"path": ckpt}, "train": {"micro_batch_size": 1, "global_batch_size": world},
        "zero": {"stage": 3}, "cluster": {"workers": world}, "model": {"kernels": "reference"}}))
    import deepspeed  # noqa: F401  (imported before the baseline: its import is not the load)

    dist.barrier()
    before = _rss_mb()
    t0 = time.time()
    model, counts = build_model(cfg, torch.device("cpu"))
    dist.barrier()
    held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters()) / 2**20
    queue.put({"rank": rank, "rss_before_mb": before, "rss_peak_mb": _rss_mb(), "partition_mb": held,
               "load_s": time.time() - t0, "params": counts["params"]})
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--out", default="bench-out/bench_load.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "llama-1b"
        t0 = time.time()
        n = _write_checkpoint(ckpt, _model_section(args))
        print(f"wrote {n / 1e9:.2f}B parameters (bf16) in {time.time() - t0:.0f}s")
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        port = 29600 + os.getpid() % 300
        procs = [ctx.Process(target=_worker, args=(r, args.workers, port, str(ckpt), queue)) for r in range(args.workers)]
        for p in procs:
            p.start()
        rows = sorted((queue.get(timeout=1800) for _ in procs), key=lambda r: r["rank"])
        for p in procs:
            p.join()
    fp32_mb = n * 4 / 2**20
    print(f"\nfp32 model: {fp32_mb:,.0f} MB; {args.workers} ranks, ZeRO-3")
    print(f"{'rank':>4}{'RSS before':>12}{'peak RSS':>10}{'peak/fp32':>11}{'added/fp32':>12}{'partition':>11}{'load':>7}")
    for r in rows:
        r["peak_over_fp32"] = r["rss_peak_mb"] / fp32_mb
        r["added_over_fp32"] = (r["rss_peak_mb"] - r["rss_before_mb"]) / fp32_mb
        print(f"{r['rank']:>4}{r['rss_before_mb']:>10,.0f}MB{r['rss_peak_mb']:>8,.0f}MB{r['peak_over_fp32']:>10.2f}x"
              f"{r['added_over_fp32']:>11.2f}x{r['partition_mb']:>9,.0f}MB{r['load_s']:>6.0f}s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"params": n, "fp32_mb": fp32_mb, "workers": args.workers, "ranks": rows},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
