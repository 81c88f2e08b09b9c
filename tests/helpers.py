"""Test helpers: small real webdataset shards written with the project's own writer and tokenizer, a chat
tokenizer, logit parity, free ports, gloo ranks in spawned processes, and a local S3 server."""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from typer.testing import CliRunner

WORDS = (
    "the king queen lord lady good night day love death sword crown heart blood fair sweet time "
    "speak come go know make give take tell hear see stand die live fight fly swear keep"
).split()


def write_corpus(dirpath: Path, n_docs: int = 6, words_per_doc: int = 2500, seed: int = 0) -> list[Path]:
    """Deterministic pseudo-English documents: enough structure (a small vocabulary, recurring phrases)
    for a tiny model's loss to fall, cheap to tokenize."""
    rng = random.Random(seed)
    dirpath.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_docs):
        lines = []
        for _ in range(words_per_doc // 10):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(9)).capitalize() + ".")
        f = dirpath / f"doc{i}.txt"
        f.write_text("\n".join(lines) + "\n")
        files.append(f)
    return files


def make_tiny_shards(tmp_path: Path, seq_len: int = 32) -> Path:
    """Write train/ and val/ shards of a small corpus under tmp_path/shards; returns that directory."""
    from pretrain.cli.data import app

    files = write_corpus(tmp_path / "corpus")
    out = tmp_path / "shards"
    result = CliRunner().invoke(
        app, ["text", *map(str, files), "--tokenizer", "gpt2", "--out", str(out), "--seq-len", str(seq_len),
              "--val-fraction", "0.1"],
    )
    assert result.exit_code == 0, result.output
    assert (out / "train" / "index.json").exists() and (out / "val" / "index.json").exists()
    return out


# A chat template with a default system turn, as SmolLM2's has.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_WORDS = "planet river stone cloud garden window answer number letter reverse spell what is the word".split()


def make_chat_tokenizer(d: Path) -> Path:
    """A real chat tokenizer saved with save_pretrained into `d`: byte-level BPE trained with `tokenizers`
    on a tiny text (vocabulary 400), wrapped as a transformers fast tokenizer with CHAT_TEMPLATE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = " ".join(CHAT_WORDS) + " system\nBe brief.\n user\n assistant\n Answer. again 0123456789 + ? :"
    tok.train_from_iterator([text] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(d)
    return d


def released_model(released):
    """Our model of a `pretrain.hub.Released`, on plain-PyTorch kernels, in eval mode."""
    from pretrain.hub import load_weights
    from pretrain.models import get_family

    cfg = released.model_cfg.model_copy(update={"kernels": "reference"})
    model = get_family(cfg.type).build(cfg)
    load_weights(model, released.iter_tensors())
    return model.eval()


def assert_same_logits(ref, got) -> None:
    """Logit parity: max relative difference below 1e-4 and per-position KL below 1e-9 (in float64)."""
    import torch

    ref, got = ref.double(), got.double()
    rel = ((ref - got).abs().max() / ref.abs().max()).item()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).max().item()
    assert rel < 1e-4 and kl < 1e-9, (rel, kl)


def free_port() -> int:
    """A TCP port of the loopback address that was free a moment ago (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo_ranks(fn, *args, rendezvous: Path, world: int = 2, timeout: float = 600,
                   env: dict[str, str] | None = None) -> None:
    """`fn(rank, world, *args)` in `world` spawned processes, each in one gloo group joined through the file
    `rendezvous` (no port to pick) and with a worker's RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE
    (`env` overrides them); the group is destroyed after `fn`. Fails unless every rank exits with 0 within
    `timeout` seconds. `fn` must be importable (a module-level function of a test module)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_gloo_rank, args=(fn, rank, world, str(rendezvous), env or {}, args))
             for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():  # past the timeout: ends the ranks this call started
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * world


def _gloo_rank(fn, rank: int, world: int, rendezvous: str, env: dict[str, str], args: tuple) -> None:
    import os

    import torch.distributed as dist

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), **env})
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        # No rank tears its connections down while a peer's last collective may still be reading from them (a
        # full-suite run saw a rank end in "terminate called without an active exception"; not reproduced alone).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def moto_server(aws_dir: Path) -> Iterator[str]:
    """moto's standalone S3 server on a free loopback port, the standard AWS_* variables pointing every client
    at it while the block runs (no user's ~/.aws config or profile leaks in; `aws_dir` holds the empty
    stand-ins), and s3fs's cached clients dropped on both sides; yields the endpoint URL."""
    import pytest
    from s3fs import S3FileSystem

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    none = aws_dir / "none"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_CONFIG_FILE": str(none), "AWS_SHARED_CREDENTIALS_FILE": str(none)}.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        try:
            deadline = time.time() + 30
            while True:
                try:
                    urllib.request.urlopen(endpoint, timeout=1).close()
                    break
                except OSError:
                    if time.time() > deadline or proc.poll() is not None:
                        raise RuntimeError("moto server did not start") from None
                    time.sleep(0.2)
            # fsspec caches clients by their arguments, not by the environment: one made for another
            # endpoint must not be reused.
            S3FileSystem.clear_instance_cache()
            yield endpoint
        finally:
            S3FileSystem.clear_instance_cache()
            proc.terminate()
            proc.wait(timeout=10)


def make_fashion_shards(root: Path, train: int = 480, test: int = 96) -> Path:
    """Image shards of the first `train` training and `test` test images of Debian's Fashion-MNIST files under
    root/shards (train/ and val/); returns that directory."""
    import gzip

    import pytest

    from pretrain.data.write_images import FASHION_MNIST, read_idx, write_images

    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("needs the Debian package: apt-get install -y dataset-fashion-mnist")
    for split, n in (("train", train), ("t10k", test)):
        for kind in ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz"):
            arr = read_idx(FASHION_MNIST / f"{split}-{kind}")[:n]
            header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
            (root / "idx").mkdir(parents=True, exist_ok=True)
            with gzip.open(root / "idx" / f"{split}-{kind}", "wb") as f:
                f.write(header + arr.tobytes())
    write_images(str(root / "idx"), out=root / "shards", shard_samples=100)
    return root / "shards"
