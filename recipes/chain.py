"""The tiny offline twin of the StackExchange chain (SFT -> reward model -> PPO, as in "StackLLaMA").

``python recipes/chain.py`` writes ``data/tiny/chain/stack.jsonl``: forum-style rows with the columns of
``lvwerra/stack-exchange-paired`` (``question``; ``response_j``, the answer voters preferred; ``response_k``, one they
liked less), so ``configs/tiny/chain/*.yaml`` read it with the field names of the workstation recipes
``configs/chain/*.yaml``. A question asks how to do something to something (``how do I sort a list?``); a preferred
answer is helpful (``use sort() on the list.``), a less liked one is not (``google it.``). One more column,
``answer``, holds one of the two at random: what a forum has, helpful or not, and what the twin's SFT stage learns
from, so the SFT model writes both kinds and PPO has something to choose (the workstation SFT uses ``response_j``).

``python recipes/chain.py demo [--out runs/tiny-chain]`` runs the three stages with the shipped recipes and prints the
figures before and after PPO (about 2 minutes on 2 CPU cores).
``python recipes/chain.py evaluate RUN_DIR [--rm RM_DIR]`` samples the policy in RUN_DIR (an SFT model or a PPO
policy adapter) on 256 questions and prints the fraction of helpful answers (a call such as ``sort()``), of answers
that call the question's own verb, and, with RM_DIR, the answers' mean normalised reward-model score: the "before /
after PPO" figures of the README.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "tiny" / "chain" / "stack.jsonl"

VERBS = ["sort", "reverse", "merge", "split", "parse", "copy", "rename", "delete", "count", "print"]
NOUNS = ["list", "file", "string", "table", "array", "dict", "folder", "path", "number", "date"]
HELPFUL = ("use {verb}() on the {noun}.", "try {noun}.{verb}() and read the docs.")
UNHELPFUL = ("google it.", "why would you do that?", "this was asked before.", "you can not {verb} a {noun}.")


def stack_row(rng: random.Random) -> dict[str, str]:
    verb, noun = rng.choice(VERBS), rng.choice(NOUNS)
    good = rng.choice(HELPFUL).format(verb=verb, noun=noun)
    bad = rng.choice(UNHELPFUL).format(verb=verb, noun=noun)
    return {"question": f"how do I {verb} a {noun}?\n", "response_j": good, "response_k": bad,
            "answer": good if rng.random() < 0.5 else bad}


def rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [stack_row(rng) for _ in range(n)]


def helpful(answer: str) -> bool:
    """A helpful answer shows a call (``sort()``); no unhelpful one does."""
    return "()" in answer


def on_topic(question: str, answer: str) -> bool:
    """A helpful answer that calls the question's own verb (``how do I sort ...`` -> ``sort()``)."""
    return f"{question.split()[3]}()" in answer


def evaluate(run_dir: str, rm_dir: str | None = None, n: int = 256, seed: int = 123) -> dict[str, float]:
    """Helpful-answer rate (and mean reward-model score) of a policy's samples, at temperature 1."""
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
    questions = [r["question"] for r in rows(n, seed)]
    ids, mask = left_pad([tok(q)["input_ids"] for q in questions], tok.pad_token_id)
    eos = (tok.eos_token_id,)
    with torch.no_grad():
        out = sample(model, ids, mask, 32, rules=SamplingRules(temperature=1.0, eos_ids=eos), eos_token_id=eos[0],
                     pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(seed))
    answers = [tok.decode([t for t, m in zip(r, k) if m], skip_special_tokens=True)
               for r, k in zip(out.response_ids.tolist(), out.response_mask.tolist())]
    result = {"helpful": sum(helpful(a) for a in answers) / n,
              "on_topic": sum(on_topic(q, a) for q, a in zip(questions, answers)) / n}
    if rm_dir:
        from rlcli.rewards.reward_model import RewardModelScorer

        scorer = RewardModelScorer.from_pretrained(rm_dir, normalize=True)
        result["rm_score"] = float(scorer([q + a for q, a in zip(questions, answers)]).mean())
    return result


def rlcli(*args: str) -> None:
    print("\n$ rlcli " + " ".join(args), flush=True)
    if subprocess.run([sys.executable, "-m", "rlcli", *args], cwd=ROOT, check=False).returncode:
        sys.exit(1)


def demo(out: str) -> None:
    """The three stages into OUT/{sft,rm,ppo}, then the policy before and after PPO."""
    rlcli("sft", "configs/tiny/chain/sft.yaml", f"output_dir={out}/sft", "overwrite_output_dir=true")
    rlcli("rm", "configs/tiny/chain/rm.yaml", f"output_dir={out}/rm", f"model.name_or_path={out}/sft",
          "overwrite_output_dir=true")
    rlcli("ppo", "configs/tiny/chain/ppo.yaml", f"output_dir={out}/ppo", f"model.name_or_path={out}/sft",
          f"reward.adapter={out}/rm", "overwrite_output_dir=true")
    before, after = evaluate(f"{ROOT / out}/sft", f"{ROOT / out}/rm"), evaluate(f"{ROOT / out}/ppo", f"{ROOT / out}/rm")
    print("\n256 questions, sampled at temperature 1      after SFT   after PPO")
    for key, name in (("helpful", "helpful answers"), ("on_topic", "... calling the question's verb"),
                      ("rm_score", "reward-model score (normalised)")):
        fmt = "{:>10.1%}" if key != "rm_score" else "{:>10.2f}"
        print(f"{name:<44}" + fmt.format(before[key]) + "  " + fmt.format(after[key]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    ev = sub.add_parser("evaluate", help="helpful-answer rate and reward-model score of a policy")
    ev.add_argument("run_dir")
    ev.add_argument("--rm", default=None, help="an rlcli rm output dir: also report its mean normalised score")
    d = sub.add_parser("demo", help="the three stages, then the figures before / after PPO")
    d.add_argument("--out", default="runs/tiny-chain")
    args = parser.parse_args()
    if args.command == "evaluate":
        print(json.dumps(evaluate(args.run_dir, args.rm)))
    elif args.command == "demo":
        demo(args.out)
    else:
        DATA.parent.mkdir(parents=True, exist_ok=True)
        DATA.write_text("".join(json.dumps(r) + "\n" for r in rows(1000, seed=7)))
        print(f"wrote {DATA}")
