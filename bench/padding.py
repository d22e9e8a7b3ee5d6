"""Padding of ``rlcli sft``'s micro-batches on a recipe's data, and how many positions reach the LM head.

    python bench/padding.py                                   # configs/smollm2/sft.yaml, its 30 steps of batch 8
    python bench/padding.py configs/smollm2/sft.yaml --micro 2 4 8

For the recipe's first ``train.max_steps`` global batches (the trainer's seeded index stream) and each micro-batch
size, in the order the trainer used before (the batch as drawn) and now (sorted by length), prints

- **padding**: pad positions / positions of the right-padded micro-batches (what the transformer blocks compute);
- **head positions**: positions whose logits are computed, / positions: all of them before chunking, only target
  tokens (labels != -100) now.

Tokenizes only (no model weights are loaded beyond the tokenizer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", default="configs/smollm2/sft.yaml")
    p.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4, 8])
    a = p.parse_args()

    from rlcli.config.sft import SFTRecipe
    from rlcli.config.loader import read_yaml
    from rlcli.data.sft import IGNORE, tokenize_rows
    from rlcli.data.sources import train_eval_rows
    from rlcli.models.loading import load_tokenizer
    from rlcli.seeds import index_stream

    recipe = SFTRecipe.model_validate(read_yaml(a.recipe)[0])
    tokenizer = load_tokenizer(recipe.model, padding_side="right")
    rows, _ = train_eval_rows(recipe.data, recipe.seed)
    examples = tokenize_rows(rows, recipe.data, tokenizer, recipe.data.path).examples
    bs, steps = recipe.train.batch_size, recipe.train.max_steps or 30
    print(f"{a.recipe}: {len(examples)} examples, batch {bs}, {steps} steps")
    print(f"{'micro':>6s}{'padding before':>16s}{'padding now':>13s}{'head positions before':>23s}{'now':>7s}")
    for micro in a.micro:
        pads = {"before": [0, 0], "now": [0, 0]}
        targets = 0
        for step in range(steps):
            batch = [examples[i] for i in index_stream(len(examples), recipe.seed, step * bs, bs)]
            targets += sum(sum(1 for t in ex["labels"][1:] if t != IGNORE) for ex in batch)
            for key, order in (("before", batch), ("now", sorted(batch, key=lambda ex: len(ex["input_ids"])))):
                for i in range(0, bs, micro):
                    lengths = [len(ex["input_ids"]) for ex in order[i : i + micro]]
                    pads[key][0] += max(lengths) * len(lengths) - sum(lengths)
                    pads[key][1] += max(lengths) * len(lengths)
        frac = {k: v[0] / v[1] for k, v in pads.items()}
        print(f"{micro:6d}{frac['before']:16.3f}{frac['now']:13.3f}{1.0:23.3f}{targets / pads['now'][1]:7.3f}")


if __name__ == "__main__":
    main()
