"""Benchmark: checkpoint save time, the training stall it causes, and resume time, on a local location and on
an S3 store (by default moto's server on the loopback address, started here; or a real bucket through
`--s3 s3://bucket/prefix` and the AWS_* variables), each the way saves were made before host copies and after.

`--workers` gloo processes train a Llama-shaped model (default about 110M parameters: 12 layers, d_model 768,
vocabulary 32000, tied embeddings) under ZeRO-2 on random tokens with the trainer's own engine and its
checkpointer (`pretrain.train.checkpoint`), in two ways (`--modes`):

- before: `Checkpointer(host_copy=False)`, DeepSpeed writes its files in the training thread, a background
  thread moves them to the location;
- after: `Checkpointer(host_copy=True)`, the default: the training thread copies the states to host memory,
  the background thread writes the files and moves them.

Per location, way and save it measures:

- held: the time `save` holds the training thread (local_write_s: without host copies DeepSpeed's files, with
  them the copy, copy_s of it; the small files either way);
- stall: held plus how much slower the steps run while the background thread works, against the steps
  between saves without one;
- save: the time from `save` to the checkpoint's COMPLETE marker (rank 0's held, then its thread's write and
  upload, which ends with the wait for every rank's files and the marker);
- resume: rank 0's decision, the download of what each rank reads (object store), and DeepSpeed's load.

Prints a table and writes JSON. Timings on a shared machine are inflated by whatever else runs there.

    .venv/bin/python tools/bench_ckpt.py [--workers 2] [--layers 12] [--d-model 768] [--saves 3]
    .venv/bin/python tools/bench_ckpt.py --layers 2 --d-model 128 --vocab 1024 --saves 2   # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue as queue_mod
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(args, world: int):
    from pretrain.load import config_from_dict

    heads = max(1, args.d_model // 64)
    return config_from_dict({
        "data": {"train": "unused"}, "cluster": {"workers": world}, "zero": {"stage": args.zero},
        "train": {"micro_batch_size": 1, "global_batch_size": world}, "schedule": {"warmup_steps": 1},
        "model": {"type": "llama", "n_layers": args.layers, "d_model": args.d_model, "n_heads": heads,
                  "n_kv_heads": heads, "d_ff": args.d_model * 8 // 3 // 64 * 64 or 64, "vocab_size": args.vocab,
                  "max_seq_len": args.seq_len, "tie_embeddings": True, "kernels": "reference"},
    })


def _step(engine, args) -> float:
    t0 = time.perf_counter()
    ids = torch.randint(0, args.vocab, (1, args.seq_len + 1))
    loss = engine(ids[:, :-1], targets=ids[:, 1:]) / args.seq_len
    engine.backward(loss)
    engine.step()
    dist.barrier()
    return time.perf_counter() - t0


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([float(flag)])
    dist.all_reduce(t)
    return bool(t.item())


def _worker(rank: int, world: int, port: int, args, locations: dict[str, str], run_dir: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from pretrain.train import checkpoint as ckpt
    from pretrain.train.build import build_model
    from pretrain.train.engine import build_engine
    from pretrain.train.storage import Storage

    cfg = _config(args, world)
    torch.manual_seed(0)
    model, counts = build_model(cfg, torch.device("cpu"))
    engine = build_engine(cfg, model, world)
    for _ in range(2):  # warm-up: allocator, optimizer states
        _step(engine, args)
    if rank == 0:
        queue.put(("params", counts["params"]))
    step = 0
    for kind, url in locations.items():
        for mode in args.modes.split(","):
            store = Storage(f"{url}/{mode}")
            staging = Path(run_dir) / kind / mode / ".staging" / f"rank-{rank}"
            saver = ckpt.Checkpointer(store, staging, rank, world, keep=2, host_copy=mode == "after")
            base = statistics.median(_step(engine, args) for _ in range(args.between))
            saves = []
            for _ in range(args.saves):
                step += 1
                t0 = time.perf_counter()
                saver.save(engine, step, {"step": step, "units": 0, "data": {}})
                held = time.perf_counter() - t0
                during = []
                while _any_rank(saver.uploading) or len(during) < args.between:  # the same steps on every rank
                    during.append(_step(engine, args))
                saver.wait()
                dist.barrier()
                slow = sum(max(0.0, d - base) for d in during)
                st = saver.stats
                saves.append({"step": step, "held_s": held, "slowdown_s": slow, "stall_s": held + slow,
                              "local_write_s": st["local_write_s"], "copy_s": st["copy_s"], "write_s": st["write_s"],
                              "upload_s": st["upload_s"], "save_s": held + st["write_s"] + st["upload_s"],
                              "steps_during": len(during)})
            saver.close()
            dist.barrier()
            t0 = time.perf_counter()
            plan = ckpt.decide(store, None, rank, world)
            with ckpt.opened(plan, staging, rank) as (step_dir, universal_dir):
                ckpt.load(engine, step_dir, rank, universal_dir)
            dist.barrier()
            resume = time.perf_counter() - t0
            size = sum(json.loads(store.read_text(f"step-{plan.step}/COMPLETE"))["files"].values())
            if rank == 0:  # each run as it ends: a later one that fails loses only itself
                queue.put((f"{kind}/{mode}", {"base_step_s": base, "saves": saves, "resume_s": resume,
                                              "checkpoint_bytes": size}))
    dist.destroy_process_group()


def _start_moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return proc, endpoint
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--saves", type=int, default=3, help="saves per location")
    ap.add_argument("--between", type=int, default=3, help="steps measured between saves (at least)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--modes", default="before,after", help="comma-separated: before (host_copy=False), after")
    ap.add_argument("--locations", default="local,s3", help="comma-separated: local, s3")
    ap.add_argument("--s3", default=None, help="s3://bucket/prefix to use instead of a loopback moto server")
    ap.add_argument("--out", default="bench-out/bench_ckpt.json")
    args = ap.parse_args()
    moto = None
    with tempfile.TemporaryDirectory() as tmp:
        s3 = args.s3
        wanted = args.locations.split(",")
        if s3 is None and "s3" in wanted:
            moto, endpoint = _start_moto()
            os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                              AWS_DEFAULT_REGION="us-east-1")
            import boto3

            boto3.client("s3").create_bucket(Bucket="bench")
            s3 = "s3://bench/prefix"
        locations = {"local": str(Path(tmp) / "loc" / "bench" / "checkpoints"),
                     "s3": f"{(s3 or '').rstrip('/')}/bench/checkpoints"}
        locations = {k: v for k, v in locations.items() if k in wanted}
        try:
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            port = _free_port()
            procs = [ctx.Process(target=_worker, args=(r, args.workers, port, args, locations, tmp, queue))
                     for r in range(args.workers)]
            for p in procs:
                p.start()
            out: dict = {"params": 0, "results": {}}
            while any(p.is_alive() for p in procs) or not queue.empty():
                with contextlib.suppress(queue_mod.Empty):
                    key, value = queue.get(timeout=5)
                    if key == "params":
                        out["params"] = value
                    else:
                        out["results"][key] = value
            for p in procs:
                p.join()
            out["failed"] = [p.exitcode for p in procs if p.exitcode]
        finally:
            if moto is not None:
                moto.terminate()
                moto.wait(timeout=10)
    print(f"\n{out['params'] / 1e6:.0f}M parameters, {args.workers} workers, ZeRO-{args.zero}, "
          f"{'loopback moto' if args.s3 is None else args.s3}")
    print(f"{'location':<16}{'ckpt MB':>9}{'step s':>8}{'held s':>8}{'copy s':>8}{'write s':>9}{'upload s':>10}"
          f"{'save s':>8}{'stall s':>9}{'resume s':>10}")
    for kind, r in out["results"].items():
        def med(key, saves=r["saves"]):
            return statistics.median(s[key] for s in saves)

        print(f"{kind:<16}{r['checkpoint_bytes'] / 2**20:>9,.0f}{r['base_step_s']:>8.2f}{med('held_s'):>8.2f}"
              f"{med('copy_s'):>8.2f}{med('write_s'):>9.2f}{med('upload_s'):>10.2f}{med('save_s'):>8.2f}"
              f"{med('stall_s'):>9.2f}{r['resume_s']:>10.2f}")
    if out["failed"]:
        print(f"a worker failed (exit codes {out['failed']}): the runs above are those that ended")
    print("(rank 0, medians over the saves; held: the save call; stall: held plus the steps' slowdown while the "
          "background thread runs; save: to the COMPLETE marker)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), **out}, indent=2) + "\n")


if __name__ == "__main__":
    main()
