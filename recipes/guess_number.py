"""Guess the number: a multi-turn game that needs state to win, as a stateful environment.

The environment (``GuessNumber``) hides a number from 1 to 31; the model guesses with its one tool, ``guess``, and
reads ``higher`` / ``lower`` with the numbers still possible (the board, as a game shows it), or ``correct``. Five
tries: binary search always wins (16, then 8 or 24, ...); guessing at random within what the answers still allow
wins about half the time. The class follows TRL's ``environment_factory`` contract (``reset(**row)``, public
methods are tools, ``get_reward()``), plus rlcli's ``done`` attribute: the game ends the episode when it is won or
lost. It runs in TRL unchanged.

Pieces the recipes point at:
- ``GuessNumber`` — ``env.environment: recipes/guess_number.py:GuessNumber`` (the reward is its ``get_reward()``:
  half for the win, half for the share of tries that halved what was left; no ``reward.function`` needed);
- ``python recipes/guess_number.py data`` — writes ``data/guess_number/``: ``prompts.jsonl`` (PPO rows: the prompt
  and the hidden ``target``), ``eval.jsonl`` (every target 4 times) and ``sft_episodes.jsonl`` (demonstrations in
  the ``segments`` format, from a noisy player: half of its guesses are binary search, half random within the
  feedback so far, so the fine-tuned model wins about two games in three and RL has room to find binary search);
- ``python recipes/guess_number.py demo [--out DIR]`` — the offline demo: SFT a tiny model from scratch,
  evaluate, GRPO through the environment, evaluate again; prints success rate and turns per win before and after;
- the same game for a real chat model, SmolLM2-135M-Instruct, through its chat template (``env.protocol: chat``):
  ``data`` also writes ``smollm2_sft.jsonl`` (the same noisy player's games as OpenAI-style conversations: a
  ``guess`` tool call per assistant turn, the environment's answer as the ``tool`` message, the schema rlcli derives
  from ``GuessNumber.guess`` in a ``tools`` column) and ``eval_rounds.jsonl`` (every number once per 31 rows);
  ``python recipes/guess_number.py smollm2 [--out DIR] [--sft-steps N] [--ppo-steps N] [--eval-rows N] [--resume]``
  runs ``configs/smollm2/guess_{sft,eval,ppo}.yaml``: LoRA SFT, evaluate, GRPO, evaluate, with a before/after table
  (games won, turns per win, share of guesses at a middle) and ``pipeline.json``.

An episode, in the tag protocol:

    Guess my number from 1 to 31 in 5 tries.\\n          (prompt)
    <request><guess>16<call>                              (model)
    lower: 1-15<response>                                 (environment: the tool's answer)
    <request><guess>8<call>                               (model)
    correct<response>                                     (environment; it sets done: the episode ends)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "guess_number"
LOW, HIGH, TRIES = 1, 31, 5
WIN_WEIGHT = 0.5  # of the reward; the rest is the share of tries that halved what was left (get_reward)
PROMPT = f"Guess my number from {LOW} to {HIGH} in {TRIES} tries.\n"


def halves(guess: int, low: int, high: int) -> bool:
    """Whether ``guess`` is a middle of ``low..high`` (of two middles, either): the guess whose answer rules out
    the most numbers whatever it is, as binary search guesses."""
    return min(guess - low + 1, high - guess + 1) == (high - low + 2) // 2


class GuessNumber:
    """The game, one instance per episode (TRL's ``environment_factory`` contract)."""

    def reset(self, target: int, max_tries: int = TRIES, **row) -> None:
        self.target = int(target)
        self.tries_left = self.max_tries = int(max_tries)
        self.tries = 0
        self.low, self.high = LOW, HIGH  # what the answers so far still allow: shown with each answer
        self.halved: list[bool] = []  # whether each guess halved what was left, for the reward
        self.won = False
        self.done = False  # rlcli: set when the game is over, the episode ends after this turn's answer

    def guess(self, number: int) -> str:
        """Guess the hidden number; the answer says whether it is higher or lower, with the numbers still
        possible (e.g. ``higher: 17-31``), or correct.

        Args:
            number: your guess, a whole number.
        """
        if self.done:
            return "the game is over"
        try:
            value = int(str(number).strip())
        except ValueError:
            raise ValueError(f"{number!r} is not a whole number") from None
        self.tries += 1
        self.tries_left -= 1
        self.halved.append(halves(value, self.low, self.high))
        if value == self.target:
            self.won = self.done = True
            return "correct"
        if self.target > value:
            self.low = max(self.low, value + 1)
        else:
            self.high = min(self.high, value - 1)
        if self.tries_left <= 0:
            self.done = True
        return f"{'higher' if self.target > value else 'lower'}: {self.low}-{self.high}"

    def get_reward(self) -> float:
        """Half for the win, half for the share of the tries that halved the numbers still possible: 1.0 for a
        game played by binary search (the tries a win leaves unused count as halving), 0.5 plus a little for a
        lucky win, under 0.5 for every loss (binary search never loses, so a lost game halved at most 4 of 5
        tries: a reward of 0.5 or more is exactly a win), and little for a game given up (a try not taken halves
        nothing). The second half scores each guess, not only the outcome: a win alone tells which of five
        guesses were good only across many games, and taught the tiny model slowly (docs/environments.md)."""
        share = (sum(self.halved) + (self.tries_left if self.won else 0)) / self.max_tries
        return WIN_WEIGHT * float(self.won) + (1 - WIN_WEIGHT) * share


# --- data ---------------------------------------------------------------------------------------------------------


def prompt_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": PROMPT, "target": rng.randint(LOW, HIGH)} for _ in range(n)]


def eval_rows(repeats: int = 4) -> list[dict]:
    return [{"prompt": PROMPT, "target": t} for t in range(LOW, HIGH + 1) for _ in range(repeats)]


def moves(target: int, rng: random.Random, random_fraction: float) -> list[tuple[int, str]]:
    """The noisy player's game: ``(guess, answer)`` per try. Each guess is the middle of what the feedback still
    allows, or (``random_fraction`` of the time) a random number in it. Played through ``GuessNumber`` itself, so
    the answers are the environment's."""
    game = GuessNumber()
    game.reset(target=target)
    played = []
    while not game.done:
        lo, hi = game.low, game.high
        g = rng.randint(lo, hi) if rng.random() < random_fraction else (lo + hi) // 2
        played.append((g, game.guess(g)))
    return played


def play(target: int, rng: random.Random, random_fraction: float) -> list[dict]:
    """One demonstration in the tag protocol (``segments``)."""
    segments = [{"source": "prompt", "text": PROMPT}]
    for g, answer in moves(target, rng, random_fraction):
        segments += [{"source": "model", "text": f"<request><guess>{g}<call>"},
                     {"source": "tool", "text": f"{answer}<response>"}]
    return segments


def sft_rows(n: int, seed: int, random_fraction: float = 0.5) -> list[dict]:
    rng = random.Random(seed)
    return [{"segments": play(rng.randint(LOW, HIGH), rng, random_fraction)} for _ in range(n)]


def guess_schemas() -> list[dict]:
    """The environment's tool schemas exactly as rlcli derives them for its episodes (the public methods of an
    instance, described from their signatures and docstrings), so SFT and episodes render the same system
    message."""
    from rlcli.env.stateful import public_methods
    from rlcli.toolcalls import schemas_for

    return schemas_for(public_methods(GuessNumber()))


def chat_sft_rows(n: int, seed: int, random_fraction: float = 0.5) -> list[dict]:
    """The same noisy player's games as OpenAI-style conversations (``messages`` + ``tools``), for a chat model:
    one ``guess`` call per assistant turn, the environment's answer as the ``tool`` message. A conversation ends
    with the answer that ends the game, as the environment ends the episode there (``done``)."""
    rng = random.Random(seed)
    tools = guess_schemas()
    rows = []
    for _ in range(n):
        messages = [{"role": "user", "content": PROMPT}]
        for i, (g, answer) in enumerate(moves(rng.randint(LOW, HIGH), rng, random_fraction)):
            call = {"id": f"call_{i}", "type": "function",
                    "function": {"name": "guess", "arguments": json.dumps({"number": g})}}
            messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": f"call_{i}", "name": "guess", "content": answer}]
        rows.append({"messages": messages, "tools": tools})
    return rows


def eval_rounds(rounds: int = 4) -> list[dict]:
    """Every target once per round, round after round: the first ``31 k`` rows (``data.max_rows``) play every
    number ``k`` times."""
    return [{"prompt": PROMPT, "target": t} for _ in range(rounds) for t in range(LOW, HIGH + 1)]


def write_data() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    for name, rows in (("prompts.jsonl", prompt_rows(2000, seed=1)), ("eval.jsonl", eval_rows()),
                       ("sft_episodes.jsonl", sft_rows(2000, seed=3)),
                       ("smollm2_sft.jsonl", chat_sft_rows(300, seed=5)), ("eval_rounds.jsonl", eval_rounds())):
        (DATA / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {DATA / name} ({len(rows)} rows)")


# --- the demo -----------------------------------------------------------------------------------------------------


def tries(tool_calls: list[dict]) -> list[tuple[int, int, int]]:
    """``(guess, low, high)`` for each try of an episode (a call the game answered): the guess and the numbers still
    possible when it was made, replayed from the answers (``higher: 17-31`` is the new range)."""
    low, high, out = LOW, HIGH, []
    for call in tool_calls:
        answer = call.get("output", "")
        if call.get("status") != "ok" or not re.fullmatch(r"(higher|lower): \d+-\d+|correct", answer):
            continue
        arguments = call.get("arguments")
        value = arguments.get("number") if isinstance(arguments, dict) else arguments
        try:
            guess = int(str(value).strip())
        except ValueError:
            continue
        out.append((guess, low, high))
        if answer != "correct":
            low, high = map(int, answer.split(": ")[1].split("-"))
    return out


def game_summary(episodes_file: Path) -> dict:
    """Of an env-rollout's episodes: success rate, turns and tries per win, the share of tries that guessed a middle
    of what was still possible (binary search: all of them) and the share that guessed a number the answers had
    already ruled out (a wasted try)."""
    episodes = [json.loads(line) for line in episodes_file.read_text().splitlines() if line.strip()]
    wins = [e for e in episodes if any(call.get("output") == "correct" for call in e["tool_calls"])]
    made = [t for e in episodes for t in tries(e["tool_calls"])]
    return {"episodes": len(episodes), "success_rate": len(wins) / max(len(episodes), 1),
            "turns_per_win": sum(e["num_turns"] for e in wins) / len(wins) if wins else None,
            "tries_per_win": sum(len(e["tool_calls"]) for e in wins) / len(wins) if wins else None,
            "halving_share": sum(halves(*t) for t in made) / len(made) if made else None,
            "ruled_out_share": sum(not lo <= g <= hi for g, lo, hi in made) / len(made) if made else None}


def _summary_and_games(summary_file: Path) -> dict:
    """An evaluation stage's ``summary.json`` and the games' own figures (``game_summary``)."""
    return {**json.loads(summary_file.read_text()), **game_summary(summary_file.parent / "episodes.jsonl")}


def _evaluate(folder, model_dir: Path, out: Path) -> dict:
    folder.rlcli("env-rollout", "configs/guess_number_eval.yaml", f"model.name_or_path={model_dir}",
                 f"output_dir={out}")
    return game_summary(out / "episodes.jsonl")


def demo(out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    from _demo import take_out_dir  # recipes/_demo.py (this folder is on sys.path when run as a script)

    with take_out_dir(out, script="guess_number.py demo", runs=frozenset({"sft", "eval-sft", "grpo", "eval-grpo"}),
                      files=frozenset({"demo_summary.json"})) as folder:
        if not (DATA / "prompts.jsonl").exists():
            write_data()
        folder.rlcli("sft", "configs/guess_number_sft.yaml", f"output_dir={out / 'sft'}")
        before = _evaluate(folder, out / "sft", out / "eval-sft")
        folder.rlcli("ppo", "configs/guess_number.yaml", f"model.name_or_path={out / 'sft'}",
                     f"output_dir={out / 'grpo'}")
        after = _evaluate(folder, out / "grpo", out / "eval-grpo")
        (out / "demo_summary.json").write_text(json.dumps({"after_sft": before, "after_grpo": after}, indent=2))

    table = Table(title=f"Guess the number: {len(eval_rows())} games (every target 4 times, temperature 0.7)",
                  header_style="bold")
    table.add_column("")
    table.add_column("after SFT", justify="right")
    table.add_column("after GRPO", justify="right")
    table.add_row("games won", f"{before['success_rate']:.1%}", f"{after['success_rate']:.1%}")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    table.add_row("turns per win", fmt(before["turns_per_win"]), fmt(after["turns_per_win"]))
    console.print(table)
    console.print(f"runs: {out}/sft, {out}/grpo; episodes: {out}/eval-*/episodes.jsonl")


# --- the same game with SmolLM2-135M-Instruct through its chat template -----------------------------------------

def smollm2(out: Path, eval_rows: int, sft_steps: int | None, ppo_steps: int | None, resume: bool = False) -> None:
    """LoRA SFT of SmolLM2 on the chat demonstrations, evaluate, GRPO through ``GuessNumber`` with the chat
    protocol, evaluate again; a before/after table, and ``pipeline.json`` (written after every stage; ``--resume``
    keeps the stages an earlier run of ``out`` finished)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not 0 < eval_rows <= len(eval_rounds()):
        sys.exit(f"--eval-rows {eval_rows}: choose 1 to {len(eval_rounds())} (the rows of eval_rounds.jsonl)")
    from _demo import Pipeline  # recipes/_demo.py (this folder is on sys.path when run as a script)

    runs = frozenset({"sft", "eval-sft", "grpo", "eval-grpo"})
    settings = {"eval_rows": eval_rows, "sft_steps": sft_steps, "ppo_steps": ppo_steps}
    with Pipeline(out, script="guess_number.py smollm2", runs=runs, record="pipeline.json", resume=resume,
                  settings=settings) as pipe:
        if not (DATA / "smollm2_sft.jsonl").exists():
            write_data()

        def evaluate(name: str, model: Path) -> None:
            pipe.stage(name, out / name / "summary.json", "env-rollout", "configs/smollm2/guess_eval.yaml",
                       f"model.name_or_path={model}", f"output_dir={out / name}", f"data.max_rows={eval_rows}",
                       f"batch_size={eval_rows}", summary=_summary_and_games)

        pipe.stage("sft", out / "sft" / "merged" / "config.json", "sft", "configs/smollm2/guess_sft.yaml",
                   f"output_dir={out / 'sft'}", *([f"train.max_steps={sft_steps}"] if sft_steps else []))
        evaluate("eval-sft", out / "sft" / "merged")
        pipe.stage("grpo", out / "grpo" / "merged" / "config.json", "ppo", "configs/smollm2/guess_ppo.yaml",
                   f"model.name_or_path={out / 'sft' / 'merged'}", f"output_dir={out / 'grpo'}",
                   *([f"ppo.steps={ppo_steps}"] if ppo_steps else []))
        evaluate("eval-grpo", out / "grpo" / "merged")
    summaries, times, record = pipe.summaries, pipe.times, out / "pipeline.json"

    before, after = summaries["eval-sft"], summaries["eval-grpo"]
    table = Table(title=f"SmolLM2-135M-Instruct guesses the number: {eval_rows} games (temperature 0.7)",
                  header_style="bold")
    table.add_column("")
    table.add_column("after LoRA SFT", justify="right")
    table.add_column("after GRPO", justify="right")
    fmt = lambda v, spec="{:.2f}": "-" if v is None else spec.format(v)
    wins = lambda s: f"{round(s['success_rate'] * s['episodes'])}/{s['episodes']} ({s['success_rate']:.1%})"
    table.add_row("games won", wins(before), wins(after))
    table.add_row("turns per win", fmt(before["turns_per_win"]), fmt(after["turns_per_win"]))
    for label, key in (("guesses at a middle", "halving_share"), ("guesses already ruled out", "ruled_out_share")):
        table.add_row(label, fmt(before[key], "{:.1%}"), fmt(after[key], "{:.1%}"))
    table.add_row("reward (mean)", fmt(before["reward_mean"], "{:.3f}"), fmt(after["reward_mean"], "{:.3f}"))
    console.print(table)
    console.print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    console.print(f"runs: {out}/sft, {out}/grpo; episodes: {out}/eval-*/episodes.jsonl; summary: {record}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("data", help="write data/guess_number/*.jsonl")
    d = sub.add_parser("demo", help="run the whole offline demo")
    d.add_argument("--out", default="runs/guess_number",
                   help="run directory (an earlier demo's is replaced; one holding other files is refused)")
    s = sub.add_parser("smollm2", help="the game with SmolLM2-135M-Instruct: LoRA SFT, evaluate, GRPO, evaluate")
    s.add_argument("--out", default="runs/guess_smollm2",
                   help="run directory (an earlier pipeline's is replaced; any other non-empty one is refused)")
    s.add_argument("--eval-rows", type=int, default=62, help="games per evaluation (31 k plays every number k times)")
    s.add_argument("--sft-steps", type=int, default=None, help="override train.max_steps of the SFT recipe")
    s.add_argument("--ppo-steps", type=int, default=None, help="override ppo.steps of the GRPO recipe")
    s.add_argument("--resume", action="store_true", help="keep the stages an earlier run of --out finished")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = None if args.command == "data" else ROOT / args.out if not os.path.isabs(args.out) else Path(args.out)
    if args.command == "data":
        write_data()
    elif args.command == "demo":
        demo(out)
    else:
        smollm2(out, args.eval_rows, args.sft_steps, args.ppo_steps, args.resume)
