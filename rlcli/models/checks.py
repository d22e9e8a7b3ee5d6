"""What a recipe's model can be checked for without loading weights (``--dry-run`` and every trainer's preflight).

Its task (causal or seq2seq), its config keys and their types, local files, whether it can be built at all and fits
the recipe's lengths (built on the meta device), LoRA's target modules, and the hub ids that must be cached when
the hub cannot be reached. Loading itself is ``rlcli.models.loading``.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from rlcli.config.common import LoraConfig, ModelConfig
from rlcli.config.errors import Problem, UserError
from rlcli.models import convert as gguf
from rlcli.models.tokenizer import BYTE_TOKENIZER_NAME

Task = Literal["causal", "seq2seq", "classifier"]

AUTO_CLASSES = {
    "causal": (AutoModelForCausalLM, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    "seq2seq": (AutoModelForSeq2SeqLM, modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
    "classifier": (AutoModelForSequenceClassification, modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

def source_kind(name_or_path: str) -> Literal["local", "hub"]:
    """``local`` if the path exists (``pkg://PACKAGE`` included), ``hub`` if it looks like a hub id; else a
    ``UserError``."""
    if name_or_path.startswith(gguf.PKG_PREFIX):
        if not Path(gguf.resolve_path(name_or_path)).exists():
            raise UserError(f"{name_or_path}: no such directory in the installed package")
        return "local"
    if Path(name_or_path).exists():
        return "local"
    if _HUB_ID.match(name_or_path) and not name_or_path.startswith((".", "/")):
        return "hub"
    raise UserError(f"{name_or_path!r} is neither an existing local path nor a hub id like 'org/name'")


def model_task(cfg: ModelConfig) -> Literal["causal", "seq2seq"]:
    """Whether a recipe's model is an encoder-decoder (``seq2seq``) or decoder-only (``causal``) LM, without loading
    weights: from the architecture's config class, a local dir's ``config.json``, or a hub id's cached config; a hub
    id that is not cached is judged by its name (t5, bart, pegasus, marian, mt5, ul2 are seq2seq)."""
    import json

    if cfg.architecture is not None:
        arch = cfg.architecture
        return "seq2seq" if arch in CONFIG_MAPPING and CONFIG_MAPPING[arch]().is_encoder_decoder else "causal"
    if cfg.gguf_file is not None:
        try:
            arch = gguf.gguf_architecture(gguf.gguf_path(cfg.name_or_path, cfg.gguf_file))
        except UserError:
            arch = None
        return "seq2seq" if arch in ("t5",) else "causal"
    config_file = Path(cfg.name_or_path) / "config.json"
    if not config_file.exists() and _HUB_ID.match(cfg.name_or_path) and not cfg.name_or_path.startswith((".", "/")):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(cfg.name_or_path, "config.json", revision=cfg.revision)
        config_file = Path(cached) if isinstance(cached, str) else None
    if config_file is not None and config_file.exists():
        try:
            return "seq2seq" if json.loads(config_file.read_text()).get("is_encoder_decoder") else "causal"
        except (OSError, ValueError):
            pass
    name = cfg.name_or_path.lower().rsplit("/", 1)[-1]
    return "seq2seq" if any(k in name for k in ("t5", "bart", "pegasus", "marian", "ul2")) else "causal"


def check_model_config(cfg: ModelConfig, task: Task, key: str = "model") -> list[Problem]:
    """Problems findable without weights (unknown architecture, bad config keys, missing local files)."""
    problems = []
    auto_names = AUTO_CLASSES[task][1]
    if cfg.architecture is not None:
        arch = cfg.architecture
        if arch not in CONFIG_MAPPING:
            guess = difflib.get_close_matches(arch, list(CONFIG_MAPPING.keys()), n=3)
            if guess:
                hint = f"did you mean {', '.join(guess)}?"
            else:
                common = [a for a in _COMMON_ARCHITECTURES if a in auto_names] or sorted(auto_names)[:8]
                hint = f"no known name is close; {task} architectures include {', '.join(common)}, ..."
            problems.append(Problem(f"{key}.architecture", f"unknown architecture {arch!r}; {hint}"))
        elif arch not in auto_names:
            problems.append(Problem(f"{key}.architecture", f"{arch!r} has no {task} model class in transformers "
                            f"(use one of e.g. {', '.join(sorted(auto_names)[:8])}, ...)"))
        else:
            config_cls = CONFIG_MAPPING[arch]
            defaults = config_cls().to_dict()
            aliases = getattr(config_cls, "attribute_map", {})
            known = set(defaults) | set(aliases)
            for name, value in cfg.config.items():
                if name not in known:
                    guess = difflib.get_close_matches(name, sorted(known), n=1)
                    hint = f"; did you mean '{guess[0]}'?" if guess else ""
                    problems.append(Problem(f"{key}.config.{name}", f"not a {arch} config field{hint}"))
                    continue
                expected = _config_type(config_cls, aliases.get(name, name), defaults)
                if expected is not None and not _fits(value, expected):
                    problems.append(Problem(f"{key}.config.{name}", f"expected {_describe_type(expected)} (the type "
                                                                    f"{arch} configs take), got {type(value).__name__} "
                                                                    f"{value!r}"))
    elif cfg.gguf_file is not None:
        try:
            gguf.gguf_path(cfg.name_or_path, cfg.gguf_file)
        except UserError as exc:
            problems.append(Problem(f"{key}.gguf_file" if "gguf_file" in str(exc) else f"{key}.name_or_path", str(exc)))
        else:
            if gguf.gguf_problem() is not None:
                problems.append(Problem(f"{key}.gguf_file", gguf.gguf_problem()))
    else:
        try:
            kind = source_kind(cfg.name_or_path)
        except UserError as exc:
            problems.append(Problem(f"{key}.name_or_path", str(exc)))
        else:
            if kind == "local":
                p = Path(gguf.resolve_path(cfg.name_or_path))
                if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
                    ggufs = sorted(f.name for f in p.glob("*.gguf")) if p.is_dir() else []
                    hint = f"; it holds GGUF weights: name one with {key}.gguf_file: {ggufs[0]}" if ggufs else ""
                    problems.append(Problem(f"{key}.name_or_path", f"{p} has no config.json (not a saved model "
                                                                   f"directory){hint}"))
    tok = cfg.tokenizer_source
    if tok != BYTE_TOKENIZER_NAME and tok != cfg.name_or_path:
        try:
            source_kind(tok)
        except UserError as exc:
            problems.append(Problem(f"{key}.tokenizer", str(exc)))
    return problems


_COMMON_ARCHITECTURES = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt_neox", "opt", "t5",
                         "bart", "bert", "roberta")
_POSITION_EMBEDDINGS = ("wpe", "position_embeddings", "embed_positions")


def _model_config_without_weights(cfg: ModelConfig):
    """The model's config (overrides applied) without weights: built for ``architecture``, read from a local
    directory's config.json or a hub id's cached one; None when it cannot be had offline or needs remote code."""
    if cfg.trust_remote_code or cfg.gguf_file is not None:
        return None
    if cfg.architecture is not None:
        return AutoConfig.for_model(cfg.architecture, **cfg.config)
    try:
        return AutoConfig.from_pretrained(gguf.resolve_path(cfg.name_or_path), revision=cfg.revision,
                                          local_files_only=True, **cfg.config)
    except Exception:  # not cached, not a model directory (check_model_config says so), an adapter directory
        return None


def learned_positions(model: torch.nn.Module) -> int | None:
    """How many positions ``model`` learned an embedding for (GPT-2's ``wpe``): the longest input it can take; None
    when it has no such limit (rotary or relative positions)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    learned = any(isinstance(m, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_EMBEDDINGS
                  for name, m in model.named_modules())
    return positions if learned and isinstance(positions, int) else None


def config_positions(cfg: ModelConfig, task: Task) -> int | None:
    """:func:`learned_positions` of the model ``cfg`` describes, built on the meta device (no weights); None when
    it has no such limit or its config cannot be had offline."""
    import warnings

    try:
        config = _model_config_without_weights(cfg)
        if config is None:
            return None
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return learned_positions(AUTO_CLASSES[task][0].from_config(config))
    except Exception:  # noqa: BLE001 - a config that cannot be built: check_model_fits says why
        return None


def check_recipe_model_fits(recipe) -> list[Problem]:
    """:func:`check_model_fits` for a recipe of any command: its model(s), LoRA and the longest inputs it gives them
    (all read from the recipe; the model is built on the meta device, no weights)."""
    kind = type(recipe).__name__
    task = "classifier" if kind == "RMRecipe" else model_task(recipe.model)
    lengths: tuple = ()
    data, gen, env = getattr(recipe, "data", None), getattr(recipe, "generation", None), getattr(recipe, "env", None)
    if kind in ("SFTRecipe", "RMRecipe"):
        lengths = (("data.max_length", data.max_length, "a training text"),)
    elif env is not None and task == "causal":
        lengths = (("env.max_length", env.max_length, "an episode"),)
    elif gen is not None and task == "causal":
        # the prompt's length depends on the data (cut to what fits: ppo.preflight.prompt_budget); the response
        # alone must fit, beside at least one prompt token
        lengths = (("generation.max_new_tokens", gen.max_new_tokens + 1, "a response and its prompt's last token",
                    1),)
        evaluation = getattr(recipe, "eval", None)
        if evaluation is not None and evaluation.max_new_tokens:
            lengths += (("eval.max_new_tokens", evaluation.max_new_tokens + 1,
                         "a held-out response and its prompt's last token", 1),)
    problems = check_model_fits(recipe.model, task, lora=getattr(recipe, "lora", None), lengths=lengths)
    ref = getattr(recipe, "ref_model", None)
    if ref is not None:
        problems += check_model_fits(ref, task, key="ref_model", lengths=lengths)
    return problems


def check_model_fits(cfg: ModelConfig, task: Task, *, key: str = "model", lora: LoraConfig | None = None,
                     lengths: tuple[tuple, ...] = ()) -> list[Problem]:
    """What the model's config decides, checked without weights (the model is built on the meta device): that it
    can be built at all (heads dividing the width, no zero sizes), that ``lengths`` ((key, tokens, what), e.g.
    ("data.max_length", 512, "a training text"), and optionally the tokens counted beyond the key's own value) fit
    its learned positions, that LoRA's ``target_modules`` name
    modules it has."""
    try:
        config = _model_config_without_weights(cfg)
    except Exception as exc:
        return [Problem(f"{key}.config", f"not a usable {cfg.architecture} config: {_first_line(exc)}")]
    if config is None:
        return []
    where = f"{key}.config" if cfg.architecture is not None or cfg.config else f"{key}.name_or_path"
    width, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    names = dict(getattr(type(config), "attribute_map", {}))  # standard name -> this architecture's (n_head)
    if isinstance(width, int) and isinstance(heads, int) and not isinstance(heads, bool):
        head_key = names.get("num_attention_heads", "num_attention_heads")
        width_key = names.get("hidden_size", "hidden_size")
        if heads <= 0:
            return [Problem(f"{key}.config.{head_key}", f"{heads} attention heads: a model needs at least one")]
        if width % heads:
            return [Problem(f"{key}.config.{head_key}", (
                f"the width {width_key}={width} does not split into {head_key}={heads} heads ({width} is not a "
                f"multiple of {heads}); choose a {head_key} that divides {width}, or a {width_key} that is a "
                f"multiple of {heads}"))]
    auto_cls = AUTO_CLASSES[task][0]
    try:
        import warnings

        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            if task == "classifier":
                config.num_labels = 1
            model = auto_cls.from_config(config)
    except Exception as exc:  # the config describes a model that cannot exist
        return [Problem(where, f"the model cannot be built from this config: {type(exc).__name__}: "
                               f"{_first_line(exc)}")]
    problems = []
    positions = learned_positions(model)
    if positions is not None:
        pos_key = f"{key}.config.{names.get('max_position_embeddings', 'max_position_embeddings')}"
        for length_key, tokens, what, *extra in lengths:
            if tokens > positions:
                most = positions - (extra[0] if extra else 0)  # tokens beyond the key's own value
                problems.append(Problem(length_key, (
                    f"{tokens} tokens for {what}, but the model has {positions} positions ({pos_key}): longer "
                    f"inputs would fail with an index error; set {length_key} to at most {most}, or use a "
                    "model with more positions")))
    if lora is not None and lora.target_modules != "all-linear":
        module_names = [n for n, _ in model.named_modules() if n]
        targets = lora.target_modules
        if isinstance(targets, str):
            matched = any(re.fullmatch(targets, n) for n in module_names)
            missing = [] if matched else [targets]
        else:
            missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in module_names)]
        if missing:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if n and not list(m.children()) and hasattr(m, "weight")})
            problems.append(Problem("lora.target_modules", (
                f"{', '.join(map(repr, missing))} name{'s' if len(missing) == 1 else ''} no module of this model, "
                f"so LoRA would adapt nothing there; its layers with weights are named {', '.join(leaves[:12])}"
                + (", ..." if len(leaves) > 12 else "") + " (or use all-linear)")))
    return problems


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _config_type(config_cls, name: str, defaults: dict) -> Any:
    """The type a config field takes: its annotation on the config class (transformers 5 declares them), else the
    type of its default; None when neither says."""
    for cls in config_cls.__mro__:
        annotation = vars(cls).get("__annotations__", {}).get(name)
        if annotation is not None and not isinstance(annotation, str):
            return annotation
    default = defaults.get(name)
    if default is None:
        return None
    return float | int if isinstance(default, float) else type(default)


def _fits(value: Any, expected: Any) -> bool:
    """Whether a YAML value can be ``expected`` (a type, union, ``list[...]``, ``Literal``); True for types it cannot
    judge. No coercion: ``"two"`` is not an int, ``1`` is not a bool."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(expected))
    if origin is typing.Literal:
        return value in typing.get_args(expected)
    if origin is not None:
        expected = origin
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected in (str, list, dict, tuple):
        return isinstance(value, (list, tuple) if expected in (list, tuple) else expected)
    return True


def _describe_type(expected: Any) -> str:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return "null"
    names = {int: "an integer", float: "a number", bool: "true/false", str: "text", list: "a list", dict: "a mapping"}
    return names.get(typing.get_origin(expected) or expected, getattr(expected, "__name__", str(expected)))


def hub_names(recipe) -> list[tuple[str, str, str]]:
    """(key, hub id, "model" or "dataset") of every hub id ``recipe`` loads from: what needs the hub or its cache."""
    found = []
    for key in ("model", "ref_model"):
        cfg = getattr(recipe, key, None)
        if cfg is None:
            continue
        if cfg.architecture is None and cfg.name_or_path:
            found.append((f"{key}.name_or_path", cfg.name_or_path, "model"))
        tokenizer = getattr(cfg, "tokenizer", None)  # the reference has none: it uses the policy's
        if tokenizer not in (None, BYTE_TOKENIZER_NAME, cfg.name_or_path):
            found.append((f"{key}.tokenizer", tokenizer, "model"))
    reward = getattr(recipe, "reward", None)
    if reward is not None and isinstance(getattr(reward, "model", None), str):
        found.append(("reward.model", reward.model, "model"))
    data = getattr(recipe, "data", None)
    for key in ("path", "eval_path"):
        value = getattr(data, key, None)
        if isinstance(value, str) and Path(value).suffix not in (".jsonl", ".json", ".csv", ".parquet", ".txt", ".tsv"):
            found.append((f"data.{key}", value, "dataset"))
    hub = []
    for key, name, kind in found:
        try:
            if source_kind(name) == "hub":
                hub.append((key, name, kind))
        except UserError:
            continue  # neither a path nor an id: the command's own checks say so
    return hub


def _in_cache(name: str, kind: str) -> bool:
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"{kind}s--{name.replace('/', '--')}" / "snapshots"
    return folder.is_dir() and any(folder.iterdir())


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A TCP connection to the hub's endpoint opens within ``timeout_s`` (with a proxy set, the proxy decides:
    assumed reachable)."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
    except OSError:
        return False
    return True


def check_hub(recipe, *, warn_only: bool = False) -> list[str]:
    """Before anything is looked up on the Hugging Face hub: when the hub cannot be reached (or HF_HUB_OFFLINE is
    set), every hub id the recipe names must be in the local cache, else one ``UserError`` naming them, at once (the
    hub library would retry each for about a minute first; ``warn_only``: a note instead). Unreachable, this process
    works offline from then on (the cache is used without retries); the note returned says so."""
    from huggingface_hub import constants

    names = hub_names(recipe)
    if not names:
        return []
    offline = constants.HF_HUB_OFFLINE
    if not offline and _hub_reachable():
        return []
    missing = [(key, name) for key, name, kind in names if not _in_cache(name, kind)]
    if missing:
        why = ("HF_HUB_OFFLINE is set" if offline
               else f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached from this machine")
        listed = "; ".join(f"{key}: {name!r}" for key, name in missing)
        if warn_only:
            return [f"{listed} {'is' if len(missing) == 1 else 'are'} not in the local Hugging Face cache and {why}: "
                    "a run here would stop there (the recipe itself is checked)"]
        raise UserError(f"{listed} {'is' if len(missing) == 1 else 'are'} not a local path and not in the local "
                        f"Hugging Face cache ({constants.HF_HUB_CACHE}), and {why}: download "
                        f"{'it' if len(missing) == 1 else 'them'} on a machine with network access (huggingface-cli "
                        "download NAME, with HF_HOME pointing at a cache this machine sees), or name a local copy")
    if offline:
        return []
    import os
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"  # for processes started later (the workers of a relaunch)
    constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
    return [f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached: working offline from the local cache, "
            f"which holds {', '.join(repr(name) for _, name, _ in names)}"]
