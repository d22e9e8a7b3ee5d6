"""Synthetic preference pairs for the tiny reward-model recipe (``python recipes/preferences.py``).

Writes ``data/tiny/rm.jsonl``. Each prompt asks to sort three to six distinct digits; the chosen response is the
sorted list, the rejected one a plausible mistake of one of two kinds:

- ``swap``: two neighbours exchanged (``1 4 3 7`` for ``1 3 4 7``): the same characters, the same length, so no
  bag-of-characters feature tells the two apart; the model has to compare each digit with the one before it;
- ``drop``: one digit left out (``1 3 7``): the list is sorted but incomplete.

A 2-layer byte-level model built from scratch learns both to >= 0.95 held-out pairwise accuracy in a few hundred
steps (well under a minute of CPU). The rows come from a fixed seed, so the file is reproducible byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

MISTAKES = ("swap", "drop")


def sort_pair(rng: random.Random) -> dict[str, str]:
    """One row: ``prompt`` (``sort: 7 2 9 4\\n``), ``chosen`` (``2 4 7 9``), ``rejected`` (a mistake)."""
    digits = rng.sample(range(10), rng.randint(3, 6))
    answer = sorted(digits)
    wrong = list(answer)
    if rng.choice(MISTAKES) == "swap":
        i = rng.randrange(len(wrong) - 1)
        wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    else:
        del wrong[rng.randrange(len(wrong))]
    return {
        "prompt": "sort: " + " ".join(map(str, digits)) + "\n",
        "chosen": " ".join(map(str, answer)),
        "rejected": " ".join(map(str, wrong)),
    }


def preference_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [sort_pair(rng) for _ in range(n)]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    target = Path(__file__).resolve().parent.parent / "data" / "tiny" / "rm.jsonl"
    write_jsonl(preference_rows(2000, seed=0), target)
    print(f"wrote {target}")
