"""Load tokenizers and models from a hub id / local dir, or build them from scratch; wrap them with LoRA.

``task`` picks the head: ``causal`` (AutoModelForCausalLM), ``seq2seq`` (AutoModelForSeq2SeqLM) or
``classifier`` (AutoModelForSequenceClassification with one output: reward models).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from rlcli.config.common import LoraConfig, ModelConfig
from rlcli.config.errors import Problem, UserError
from rlcli.models import convert as gguf
from rlcli.models.tokenizer import BYTE_TOKENIZER_NAME, DEFAULT_CHAT_TEMPLATE, build_byte_tokenizer

Task = Literal["causal", "seq2seq", "classifier"]

_AUTO_CLASSES = {
    "causal": (AutoModelForCausalLM, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    "seq2seq": (AutoModelForSeq2SeqLM, modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
    "classifier": (AutoModelForSequenceClassification, modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


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
    auto_names = _AUTO_CLASSES[task][1]
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
                    problems.append(Problem(f"{key}.name_or_path", f"{p} has no config.json (not a saved model "
                                                                   "directory)"))
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
            return learned_positions(_AUTO_CLASSES[task][0].from_config(config))
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
    auto_cls = _AUTO_CLASSES[task][0]
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


def load_error(what: str, name_or_path: str, exc: OSError) -> UserError:
    """One paragraph for a ``from_pretrained`` that failed (transformers raises ``OSError`` with a long text and a
    chain of hub errors): the first line of its message, and for a hub id what to check."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    hint = ""
    if not Path(name_or_path).exists() and not name_or_path.startswith(gguf.PKG_PREFIX):
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            hint = (" It is not a local path, and HF_HUB_OFFLINE is set, so only the local Hugging Face cache was "
                    "searched: check the id, or download it on a machine with network access.")
        else:
            hint = (" It is not a local path, so it was looked up on the Hugging Face hub: check the id, the network "
                    "and, for a gated model, your login (HF_HUB_OFFLINE=1 uses only the local cache, without retries).")
    return UserError(f"{what} {name_or_path!r} could not be loaded: {first}{hint}")


def model_dir(cfg: ModelConfig) -> str:
    """What ``from_pretrained`` gets for a recipe's ``name_or_path``: a hub id or local directory as written,
    ``pkg://PACKAGE`` resolved, a ``gguf_file`` converted (once) into an ordinary directory in rlcli's cache."""
    if cfg.gguf_file is not None:
        from rlcli.logging import console

        return str(gguf.converted_model_dir(cfg.name_or_path, cfg.gguf_file,
                                            announce=lambda text: console.print(text, style="dim")))
    return gguf.resolve_path(cfg.name_or_path)


def load_tokenizer(cfg: ModelConfig, padding_side: str = "right") -> PreTrainedTokenizerBase:
    """The recipe's tokenizer, with a pad token that differs from EOS whenever possible and a chat template."""
    source = cfg.tokenizer_source
    if source == cfg.name_or_path:
        source = model_dir(cfg)
    elif source != BYTE_TOKENIZER_NAME:
        source = gguf.resolve_path(source)
    if source == BYTE_TOKENIZER_NAME:
        tokenizer = build_byte_tokenizer()
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision,
                                                      trust_remote_code=cfg.trust_remote_code)
        except OSError as exc:
            raise load_error("tokenizer", source, exc) from None
    if tokenizer.pad_token is None:
        # Adding a new token would change the vocab size of a pretrained model; reusing EOS is what GPT-2 users
        # expect. Masks are then built from lengths, never from `ids != pad`, so the real EOS keeps its mask.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(
    cfg: ModelConfig,
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_labels: int = 1,
) -> PreTrainedModel:
    """Load (or build from scratch) a model with the head for ``task``."""
    auto_cls = _AUTO_CLASSES[task][0]
    dtype = DTYPES[cfg.dtype]
    extra = {"num_labels": num_labels} if task == "classifier" else {}
    if cfg.architecture is not None:
        config = AutoConfig.for_model(cfg.architecture, **cfg.config, **extra)
        config.vocab_size = len(tokenizer)
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if config.is_encoder_decoder:
            config.decoder_start_token_id = tokenizer.pad_token_id
        model = auto_cls.from_config(config, dtype=None if dtype == "auto" else dtype)
    else:
        source = model_dir(cfg)
        try:
            config = AutoConfig.from_pretrained(
                source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **cfg.config, **extra
            )
            if task == "classifier" and config.pad_token_id is None:
                config.pad_token_id = tokenizer.pad_token_id
            model = auto_cls.from_pretrained(
                source,
                config=config,
                revision=cfg.revision,
                dtype=dtype,
                trust_remote_code=cfg.trust_remote_code,
            )
        except OSError as exc:
            raise load_error("model", cfg.name_or_path, exc) from None
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if task == "classifier" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if wants_checkpointing(cfg, model):
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


CHECKPOINTING_MIN_PARAMETERS = 100_000_000


def wants_checkpointing(cfg: ModelConfig, model: torch.nn.Module) -> bool:
    """``model.gradient_checkpointing`` as set, else on for models of ``CHECKPOINTING_MIN_PARAMETERS`` or more
    (parameters partitioned by ZeRO-3 while loading count whole)."""
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing
    if not getattr(model, "supports_gradient_checkpointing", False):
        return False
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) >= CHECKPOINTING_MIN_PARAMETERS


def checkpointing(model: torch.nn.Module) -> bool:
    """Whether any block of ``model`` recomputes its activations in the backward pass."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def apply_lora(model: PreTrainedModel, cfg: LoraConfig, task: Task):
    """Wrap ``model`` with peft LoRA adapters; for classifiers the score head stays trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    task_type = {"causal": TaskType.CAUSAL_LM, "seq2seq": TaskType.SEQ_2_SEQ_LM, "classifier": TaskType.SEQ_CLS}[task]
    peft_config = PeftLoraConfig(
        task_type=task_type,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
    )
    if model.config.model_type == "gpt2" and cfg.target_modules == "all-linear":
        # GPT-2 uses Conv1D, which peft's all-linear does not match; name its projections explicitly.
        peft_config.target_modules = {"c_attn", "c_proj", "c_fc"}
        peft_config.fan_in_fan_out = True
    if checkpointing(model):
        # Frozen embeddings would give checkpointed blocks inputs without grad, and no gradient to the adapters.
        model.enable_input_require_grads()
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning on every LoRA run that the
        # user can do nothing about); the property still works in transformers 5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_config)
