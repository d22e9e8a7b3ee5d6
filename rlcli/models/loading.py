"""Load tokenizers and models from a hub id / local dir, or build them from scratch; wrap them with LoRA.

``task`` picks the head: ``causal`` (AutoModelForCausalLM), ``seq2seq`` (AutoModelForSeq2SeqLM) or
``classifier`` (AutoModelForSequenceClassification with one output: reward models). What can be checked without
weights first is ``rlcli.models.checks``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlcli.config.common import LoraConfig, ModelConfig
from rlcli.config.errors import UserError
from rlcli.models import convert as gguf
from rlcli.models.checks import AUTO_CLASSES, Task
from rlcli.models.tokenizer import BYTE_TOKENIZER_NAME, DEFAULT_CHAT_TEMPLATE, build_byte_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


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
    auto_cls = AUTO_CLASSES[task][0]
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
