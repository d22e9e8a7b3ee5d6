"""Recipe keys that were renamed, merged or removed. An old name keeps working for one release: the loader moves its
value to the new key and the run says so in one line (``train.keep_best is now eval.keep_best``); a removed key
that did nothing is dropped with a note, and one whose value would have changed nothing silently no longer can.

Each command's changes are listed under its recipe class's name (``MIGRATIONS``); ``migrate`` applies them to the
parsed YAML (overrides included) before validation, so errors about a moved value name the new key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from rlcli.config.errors import Problem

MISSING = object()
UNTIL = "the old name works until the next release"


def _get(data: dict, path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def _pop(data: dict, path: str) -> Any:
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        if not isinstance(node, dict) or not isinstance(node.get(part), dict):
            return MISSING
        node = node[part]
    return node.pop(last, MISSING)


def _put(data: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = data
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


@dataclasses.dataclass
class Found:
    """What migrating one recipe found: notes to print (each placed at its old key) and problems that stop it."""

    saved: bool  # a recipe.yaml an earlier release wrote (every key there, filled in), not one a user wrote
    notes: list[Problem] = dataclasses.field(default_factory=list)
    problems: list[Problem] = dataclasses.field(default_factory=list)
    moved: dict[str, str] = dataclasses.field(default_factory=dict)  # old path -> new path, for lines and overrides


@dataclasses.dataclass(frozen=True)
class Moved:
    """``old`` is now ``new`` (its value carried over unchanged)."""

    old: str
    new: str

    def __call__(self, data: dict, found: Found) -> None:
        value = _pop(data, self.old)
        if value is MISSING:
            return
        if _get(data, self.new) is not MISSING:
            found.problems.append(Problem(self.old, f"{self.old} is the old name of {self.new}, which is set too: "
                                                    f"keep {self.new} only"))
            return
        _put(data, self.new, value)
        found.moved[self.old] = self.new
        found.notes.append(Problem(self.old, f"{self.old} is now {self.new}: rename it ({UNTIL})"))


@dataclasses.dataclass(frozen=True)
class Retired:
    """``old`` was removed. ``inert``: the values it could be set to without effect (accepted, with a note; None:
    any value, as for a key that was never read); any other value is refused with ``why``."""

    old: str
    why: str
    inert: tuple | None = None

    def __call__(self, data: dict, found: Found) -> None:
        value = _pop(data, self.old)
        if value is MISSING:
            return
        if self.inert is None or value in self.inert:
            found.notes.append(Problem(self.old, f"{self.old} is no longer a key and is ignored: {self.why} "
                                                 f"(remove it; {UNTIL})"))
        else:
            found.problems.append(Problem(self.old, f"{self.old}={value!r}: {self.why}"))


def _whiten_advantages(data: dict, found: Found) -> None:
    """``ppo.whiten_advantages`` (gae) merged into ``ppo.advantage_scaling``: true is ``batch``, false ``none``.
    With a critic-free estimator it was never read."""
    value = _pop(data, "ppo.whiten_advantages")
    if value is MISSING:
        return
    advantage = _get(data, "ppo.advantage")
    if advantage not in (MISSING, None, "gae"):
        found.notes.append(Problem("ppo.whiten_advantages", f"ppo.whiten_advantages is ignored with ppo.advantage="
                                   f"{advantage} (ppo.advantage_scaling sets the scaling of every estimator): remove "
                                   f"it ({UNTIL})"))
        return
    if not isinstance(value, bool):
        found.problems.append(Problem("ppo.whiten_advantages", f"expected true or false (got {value!r}); it is now "
                                                               "ppo.advantage_scaling: batch or none"))
        return
    new = "batch" if value else "none"
    # an earlier release filled in ppo.advantage_scaling for gae too (and did not read it there)
    if _get(data, "ppo.advantage_scaling") not in (MISSING, None) and not found.saved:
        found.problems.append(Problem("ppo.whiten_advantages", "ppo.whiten_advantages is the old name of "
                                                               "ppo.advantage_scaling, which is set too: keep "
                                                               "ppo.advantage_scaling only"))
        return
    _put(data, "ppo.advantage_scaling", new)
    found.moved["ppo.whiten_advantages"] = "ppo.advantage_scaling"
    found.notes.append(Problem("ppo.whiten_advantages", f"ppo.whiten_advantages={str(value).lower()} is now "
                                                        f"ppo.advantage_scaling={new} ({UNTIL})"))


def _score_scale(data: dict, found: Found) -> None:
    """``ppo.score_scale`` merged into ``reward.weight`` (and ``reward.environment_weight``): both multiplied the
    score before the clip; only running normalisation, which came between them, told them apart."""
    value = _pop(data, "ppo.score_scale")
    if value is MISSING:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        found.problems.append(Problem("ppo.score_scale", f"expected a number > 0 (got {value!r}); it is now "
                                                         "reward.weight"))
        return
    if value == 1:  # (1.0 too)
        found.notes.append(Problem("ppo.score_scale", f"ppo.score_scale is no longer a key (1.0 changed nothing): "
                                                      f"remove it; reward.weight scales the score ({UNTIL})"))
        return
    if _get(data, "ppo.score_norm") == "running":
        found.problems.append(Problem("ppo.score_scale", (
            "ppo.score_scale scaled the score after ppo.score_norm=running, which reward.weight (before it) cannot "
            "do; running normalisation gives scores of unit spread already: remove ppo.score_scale")))
        return
    for key in ("reward.weight", "reward.environment_weight"):
        current = _get(data, key)
        current = 1.0 if current in (MISSING, None) else current
        if not isinstance(current, (int, float)) or isinstance(current, bool):
            return  # the schema names the bad weight
        _put(data, key, current * value)
    found.moved["ppo.score_scale"] = "reward.weight"
    found.notes.append(Problem("ppo.score_scale", f"ppo.score_scale={value:g} is now part of reward.weight and "
                                                  f"reward.environment_weight (both multiplied by {value:g}): set "
                                                  f"them instead ({UNTIL})"))


def _never_read(section: str, keys: tuple[str, ...], why: str) -> list[Retired]:
    return [Retired(f"{section}.{k}", why) for k in keys]


_LOGGING = ("report_to", "project", "run_name", "log_every", "progress", "progress_every_s")
_SAMPLING_CUT = (
    "rlcli ppo samples the full distribution: a top-k / top-p cut depends on the logits themselves, and neither way "
    "of taking log-probs is then sound. With the full distribution in the loss, the ratio is taken against a "
    "distribution the tokens were not drawn from and the policy keeps probability on tokens it can never sample; "
    "replaying the cut in the loss, the reference's own cut leaves out most sampled tokens and the KL is infinite "
    "(bench/README.md, 'why rlcli ppo refuses top-k / top-p'). Lower generation.temperature for sharper samples "
    "(rlcli env-rollout, which trains nothing, takes generation.top_k / top_p)")
_TURN_BUDGET = Moved("env.max_new_tokens", "generation.max_new_tokens")
_DESCRIBE = Moved("env.system_prompt", "env.describe_tools")

MIGRATIONS: dict[str, list[Callable[[dict, Found], None]]] = {
    "SFTRecipe": [Moved("train.eval_every", "eval.every"), Moved("train.eval_batch_size", "eval.batch_size")],
    "RMRecipe": [Moved("train.eval_every", "eval.every"), Moved("train.eval_batch_size", "eval.batch_size")],
    "PPORecipe": [
        Moved("train.keep_best", "eval.keep_best"), Moved("train.keep_best_mode", "eval.keep_best_mode"),
        _TURN_BUDGET, _DESCRIBE, _whiten_advantages, _score_scale,
        Retired("generation.top_k", _SAMPLING_CUT, inert=(0,)),
        Retired("generation.top_p", _SAMPLING_CUT, inert=(1,)),  # (1.0 too)
        Retired("ref_model.tokenizer", "the reference model reads the policy's tokens, so it uses the policy's "
                                       "tokenizer"),
        Retired("ref_model.gradient_checkpointing", "the reference model is frozen: it has no backward pass"),
        Retired("critic.model.tokenizer", "the critic reads the policy's tokens, so it uses the policy's tokenizer"),
    ],
    "EnvRolloutRecipe": [
        Moved("temperature", "generation.temperature"), Moved("top_k", "generation.top_k"),
        Moved("top_p", "generation.top_p"), _TURN_BUDGET, _DESCRIBE,
        *_never_read("logging", _LOGGING, "env-rollout writes episodes, not metrics"),
    ],
}


def migrate(schema_name: str, data: dict, *, saved: bool = False) -> Found:
    """Apply ``schema_name``'s key changes to ``data`` in place (``saved``: a whole recipe.yaml an earlier release
    wrote, rather than a recipe a user wrote)."""
    found = Found(saved=saved)
    for change in MIGRATIONS.get(schema_name, []):
        change(data, found)
    if schema_name == "EnvRolloutRecipe" and data.get("logging") == {}:
        del data["logging"]
    return found


def old_names(schema_name: str) -> list[str]:
    """The old key paths ``schema_name`` still takes (for suggestions and tests)."""
    names = []
    for change in MIGRATIONS.get(schema_name, []):
        old = getattr(change, "old", None)
        names.append(old if old is not None else {_whiten_advantages: "ppo.whiten_advantages",
                                                   _score_scale: "ppo.score_scale"}[change])
    return names
