"""Generate the small synthetic datasets the tiny recipes ship with (``python recipes/tiny_data.py``).

``data/tiny/sft.jsonl``: prompt/completion pairs that ask to reverse, upper-case or repeat a short word —
patterns a 2-layer byte-level model learns within a minute on a laptop CPU, so loss visibly falls.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "cat dog fish bird tree leaf rock sand wind rain snow star moon sun lake river hill road door lamp book "
    "pen cup milk bread salt gold iron wood silk wool rose mint plum pear kiwi lime corn rice bean"
).split()


def sft_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = rng.choice(WORDS)
        task = rng.choice(["reverse", "upper", "twice"])
        answer = {"reverse": word[::-1], "upper": word.upper(), "twice": f"{word} {word}"}[task]
        rows.append({"prompt": f"{task}: {word}\n", "completion": answer})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent / "data" / "tiny"
    write_jsonl(sft_rows(512, seed=0), root / "sft.jsonl")
    print(f"wrote {root / 'sft.jsonl'}")
