"""The tiny offline twin of configs/detox.yaml: make a small LM less toxic with PPO against a toxicity classifier.

The workstation recipe follows TRL's detoxification example: GPT-Neo continues prompts of allenai/real-toxicity-prompts
(``prompt.text``, a nested field), and the reward is the ``nothate`` logit of a hate-speech classifier
(facebook/roberta-hate-speech-dynabench-r4-target). The twin keeps every piece, small and built here:

- ``python recipes/detox.py data`` writes ``data/tiny/detox/`` (committed; fixed seeds, so byte for byte the same):
  ``prompts.jsonl``  sentence openings in real-toxicity-prompts' layout: ``{"prompt": {"text", "toxicity"},
                     "challenging"}`` (read with ``data.prompt_field: prompt.text``);
  ``sft.jsonl``      prompt / completion pairs whose completions are insults half of the time: the policy's
                     "pre-training", which leaves it writing toxic continuations about half the time;
  ``classifier.jsonl`` texts labelled ``hate`` / ``nothate`` for the toxicity classifier.
- ``python recipes/detox.py classifier [--out runs/tiny-detox/classifier]`` trains the toxicity classifier: a
  one-layer BERT-shaped sequence classifier with a word-level tokenizer of its own (as the hub classifier has its
  own, not the policy's) and two named outputs, ``nothate`` (0) and ``hate`` (1), like the hub model, so the recipe
  reads it with ``reward.label: nothate`` (a few seconds on a CPU).
- ``python recipes/detox.py evaluate RUN_DIR [--classifier DIR]`` samples a policy on 256 prompts and prints the
  fraction of toxic continuations (those holding an insult from ``TOXIC``) and the classifier's mean ``nothate``
  logit and mean P(hate): the README's before / after figures.

The whole twin (README "Detoxification"), or ``python recipes/detox.py demo`` for all of it and the figures:

    python recipes/detox.py classifier
    rlcli sft configs/tiny/sft.yaml data.path=data/tiny/detox/sft.jsonl output_dir=runs/tiny-detox/sft
    rlcli ppo configs/tiny/detox.yaml
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "tiny" / "detox"
LABELS = ("nothate", "hate")

SUBJECTS = ("he", "she", "my boss", "the cook", "your friend", "that guy")
OPENINGS = ("{s} is", "{s} said i was", "i think {s} is")
TOXIC = ("stupid", "an idiot", "dumb", "ugly", "a loser")
CLEAN = ("kind", "a friend", "smart", "funny", "lovely")
ENDINGS = ("", "", " today")


def opening(rng: random.Random) -> str:
    return rng.choice(OPENINGS).format(s=rng.choice(SUBJECTS))


def continuation(rng: random.Random, toxic: bool) -> str:
    return " " + rng.choice(TOXIC if toxic else CLEAN) + rng.choice(ENDINGS) + "."


def is_toxic(text: str) -> bool:
    """The ground truth of this toy world: a text is toxic when it holds one of the insults."""
    words = text.lower()
    return any(t.split()[-1] in words for t in TOXIC)


def prompt_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = opening(rng)
        rows.append({"filename": f"tiny-{i:04d}.txt", "prompt": {"text": text, "toxicity": round(rng.random(), 3)},
                     "challenging": rng.random() < 0.5})
    return rows


def sft_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": opening(rng), "completion": continuation(rng, toxic=rng.random() < 0.5)} for _ in range(n)]


def classifier_rows(n: int, seed: int) -> list[dict]:
    """Whole sentences and bare continuations (what the reward reads with ``reward.input: response``)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        toxic = rng.random() < 0.5
        text = continuation(rng, toxic)
        text = opening(rng) + text if rng.random() < 0.5 else text.strip()
        rows.append({"text": text, "label": LABELS[int(toxic)]})
    return rows


def write_data() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    for name, rows in (("prompts.jsonl", prompt_rows(500, seed=1)), ("sft.jsonl", sft_rows(1000, seed=2)),
                       ("classifier.jsonl", classifier_rows(1000, seed=3))):
        (DATA / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {DATA / name} ({len(rows)} rows)")


def word_tokenizer(texts: list[str]):
    """A word-level tokenizer over this toy world's words (unknown words -> ``[UNK]``), with ``[CLS]`` in front for
    the classifier to pool: like the hub classifier, the toxicity model has a tokenizer of its own, not the policy's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.BertPreTokenizer()  # words and punctuation
    words = sorted({w for t in texts for w, _ in split.pre_tokenize_str(t.lower())})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = split
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", vocab["[CLS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]")


def train_classifier(out: Path, steps: int = 100, seed: int = 0, lr: float = 3e-3) -> dict[str, float]:
    """A one-layer BERT-shaped sequence classifier with labels nothate / hate over a word-level tokenizer; returns
    its held-out accuracy."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    rows = [json.loads(line) for line in (DATA / "classifier.jsonl").read_text().splitlines()]
    train, held_out = rows[:900], rows[900:]
    tok = word_tokenizer([r["text"] for r in rows])
    config = AutoConfig.for_model("bert", num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, vocab_size=len(tok),
                                  num_labels=2, id2label=dict(enumerate(LABELS)),
                                  label2id={name: i for i, name in enumerate(LABELS)}, pad_token_id=tok.pad_token_id)
    model = AutoModelForSequenceClassification.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def batch(items):
        enc = tok([r["text"] for r in items], padding=True, truncation=True, max_length=64, return_tensors="pt")
        labels = torch.tensor([LABELS.index(r["label"]) for r in items])
        return enc["input_ids"], enc["attention_mask"], labels

    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        input_ids, mask, labels = batch(rng.sample(train, 32))
        loss = torch.nn.functional.cross_entropy(model(input_ids=input_ids, attention_mask=mask).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        input_ids, mask, labels = batch(held_out)
        accuracy = (model(input_ids=input_ids, attention_mask=mask).logits.argmax(-1) == labels).float().mean().item()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"held_out_accuracy": accuracy}


def evaluate(run_dir: str, classifier: str | None, n: int = 256, seed: int = 123) -> dict[str, float]:
    """Toxic fraction of a policy's continuations (temperature 1, 16 tokens), and the classifier's view of them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlcli.models.generation import sample
    from rlcli.padding import left_pad
    from rlcli.rl import SamplingRules

    path = Path(run_dir)
    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    model.eval()
    prompts = [r["prompt"]["text"] for r in prompt_rows(n, seed)]
    ids, mask = left_pad([tok(p)["input_ids"] for p in prompts], tok.pad_token_id)
    eos = (tok.eos_token_id,)
    with torch.no_grad():
        out = sample(model, ids, mask, 16, rules=SamplingRules(temperature=1.0, eos_ids=eos), eos_token_id=eos[0],
                     pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(seed))
    texts = [tok.decode([t for t, m in zip(r, k) if m], skip_special_tokens=True)
             for r, k in zip(out.response_ids.tolist(), out.response_mask.tolist())]
    result = {"toxic_fraction": sum(map(is_toxic, texts)) / n}
    if classifier:
        from rlcli.rewards.reward_model import RewardModelScorer

        nothate = RewardModelScorer.from_pretrained(classifier, label="nothate")(texts)
        hate = RewardModelScorer.from_pretrained(classifier, label="hate")(texts)
        result["nothate_logit"] = float(nothate.mean())
        result["p_hate"] = float(torch.sigmoid(hate - nothate).mean())
    return result


def rlcli(*args: str) -> None:
    print("\n$ rlcli " + " ".join(args), flush=True)
    if subprocess.run([sys.executable, "-m", "rlcli", *args], cwd=ROOT, check=False).returncode:
        sys.exit(1)


def demo(out: str) -> None:
    """Classifier, SFT policy, PPO into OUT/{classifier,sft,ppo}, then the policy before and after PPO."""
    print(json.dumps(train_classifier(ROOT / out / "classifier")))
    rlcli("sft", "configs/tiny/sft.yaml", "data.path=data/tiny/detox/sft.jsonl", f"output_dir={out}/sft",
          "overwrite_output_dir=true")
    rlcli("ppo", "configs/tiny/detox.yaml", f"output_dir={out}/ppo", f"model.name_or_path={out}/sft",
          f"reward.model={out}/classifier", "overwrite_output_dir=true")
    classifier = str(ROOT / out / "classifier")
    before, after = evaluate(str(ROOT / out / "sft"), classifier), evaluate(str(ROOT / out / "ppo"), classifier)
    print("\n256 prompts, 16 tokens at temperature 1    after SFT   after PPO")
    for key, name, fmt in (("toxic_fraction", "toxic continuations", "{:>10.1%}"),
                           ("p_hate", "classifier's mean P(hate)", "{:>10.1%}"),
                           ("nothate_logit", "classifier's mean nothate logit", "{:>10.2f}")):
        print(f"{name:<42}" + fmt.format(before[key]) + "  " + fmt.format(after[key]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("data", help="write data/tiny/detox/*.jsonl")
    c = sub.add_parser("classifier", help="train the tiny toxicity classifier")
    c.add_argument("--out", default="runs/tiny-detox/classifier")
    c.add_argument("--steps", type=int, default=100)
    e = sub.add_parser("evaluate", help="toxic fraction of a policy's continuations")
    e.add_argument("run_dir")
    e.add_argument("--classifier", default="runs/tiny-detox/classifier")
    d = sub.add_parser("demo", help="classifier, SFT, PPO, then the figures before / after PPO")
    d.add_argument("--out", default="runs/tiny-detox")
    args = parser.parse_args()
    if args.command == "data":
        write_data()
    elif args.command == "demo":
        demo(args.out)
    elif args.command == "classifier":
        print(json.dumps(train_classifier(Path(args.out), steps=args.steps)))
    else:
        print(json.dumps(evaluate(args.run_dir, args.classifier)))
