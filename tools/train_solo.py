"""Train a config in this process on one device (a GPU when torch sees one, else the CPU), without Ray or W&B.

The same training loop `pretrain train` runs in each Ray Train worker (`pretrain.train.loop.train`), here on a
process group of one: NCCL on a GPU, gloo on the CPU. For machines that have torch and the Triton kernels but
not Ray (tools/gpu_check.sh on a lent GPU, which carries only small wheels), and for `tools/bench_train.py
--in-process`, which separates the loop's per-step cost from the worker process around it. The run takes its
directory's lock as `pretrain train` does; W&B is off whatever the config says.

    python tools/train_solo.py configs/gpt2-124m.yaml train.steps=50 run.dir=/tmp/runs
"""

from __future__ import annotations

import os
import socket
import sys
import time

import torch
import torch.distributed as dist


def one_rank_group() -> None:
    """A process group of this process alone on a free loopback port: NCCL when torch sees a GPU, else gloo."""
    if dist.is_initialized():
        return
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():  # DeepSpeed reads these
        os.environ.setdefault(k, v)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    from pretrain.errors import RunError
    from pretrain.launch.storelock import run_locks
    from pretrain.load import load_config
    from pretrain.train.loop import train

    started = time.time()
    try:
        cfg = load_config(argv[0], [*argv[1:], "cluster.workers=1", "log.wandb=false"])
        if cfg.init.path:
            from pretrain.hub.sources import resolve

            cfg = resolve(cfg)
        one_rank_group()
        with run_locks(cfg) as owner:
            train(cfg, started_at=started, owner=owner.to_dict())
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
