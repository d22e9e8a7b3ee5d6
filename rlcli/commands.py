"""The commands, listed once: what the CLI, ``rlcli explain``, the launch checks and the output-dir checks read.

Each command names its recipe schema and the module that runs it (``preflight(recipe, origin, processes)`` and
an entry point ``(recipe, resume=...)``); both are imported only when the command is used, so ``rlcli --help`` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    schema_path: str  # "module:Class" of the recipe schema
    runner_path: str  # module with preflight() and the entry point
    entry: str = "train"  # runner_path's function (recipe, resume=...) that runs the command
    trains: bool = True  # writes checkpoints, resumes; runs under every launcher (env-rollout: one process)
    recipe_run: bool = True  # CONFIG -> a run in output_dir through cli._run (serve-reward: a server, its own CLI)

    @property
    def schema_name(self) -> str:
        return self.schema_path.rsplit(":", 1)[1]

    def schema(self) -> type:
        module, name = self.schema_path.split(":")
        return getattr(importlib.import_module(module), name)

    def preflight(self):
        return importlib.import_module(self.runner_path).preflight

    def run(self):
        return getattr(importlib.import_module(self.runner_path), self.entry)


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("sft", "Supervised fine-tuning (full or LoRA) on text, prompt/completion or chat data.",
            "rlcli.config.sft:SFTRecipe", "rlcli.trainers.sft"),
    Command("rm", "Reward model (full or LoRA) from preference pairs: prompt + chosen / rejected, text or chat.",
            "rlcli.config.rm:RMRecipe", "rlcli.trainers.rm"),
    Command("ppo", "KL-penalised PPO with a value head, or critic-free GRPO / RLOO / REINFORCE++, against a reward "
                   "function or a reward model, optionally through a text environment (tools).",
            "rlcli.config.ppo:PPORecipe", "rlcli.trainers.ppo"),
    Command("env-rollout", "Run episodes of a model that calls tools; show some, summarise all, write them to JSONL.",
            "rlcli.config.env:EnvRolloutRecipe", "rlcli.trainers.env_rollout", entry="run", trains=False),
    Command("serve-reward", "Serve a reward function or reward model over HTTP: the JSON contract a recipe's "
                            "reward.url calls.",
            "rlcli.config.serve:ServeRewardRecipe", "rlcli.rewards.serve", entry="serve", trains=False,
            recipe_run=False),
)}

def command_of(schema_name: str | None) -> str:
    """The command whose recipe schema is called ``schema_name`` (as a run's manifest records it)."""
    for c in COMMANDS.values():
        if c.schema_name == schema_name:
            return c.name
    return "an older rlcli"
