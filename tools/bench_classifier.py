"""Benchmark the image-quality judge: train it on all 60,000 Fashion-MNIST training images and print its
test accuracy, the time it took, and reference scores that say what an FD value means on this judge.

    .venv/bin/python tools/bench_classifier.py [--data DIR] [--epochs 2] [--threads N]
                                               [--out bench-out/bench_classifier.json]

DIR holds `train/` and `val/` image shards (`pretrain data images fashion-mnist --out DIR`); without it they
are written from Debian's files (apt-get install dataset-fashion-mnist) into a temporary directory. The judge
is trained into a fresh temporary cache, so the figures are always of a training run, never of a cache hit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.metrics.image_quality import Judge, load_image_arrays  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="directory with train/ and val/ image shards")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        row: dict = {"threads": args.threads or torch.get_num_threads(), "epochs": args.epochs}
        if data is None:
            from pretrain.data.write_images import write_images

            t = time.perf_counter()
            write_images("fashion-mnist", out=Path(tmp) / "data")
            row["write_shards_s"] = time.perf_counter() - t
            data = Path(tmp) / "data"
        t = time.perf_counter()
        x, y, _ = load_image_arrays(data / "train")
        xt, yt, _ = load_image_arrays(data / "val")
        row["read_arrays_s"] = time.perf_counter() - t
        t = time.perf_counter()
        judge = Judge.load_or_train(Path(tmp) / "cache", data / "train", data / "val",
                                    epochs=args.epochs, threads=args.threads)
        row["load_or_train_s"] = time.perf_counter() - t  # reads the shards again, trains, test stats, saves
        row["train_s"] = row["load_or_train_s"] - row["read_arrays_s"]  # about: the read is timed above
        row["test_accuracy"] = judge.test_accuracy
        # Reference points: real training images (another sample of the same distribution), the test set
        # itself, and uniform noise.
        noise = np.random.default_rng(0).integers(0, 256, (len(xt),) + xt.shape[1:], dtype=np.uint8)
        row["score_train_10k"] = judge.score(x[:10_000], y[:10_000])
        row["score_test"] = judge.score(xt, yt)
        row["score_noise"] = judge.score(noise, yt)
    print(f"{'threads':>8} {'epochs':>6} {'read s':>7} {'train s':>8} {'test acc':>9} "
          f"{'FD train10k':>12} {'FD test':>8} {'FD noise':>9}")
    print(f"{row['threads']:>8} {row['epochs']:>6} {row['read_arrays_s']:>7.1f} {row['train_s']:>8.1f} "
          f"{row['test_accuracy']:>9.2%} {row['score_train_10k']['fd']:>12.3f} "
          f"{row['score_test']['fd']:>8.2e} {row['score_noise']['fd']:>9.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
