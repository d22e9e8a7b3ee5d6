"""Synthetic preference pairs for the tiny reward-model recipe (``python recipes/preferences.py``).

Writes ``data/tiny/rm.jsonl``. Each prompt asks to sort a few distinct digits; the chosen response is the sorted
list, the rejected one a plausible mistake of one of two kinds:

- ``swap``: two neighbours exchanged (``1 4 3 7`` for ``1 3 4 7``): telling it apart means checking the order;
- ``replace``: one digit replaced by a digit absent from the prompt, order kept (``1 3 5 7``): telling it apart
  means comparing the response with the prompt.

Neither mistake changes the length or the set of characters used, so no surface feature gives the answer away,
yet a 2-layer byte-level model learns both within a minute on a CPU.
Rows are generated from a fixed seed, so the file is reproducible byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

MISTAKES = ("swap", "replace")


def sort_pair(rng: random.Random) -> dict[str, str]:
    digits = rng.sample(range(10), rng.randint(3, 6))
    answer = sorted(digits)
    wrong = list(answer)
    mistake = rng.choice(MISTAKES)
    if mistake == "swap":
        i = rng.randrange(len(wrong) - 1)
        wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    else:
        i = rng.randrange(len(wrong))
        low = wrong[i - 1] if i > 0 else -1
        high = wrong[i + 1] if i + 1 < len(wrong) else 10
        options = [d for d in range(low + 1, high) if d not in digits]
        if not options:  # no digit fits between the neighbours: swap instead
            i = rng.randrange(len(wrong) - 1)
            wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
        else:
            wrong[i] = rng.choice(options)
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
