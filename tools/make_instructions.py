"""An instruction set with exact answers, made offline: `train.jsonl` and `heldout.jsonl` of chat records
for `pretrain data sft`, to fine-tune a small released model and measure what it learned.

    python tools/make_instructions.py --out data/instructions [--n-train 2000 --n-heldout 200 --seed 0]

Tasks (answers are a few tokens, checked by exact match after `normalise`):
- add: "What is 47 + 385?" -> "432" (two numbers of 2 or 3 digits);
- reverse: "Reverse the word: planet" -> "tenalp";
- spell: "Spell out the letters of planet, separated by dashes." -> "p-l-a-n-e-t".
A 135M instruct model answers these in sentences and often wrongly; the answers' form is fixed and short
and the skills are per-letter or per-digit, which a small model fine-tuned for minutes can pick up.

Held-out questions are disjoint from training ones: other number pairs, and words that no training
question uses, so the held-out score measures the skill, not recall of the training set. Each record
carries its `task` and `answer` beside the `messages` (the writer reads only the messages).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

# Common English words of 4-8 letters (no proper nouns), the pool of the word tasks.
WORDS = """
able about above absent accept across action active actor adapt admit adult advice afraid after again agent
agree ahead alarm album alert alive allow almost alone along amount angle angry animal answer anyway appear
apple argue arrive artist asleep attach attack author autumn avoid awake award badge baker balance bamboo
banana basket battle beach beauty become before begin behind belief below bench beyond bicycle blanket blossom
border bottle bottom branch brave bread breeze bridge bright broken bronze brother bubble bucket budget button
cabin cable camera candle canvas carbon carpet carrot castle casual cattle celery cement center chair chance
change chapter charge cheese cherry chicken choice circle citizen clever climate clock closet cloud coach
coffee collar color comfort common cookie copper corner cotton county couple course cousin cover crayon cream
credit crisp crowd crystal culture curtain cushion custom dance danger debate decade decide degree delay
demand desert design detail device diamond dinner direct doctor dollar dragon drawer dream dress driver
eager early earth easily editor effort eight elbow eleven empty energy engine enough entire equal escape
evening event exact example expert fabric factor family famous farmer father feather fellow fence fever
field figure finger finish flavor flight flower follow forest forget fortune frame freedom friend frozen
future galaxy garden garlic gather gentle giant ginger glass global glove golden gossip grain grape gravity
guitar habit hammer handle happen harbor harvest hazard health heart heavy helmet hidden history hobby
holiday honest honey horizon hunger hunter island jacket jelly jersey jewel journey jungle junior kettle
kitchen kitten ladder language laptop laugh lawyer leader leather lemon lesson letter level library light
liquid listen little lizard lobster local lonely lucky lumber magic magnet manner marble market master
meadow measure medal melody member memory method middle minute mirror mister modern moment monkey morning
mother motion mountain muffin muscle museum music napkin narrow nation nature needle nephew nickel noble
normal notice number object ocean office orange orchard output oxygen paddle palace paper parent parrot
pasta peanut pencil people pepper period person pillow pirate planet plastic pocket poetry potato powder
prayer pretty prince prison profit public puzzle rabbit radio rapid rather reason record region remote
repeat report rescue result return ribbon riddle river rocket rubber saddle safety salad salmon sample
sandal school science season second secret select sender shadow shelter shower signal silver simple singer
sister sketch smooth soccer socket soldier spider spirit spoon spring square stable statue sticker stomach
stone storm story stream street strong studio sugar summer sunset supper surface sweater symbol system
table tablet talent target teacher temple tennis thirty thread throat ticket tiger timber tissue toast
tomato tongue tower travel treaty tunnel turtle twelve uncle unique unlock update useful valley velvet
victory village violin visit vision volume voyage wagon walnut wander warmth weapon weather wedding weekend
welcome whisper window winter wisdom wizard wonder wooden worker writer yellow yogurt zebra
""".split()


def normalise(text: str) -> str:
    """The comparable form of an answer: lower case, no surrounding space, quotes or final full stop."""
    return re.sub(r"[\s\"'`.]+$", "", text.strip().lower()).strip("\"'` ")


def exact_match(answer: str, expected: str) -> bool:
    return normalise(answer) == normalise(expected)


def _record(task: str, question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "task": task, "answer": answer}


def _add(pairs: list[tuple[int, int]]) -> list[dict]:
    return [_record("add", f"What is {a} + {b}?", str(a + b)) for a, b in pairs]


def _reverse(words: list[str]) -> list[dict]:
    return [_record("reverse", f"Reverse the word: {w}", w[::-1]) for w in words]


def _spell(words: list[str]) -> list[dict]:
    return [_record("spell", f"Spell out the letters of {w}, separated by dashes.", "-".join(w)) for w in words]


def make(n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Half additions, a quarter each of reversals and spellings, shuffled; held-out disjoint."""
    rng = random.Random(seed)
    words = sorted(set(WORDS))
    rng.shuffle(words)
    # Enough held-out words that no held-out question repeats (each word once per word task), and at
    # least the held-out share of the pool.
    per_task = -(-(n_heldout - n_heldout // 2) // 2)
    n_word_out = max(per_task, round(len(words) * n_heldout / (n_train + n_heldout)))
    if n_word_out >= len(words):
        raise SystemExit(f"--n-heldout {n_heldout}: needs {n_word_out} held-out words of {len(words)}")
    word_out, word_in = words[:n_word_out], words[n_word_out:]
    pairs: set[tuple[int, int]] = set()
    n_add = (n_train + n_heldout) // 2
    while len(pairs) < n_add:  # operands of 2 or 3 digits, each equally likely (a quarter are 2 + 2)
        a, b = (rng.randint(10, 99) if rng.random() < 0.5 else rng.randint(100, 999) for _ in range(2))
        if (b, a) not in pairs:
            pairs.add((a, b))
    pairs_list = sorted(pairs)
    rng.shuffle(pairs_list)

    def split(n: int, pool_pairs, pool_words) -> list[dict]:
        n_add = n // 2
        n_rev = (n - n_add) // 2
        n_spell = n - n_add - n_rev
        recs = (_add(pool_pairs[:n_add]) + _reverse(_draw(rng, pool_words, n_rev))
                + _spell(_draw(rng, pool_words, n_spell)))
        rng.shuffle(recs)
        return recs

    heldout_add = n_heldout // 2
    heldout = split(n_heldout, pairs_list[:heldout_add], word_out)
    train = split(n_train, pairs_list[heldout_add:], word_in)
    return train, heldout


def _draw(rng: random.Random, pool: list[str], n: int) -> list[str]:
    """n words of the pool: each once before any repeats (a pool smaller than n is cycled)."""
    out: list[str] = []
    while len(out) < n:
        chunk = list(pool)
        rng.shuffle(chunk)
        out += chunk[: n - len(out)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for train.jsonl and heldout.jsonl")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-heldout", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.n_train < 4 or args.n_heldout < 4:
        ap.error("--n-train and --n-heldout must be at least 4 (one question of each task)")
    train, heldout = make(args.n_train, args.n_heldout, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, recs in (("train", train), ("heldout", heldout)):
        (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        counts = {t: sum(r["task"] == t for r in recs) for t in ("add", "reverse", "spell")}
        print(f"{args.out / name}.jsonl: {len(recs)} records ({', '.join(f'{k} {v}' for k, v in counts.items())})")


if __name__ == "__main__":
    main()
