"""Benchmark the data layer: writer tokenization speed, reader throughput with 1, 2 and 4 dataloader
workers beside the raw webdataset read speed of the same tar files (the ceiling), what the decoder's check
of token ids against the vocabulary costs (every shard decoded in memory with and without it), and what one
training step of gpt-tiny and gpt2-124m consumes on this machine. Prints a table and writes JSON.

    .venv/bin/python tools/bench_data.py [--tokens 2000000] [--seq-len 128] [--out bench-out/bench_data.json]
                                         [--model-steps-124m 0]   # skip the slow 124M step

The corpus is generated pseudo-English (tests/helpers.write_corpus), tokenized with GPT-2's BPE.
Reader figures are the best of `--repeats` runs (the machine is shared; the best is the least disturbed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers, when run from anywhere

from pretrain.config import DataConfig  # noqa: E402
from pretrain.data import build_train_stream  # noqa: E402
from pretrain.data.decode import check_ids, decode  # noqa: E402
from pretrain.data.manifest import resolve  # noqa: E402
from pretrain.data.sample_spec import spec_of  # noqa: E402
from pretrain.data.shards import read_shard  # noqa: E402
from pretrain.data.write_text import write_text  # noqa: E402
from pretrain.load import load_config
from tests.helpers import write_corpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bench_writer(corpus: list[str], out: Path, seq_len: int, workers: int) -> dict:
    t = time.perf_counter()
    m = write_text(corpus, tokenizer="gpt2", out=out, seq_len=seq_len, shard_bytes=1 << 20, workers=workers)
    dt = time.perf_counter() - t
    tokens = m["train"]["tokens"] + m["train"]["dropped_tokens"]
    return {"workers": workers, "tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt,
            "tokens_per_s_per_core": tokens / dt / workers, "manifest": m["train"]}


def bench_raw(shard_dir: Path, repeats: int) -> dict:
    """webdataset iterating the tar files, nothing decoded: the most any reader of them can do."""
    m = json.loads((shard_dir / "index.json").read_text())
    urls = [str(shard_dir / s["name"]) for s in m["shards"]]
    best = 0.0
    for _ in range(repeats):
        t, n = time.perf_counter(), 0
        for _sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            n += 1
        best = max(best, n / (time.perf_counter() - t))
    return {"samples_per_s": best, "tokens_per_s": best * m["seq_len"]}


def bench_reader(shard_dir: Path, workers: int, samples: int, micro_batch: int, repeats: int) -> dict:
    """TrainStream samples/s in steady state (the first micro-batch, i.e. worker start-up, excluded)."""
    cfg = DataConfig(train=str(shard_dir), num_workers=workers)
    best, startup = 0.0, 0.0
    for r in range(repeats):
        s = build_train_stream(cfg, seed=r, rank=0, world_size=1, micro_batch_size=micro_batch, grad_accum=1)
        t0 = time.perf_counter()
        next(s)
        t = time.perf_counter()
        for _ in range(samples // micro_batch):
            next(s)
        rate = samples // micro_batch * micro_batch / (time.perf_counter() - t)
        if rate > best:
            best, startup = rate, t - t0
        s.close()
    return {"workers": workers, "samples_per_s": best, "tokens_per_s": best * s.seq_len, "first_batch_s": startup}


def bench_id_check(shard_dir: Path, repeats: int) -> dict:
    """What checking token ids against the manifest's vocab_size adds to decoding, on shards already read
    into memory: the best of `repeats` passes of decoding every shard without the check, and of the check
    alone over the decoded arrays (timed apart: on a shared machine, the noise of two whole decode passes
    is larger than the check)."""
    src = resolve(str(shard_dir), None, "data.train")
    spec, vocab = spec_of(src, "data.train"), int(src.manifest["vocab_size"])
    shards = [(read_shard(u, sha256=e["sha256"], nbytes=e["bytes"], label=u), e["samples"], u)
              for e, u in zip(src.shards, src.urls, strict=True)]
    decoded = [(decode(samples, spec, n, u), u) for samples, n, u in shards]
    t_decode = t_check = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for samples, n, u in shards:
            decode(samples, spec, n, u)
        t_decode = min(t_decode, time.perf_counter() - t)
        t = time.perf_counter()
        for (keys, out), u in decoded:
            check_ids(keys, out["input_ids"], vocab, u)
        t_check = min(t_check, time.perf_counter() - t)
    return {"samples": src.samples, "off_samples_per_s": src.samples / t_decode,
            "on_samples_per_s": src.samples / (t_decode + t_check), "check_s": t_check, "cost": t_check / t_decode}


def bench_model(config: Path, steps: int, threads: int, peak: float) -> dict:
    """Tokens/s one fp32 training step (forward, backward, AdamW) of the model consumes at micro-batch 1,
    measured (0 steps: not measured), and estimated from its FLOPs per token at the measured matmul rate."""
    from pretrain.models import get_family

    cfg = load_config(config)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    family = get_family(cfg.model.type)
    model = family.build(cfg.model.model_copy(update={"kernels": "reference"}))
    seq = cfg.model.max_seq_len
    fpt = family.flops_per_unit(cfg.model, family.count_parameters(model), {"seq_len": seq})
    out = {"config": str(config.relative_to(ROOT)), "seq_len": seq, "micro_batch": 1, "threads": threads,
           "params": sum(p.numel() for p in model.parameters()), "flops_per_token": fpt,
           "estimated_tokens_per_s": peak / fpt, "step_s": None, "tokens_per_s": None}
    if steps == 0:
        return out
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = {"input_ids": torch.randint(0, 50257, (1, seq + 1))}
    times = []
    for _ in range(steps + 1):  # the first step allocates optimizer state: not counted
        t = time.perf_counter()
        ids = batch["input_ids"]
        (model(ids[:, :-1], targets=ids[:, 1:]) / seq).backward()  # the model returns the summed loss
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    best = min(times[1:])
    return out | {"step_s": best, "tokens_per_s": seq / best}


def main() -> None:
    warnings.filterwarnings("ignore", message=".*worker processes in total")  # 4 workers on 2 cores, on purpose
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2_000_000, help="approximate corpus size in tokens")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--epochs", type=float, default=2.0, help="reader: samples consumed, in epochs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model-steps", type=int, default=2, help="timed gpt-tiny steps (0: estimate only)")
    ap.add_argument("--model-steps-124m", type=int, default=1, help="timed gpt2-124m steps (0: estimate only)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=Path("bench-out/bench_data.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # ~1.25 GPT-2 tokens per word of the generated text
        files = write_corpus(tmp / "corpus", n_docs=40, words_per_doc=max(100, int(args.tokens / 1.25 / 40)))
        corpus = [str(f) for f in files]
        print("tokenizing ...", flush=True)
        writer = [bench_writer(corpus, tmp / f"shards-{w}", args.seq_len, w) for w in (1, 2)]
        shard_dir = tmp / "shards-1" / "train"
        n = writer[0]["manifest"]["samples"]
        samples = int(n * args.epochs)
        print(f"{n:,} samples in {len(writer[0]['manifest']['shards'])} shards; reading ...", flush=True)
        raw = bench_raw(shard_dir, args.repeats)
        id_check = bench_id_check(shard_dir, max(args.repeats, 30))
        readers = [bench_reader(shard_dir, w, samples, args.micro_batch, args.repeats) for w in (0, 1, 2, 4)]
    print("training steps ...", flush=True)
    from pretrain.metrics.flops import measured_cpu_peak

    peak = measured_cpu_peak(args.threads)
    models = [bench_model(ROOT / "configs" / c, steps, args.threads, peak)
              for c, steps in (("gpt-tiny.yaml", args.model_steps), ("gpt2-124m.yaml", args.model_steps_124m))]
    # The larger of measured and estimated consumption: the conservative side for the 20x target.
    gpt2 = max(models[1]["tokens_per_s"] or 0, models[1]["estimated_tokens_per_s"])
    for r in readers:
        r["of_raw"] = r["samples_per_s"] / raw["samples_per_s"]
        r["x_gpt2_124m"] = r["tokens_per_s"] / gpt2

    print(f"\nwriter (GPT-2 BPE, {writer[0]['tokens']:,} tokens)")
    for w in writer:
        print(f"  {w['workers']} process(es): {w['tokens_per_s']:>12,.0f} tokens/s  "
              f"({w['tokens_per_s_per_core']:,.0f} per core)")
    print(f"\nreader (seq_len {args.seq_len}, micro-batch {args.micro_batch}, {samples:,} samples)")
    print(f"  {'':<22}{'samples/s':>12}{'tokens/s':>14}{'of raw':>9}{'x gpt2-124m':>13}{'1st batch':>11}")
    print(f"  {'raw webdataset read':<22}{raw['samples_per_s']:>12,.0f}{raw['tokens_per_s']:>14,.0f}{1:>9.0%}"
          f"{raw['tokens_per_s'] / gpt2:>13,.0f}{'':>11}")
    for r in readers:
        label = f"TrainStream, {r['workers']} workers" if r["workers"] else "TrainStream, in-process"
        print(f"  {label:<22}{r['samples_per_s']:>12,.0f}{r['tokens_per_s']:>14,.0f}{r['of_raw']:>9.0%}"
              f"{r['x_gpt2_124m']:>13,.0f}{r['first_batch_s']:>10.2f}s")
    print(f"\ndecode, {id_check['samples']:,} samples in memory: {id_check['off_samples_per_s']:,.0f} samples/s "
          f"without the id check, {id_check['on_samples_per_s']:,.0f} with it (the check: {id_check['cost']:+.1%} time)")
    print(f"\nmodel consumption (fp32 forward + backward + AdamW, micro-batch 1, {args.threads} threads; "
          f"estimate: FLOPs/token at the measured matmul rate {peak / 1e9:.0f} GFLOP/s)")
    for m in models:
        measured = (f"{m['step_s']:>8.2f}s/step {m['tokens_per_s']:>9,.0f} tokens/s" if m["step_s"]
                    else f"{'(not measured)':>34}")
        print(f"  {m['config']:<22}{m['params'] / 1e6:>7.1f}M params  seq {m['seq_len']:>5}  {measured}  "
              f"estimate {m['estimated_tokens_per_s']:>9,.0f} tokens/s")
    print(f"  x gpt2-124m above is against {gpt2:,.0f} tokens/s (the larger of measured and estimate)")
    for w in writer:
        w.pop("manifest")
    result = {"writer": writer, "raw": raw, "id_check": id_check, "readers": readers, "models": models,
              "settings": {**vars(args), "out": str(args.out)}, "cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
