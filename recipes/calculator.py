"""The calculator task: multi-digit multiplication, which a tiny model cannot do in its head but can do with a tool.

Pieces the recipes point at:
- ``exact_match`` — the PPO / env-rollout reward: 1 if the submitted answer is the product, else 0.
- ``python recipes/calculator.py data`` — writes the datasets under ``data/calculator/``:
  ``prompts.jsonl`` (PPO prompts), ``eval.jsonl`` (held-out prompts) and ``sft_episodes.jsonl`` (synthetic episodes
  in the ``segments`` format: half call the calculator, half answer from "memory" — the fine-tuned model starts
  out using the tool about half the time, and RL has to discover that the tool pays).
- ``python recipes/calculator.py demo [--out DIR]`` — the whole offline demo: SFT, evaluation, PPO through the
  environment, evaluation again, a PNG plot of reward and tool-use rate per PPO step.

An episode, in the tag protocol:

    Q: 347*29=?\\n                                  (prompt)
    <request><Calculator>347*29<call>               (model)
    10063<response>                                 (tool: the environment writes this)
    10063<submit>                                   (model)
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "calculator"


def problem(rng: random.Random) -> tuple[int, int]:
    return rng.randint(100, 999), rng.randint(10, 99)


def prompt_text(a: int, b: int) -> str:
    return f"Q: {a}*{b}=?\n"


def prompt_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = problem(rng)
        rows.append({"prompt": prompt_text(a, b), "answer": str(a * b)})
    return rows


def memory_answer(a: int, b: int, rng: random.Random) -> str:
    """What answering from memory looks like: the magnitude and leading digits right, the rest guessed.

    Writing the exact product here would teach the model to *compute* the low digits from the question, and it
    then mixes that half-learned arithmetic into copying the tool's output; with guessed low digits, copying is
    the only consistent way to get them."""
    digits = list(str(a * b))
    for i in range(2, len(digits)):
        digits[i] = str(rng.randint(0, 9))
    return "".join(digits)


def sft_rows(n: int, seed: int, tool_fraction: float = 0.5) -> list[dict]:
    """Synthetic episodes: a ``tool_fraction`` of them call the calculator and copy its result; the others
    answer from memory (approximately right, see ``memory_answer``)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = problem(rng)
        product = str(a * b)
        segments = [{"source": "prompt", "text": prompt_text(a, b)}]
        if rng.random() < tool_fraction:
            segments += [
                {"source": "model", "text": f"<request><Calculator>{a}*{b}<call>"},
                {"source": "tool", "text": f"{product}<response>"},
                {"source": "model", "text": f"{product}<submit>"},
            ]
        else:
            segments.append({"source": "model", "text": f"{memory_answer(a, b, rng)}<submit>"})
        rows.append({"segments": segments})
    return rows


def exact_match(answers: list[str], rows: list[dict]) -> list[float]:
    """1.0 when the submitted answer is exactly the product."""
    return [float(a.strip() == str(r["answer"])) for a, r in zip(answers, rows)]


def write_data() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    for name, rows in (("prompts.jsonl", prompt_rows(2000, seed=1)), ("eval.jsonl", prompt_rows(200, seed=2)),
                       ("sft_episodes.jsonl", sft_rows(4000, seed=3))):
        (DATA / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {DATA / name} ({len(rows)} rows)")


# --- the demo -----------------------------------------------------------------------------------------------------


def _evaluate(folder, model_dir: Path, out: Path) -> dict:
    folder.rlcli("env-rollout", "configs/calculator_eval.yaml", f"model.name_or_path={model_dir}", f"output_dir={out}")
    return json.loads((out / "summary.json").read_text())


def plot(metrics_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "reward_mean" in r]  # (step 0 holds only the held-out evaluation)
    held_out = [r for r in rows if "eval/reward_mean" in r]
    steps = [r["step"] for r in train]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["reward_mean"] for r in train], label="reward (exact match)", color="tab:green")
    ax.plot(steps, [r.get("tool_use_rate", 0.0) for r in train], label="tool-use rate", color="tab:blue")
    if held_out:
        ax.plot([r["step"] for r in held_out], [r["eval/reward_mean"] for r in held_out], marker="o",
                label="held-out exact match", color="tab:orange")
    ax.set_xlabel("PPO step")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Calculator demo: PPO through the text environment")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def demo(out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    from _demo import take_out_dir  # recipes/_demo.py (this folder is on sys.path when run as a script)

    with take_out_dir(out, script="calculator.py demo", runs=frozenset({"sft", "eval-sft", "ppo", "eval-ppo"}),
                      files=frozenset({"ppo_curve.png", "demo_summary.json"})) as folder:
        folder.rlcli("sft", "configs/calculator_sft.yaml", f"output_dir={out / 'sft'}")
        before = _evaluate(folder, out / "sft", out / "eval-sft")
        folder.rlcli("ppo", "configs/calculator.yaml", f"model.name_or_path={out / 'sft'}", f"output_dir={out / 'ppo'}")
        after = _evaluate(folder, out / "ppo", out / "eval-ppo")
        plot(out / "ppo" / "metrics.jsonl", out / "ppo_curve.png")
        (out / "demo_summary.json").write_text(json.dumps({"after_sft": before, "after_ppo": after}, indent=2))

    table = Table(title="Calculator demo: 200 held-out problems (sampled at temperature 0.7, as in training)",
                  header_style="bold")
    table.add_column("")
    table.add_column("after SFT", justify="right")
    table.add_column("after PPO", justify="right")
    table.add_row("exact-match accuracy", f"{before['reward_mean']:.1%}", f"{after['reward_mean']:.1%}")
    table.add_row("tool-use rate", f"{before['tool_use_rate']:.1%}", f"{after['tool_use_rate']:.1%}")
    table.add_row("tool calls per episode", f"{before['tool_calls_per_episode']:.2f}",
                  f"{after['tool_calls_per_episode']:.2f}")
    console.print(table)
    best = out / "ppo" / "best" / "best.json"
    if best.exists():  # eval.keep_best: the policy of the best held-out evaluation during PPO
        info = json.loads(best.read_text())
        console.print(f"best held-out evaluation during PPO: {info['metric']} {info['value']:.1%} at step "
                      f"{info['step']} (policy in {best.parent})")
    console.print(f"plot: {out / 'ppo_curve.png'}; runs: {out}/sft, {out}/ppo; episodes: {out}/eval-*/episodes.jsonl")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("data", help="write data/calculator/*.jsonl")
    d = sub.add_parser("demo", help="run the whole offline demo")
    d.add_argument("--out", default="runs/calculator",
                   help="run directory (an earlier demo's is replaced; one holding other files is refused)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "data":
        write_data()
    else:
        demo(ROOT / args.out if not os.path.isabs(args.out) else Path(args.out))
