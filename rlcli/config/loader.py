"""Read a YAML recipe, apply ``key.sub=value`` overrides, validate it, and report every problem at once."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from rlcli.config.errors import Problem, RecipeError, RecipeProblems

R = TypeVar("R", bound=BaseModel)
CLI = "command line"


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a recipe's values came from: its file, the line of each key, the keys set on the command line."""

    source: str
    lines: dict[str, int] = dataclasses.field(default_factory=dict)
    touched: frozenset[str] = frozenset()
    notes: tuple[Problem, ...] = ()  # old key names the recipe used (rlcli.config.renamed), each placed
    def place(self, problem: Problem) -> Problem:
        """``problem``, placed at the override that set its key or at the key's line in the file."""
        key = problem.key
        # a key set on the command line, inside one (model.config.x for model.config={...}) or under a section
        # whose check failed (train, when train.batch_size=33 was given) is the command line's doing
        if key and any(key == t or key.startswith(t + ".") or t.startswith(key + ".") for t in self.touched):
            return dataclasses.replace(problem, source=CLI, line=None)
        # so is one about another key that names a key set there as its cause ("ppo.batch_size=64 must be a multiple
        # of ppo.mini_batch_size=48", "... positions (model.config.n_positions)"): not the file's line of the first
        named = [t for t in sorted(self.touched)
                 if re.search(rf"(?<![\w.]){re.escape(t)}=|\({re.escape(t)}\)", problem.message)]
        if named:
            return dataclasses.replace(problem, source=f"{CLI} ({', '.join(named)})", line=None)
        return dataclasses.replace(problem, source=self.source, line=self.lines.get(key))


def locate(problems: list[Problem], origin: Origin | str = "recipe") -> list[Problem]:
    """The problems a command's checks found after validation, each placed where its key was set: ``origin`` comes
    from :func:`load_recipe_and_origin` (a plain source name when the recipe was built otherwise)."""
    origin = origin if isinstance(origin, Origin) else Origin(origin)
    return [origin.place(p) for p in problems]


def _key_lines(text: str, source: str = "") -> tuple[dict[str, int], list[Problem]]:
    """Map each dotted key path of a YAML mapping to its 1-based line, for error messages; and the keys set twice in
    one mapping (PyYAML keeps the last silently: a second ``kl:`` section would replace the first whole), each named
    with both lines."""
    lines: dict[str, int] = {}
    twice: list[Problem] = []

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: a merge, not a key
                    continue
                key, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
                if key in seen:
                    twice.append(Problem(key, (
                        f"set twice in this mapping, on line {seen[key]} and again on line {line}; YAML would keep "
                        "the second silently, replacing the first: keep one of them"), source=source, line=line))
                seen[key] = lines[key] = line
                walk(value_node, key + ".")
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[f"{prefix}{i}"] = item.start_mark.line + 1
                walk(item, f"{prefix}{i}.")

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines, twice
    if root is not None:
        walk(root, "")
    return lines, twice


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse a recipe file into a dict and a key→line map. Raises ``RecipeError`` for a missing or bad file."""
    path = Path(path)
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise RecipeError([Problem("", f"recipe file not found{hint}", source=str(path))])
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise RecipeError([Problem("", f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at column {column} (save the "
                                   "file as UTF-8)", source=str(path), line=line)]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        col = f", column {mark.column + 1}" if mark is not None else ""
        raise RecipeError([Problem("", f"YAML syntax error: {problem}{col}", source=str(path), line=line)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([Problem("", f"expected a mapping of keys at the top, got {type(data).__name__}", str(path))])
    lines, twice = _key_lines(text, str(path))
    if twice:
        raise RecipeError(twice)
    return data, lines


def parse_override(item: str) -> tuple[str, Any]:
    """``train.learning_rate=3e-4`` -> (``train.learning_rate``, 0.0003); the value parses as a YAML scalar."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError([Problem(item, "an override must look like key.sub=value", source=CLI)])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads 3e-4 as a string; everyone means the number
    return key, value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return any(c in text for c in "eE.") and text.strip().lower() not in {"nan", "inf", "-inf", "infinity"}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> set[str]:
    """Set each dotted key in ``data`` (creating sections as needed). Returns the overridden key paths."""
    touched = set()
    for item in overrides:
        key, value = parse_override(item)
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                prefix = ".".join(parts[: i + 1])
                raise RecipeError([Problem(key, f"cannot set a sub-key: {prefix} is {child!r}, not a section", CLI)])
            node = child
        node[parts[-1]] = value
        touched.add(key)
    return touched


def _fix_floats(node: Any) -> Any:
    # YAML 1.1 (PyYAML) reads `1e-5` as a string; coerce numeric-looking strings so `learning_rate: 1e-5` works.
    if isinstance(node, dict):
        return {k: _fix_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_floats(v) for v in node]
    if isinstance(node, str) and _looks_like_float(node) and "e" in node.lower():
        return float(node)
    return node


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at ``loc`` (to suggest valid sibling keys)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _unwrap(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key path a schema accepts."""
    paths = []
    for name, field in model.model_fields.items():
        paths.append(prefix + name)
        inner = _unwrap(field.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            paths += _key_paths(inner, f"{prefix}{name}.")
    return paths


def _unwrap(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return annotation


# Names people carry over from other trainers (TRL, HF Trainer, PyTorch) -> rlcli's key.
ALIASES = {
    "lr": "learning_rate", "learningrate": "learning_rate", "wd": "weight_decay", "betas": "adam_betas",
    "eps": "adam_eps", "adam_epsilon": "adam_eps", "scheduler": "lr_scheduler", "lr_scheduler_type": "lr_scheduler",
    "warmup": "warmup_steps", "num_warmup_steps": "warmup_steps", "grad_clip": "max_grad_norm",
    "clip_grad_norm": "max_grad_norm", "max_norm": "max_grad_norm", "bs": "batch_size", "batch": "batch_size",
    "per_device_train_batch_size": "micro_batch_size", "micro_batch": "micro_batch_size", "steps": "max_steps",
    "num_train_epochs": "epochs", "num_epochs": "epochs", "max_len": "max_length", "max_seq_length": "max_length",
    "seq_len": "max_length", "logging_steps": "log_every", "save_steps": "save_every", "eval_steps": "eval_every",
    "save_total_limit": "keep_checkpoints", "output": "output_dir", "out_dir": "output_dir", "rank": "r",
    "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_r": "r", "model_name": "name_or_path",
    "model_name_or_path": "name_or_path", "precision": "mixed_precision", "fp16": "mixed_precision",
    "bf16": "mixed_precision", "seed_value": "seed",
    # TRL's GRPOConfig / PPOConfig and verl's actor settings
    "epsilon": "clip_range", "cliprange": "clip_range", "clip_ratio": "clip_range", "clip_ratio_low": "clip_range",
    "epsilon_high": "clip_range_high", "clip_ratio_high": "clip_range_high", "clip_ratio_c": "dual_clip",
    "entropy_coeff": "entropy_coef", "ent_coef": "entropy_coef", "cliprange_value": "clip_range_value",
    "num_generations": "group_size", "rollout_n": "group_size", "n_samples_per_prompt": "group_size",
    "loss_agg_mode": "loss_aggregation", "loss_type": "loss_aggregation", "beta": "coef", "kl_coef": "coef",
    "init_kl_coef": "coef", "kl_loss_coef": "coef", "kl_loss_type": "estimator", "kl_estimator": "estimator",
    "adv_estimator": "advantage", "num_ppo_epochs": "epochs", "ppo_epochs": "epochs", "mini_batch": "mini_batch_size",
    "ppo_mini_batch_size": "mini_batch_size", "response_length": "max_new_tokens", "max_completion_length": "max_new_tokens",
    "total_episodes": "steps", "vf_coef": "vf_coef",
    "vllm_importance_sampling_mode": "importance_sampling", "vllm_importance_sampling_cap": "importance_sampling_cap",
    "rollout_is": "importance_sampling", "rollout_is_threshold": "importance_sampling_cap",
    "scale_rewards": "advantage_scaling", "norm_adv_by_std_in_grpo": "advantage_scaling",
    "whiten_advantages": "advantage_scaling", "reward_weights": "weight", "kl_target": "target",
    "critic_warmup": "warmup_steps", "freezing_actor_steps": "warmup_steps", "critic_learning_rate": "learning_rate",
}


def _suggest(name: str, here: list[str], everywhere: list[str]) -> str | None:
    """The key meant by an unknown ``name``: an alias or a near spelling in the same section first (``optim.lr`` ->
    ``learning_rate``), then the same key in another section (``ppo.learning_rate`` -> ``optim.learning_rate``)."""
    meant = ALIASES.get(name.lower().replace("-", "_"))
    if meant in here:
        return meant
    near = difflib.get_close_matches(name, here, n=1)
    if near:
        return near[0]
    leaves: dict[str, str] = {}
    for path in everywhere:
        leaves.setdefault(path.rsplit(".", 1)[-1], path)
    for candidate in (meant, name):
        if candidate in leaves:
            return leaves[candidate]
    # short names match anything short (lr ~ r): only a close spelling of a real word counts elsewhere
    near = difflib.get_close_matches(name, [n for n in leaves if len(n) > 3], n=1, cutoff=0.75) if len(name) > 3 else []
    return leaves[near[0]] if near else None


def _describe(error: dict[str, Any], schema: type[BaseModel]) -> str:
    kind = error["type"]
    loc = tuple(p for p in error["loc"] if not isinstance(p, str) or not p.startswith("function-"))
    if kind == "extra_forbidden":
        owner = _model_at(schema, loc[:-1])
        valid = sorted(owner.model_fields) if owner else []
        guess = _suggest(str(loc[-1]), valid, _key_paths(schema))
        hint = f"; did you mean '{guess}'?" if guess else ""
        return f"unknown key{hint} (valid keys here: {', '.join(valid)})"
    if kind == "missing":
        return "required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if "input" in error and kind not in ("model_type", "dict_type") and not isinstance(error["input"], dict):
        message += f" (got {error['input']!r})"
    return message


def validate(schema: type[R], data: dict[str, Any], origin: Origin, processes: int = 1) -> R:
    """Validate ``data`` against ``schema`` for a run on ``processes`` processes (batch arithmetic); raise one
    ``RecipeError`` listing every problem."""
    try:
        recipe = schema.model_validate(_fix_floats(data), context={"processes": processes})
    except ValidationError as exc:
        problems: list[Problem] = []
        for error in exc.errors():
            loc = tuple(str(p) for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            cause = error.get("ctx", {}).get("error")
            found = (cause.problems if isinstance(cause, RecipeProblems)
                     else [Problem(".".join(loc), _describe(error, schema))])
            for p in found:
                placed = origin.place(Problem(p.key or ".".join(loc), p.message))
                if placed not in problems:
                    problems.append(placed)
        raise RecipeError(problems) from None
    return recipe


def load_recipe(schema: type[R], path: str | Path, overrides: list[str] | None = None, *, processes: int = 1) -> R:
    """Read, override and validate a recipe for a run on ``processes`` processes (the command line reads the count
    from the launch once and passes it; nothing here reads the environment). Every problem is reported together in
    one ``RecipeError``."""
    return load_recipe_and_origin(schema, path, overrides, processes=processes)[0]


def load_recipe_and_origin(schema: type[R], path: str | Path, overrides: list[str] | None = None, *,
                           processes: int = 1) -> tuple[R, Origin]:
    """``load_recipe``, and where each value came from (file line or command line), for placing the problems the
    commands' own checks find later (:func:`locate`)."""
    from rlcli.config.renamed import migrate

    data, lines = read_yaml(path)
    touched = apply_overrides(data, list(overrides or []))
    found = migrate(schema.__name__, data)
    for old, new in found.moved.items():  # a moved value's problems are placed where its old key was set
        lines.update({new + key[len(old):]: line for key, line in lines.items()
                      if key == old or key.startswith(old + ".")})
        if any(t == old or t.startswith(old + ".") for t in touched):
            touched.add(new)
    origin = Origin(str(path), lines, frozenset(touched))
    origin = dataclasses.replace(origin, notes=tuple(origin.place(n) for n in found.notes))
    problems = [origin.place(p) for p in found.problems]
    try:
        recipe = validate(schema, data, origin, processes)
    except RecipeError as exc:
        problems += exc.problems
    if problems:  # the renames' problems with the schema's own, all at once, and the renames said
        said = "\n".join(f"  note: {n.render()}" for n in origin.notes)
        raise RecipeError(problems, hint=f"Keys this recipe sets under an old name:\n{said}" if said else None)
    return recipe, origin


def recipe_to_yaml(recipe: BaseModel) -> str:
    """The resolved recipe (defaults filled in), as YAML in field order."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, default_flow_style=False)
