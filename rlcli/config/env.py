"""The ``env:`` section: a text environment (tools the model calls while it generates), shared by ``rlcli ppo``
and ``rlcli env-rollout``; and the ``rlcli env-rollout`` recipe."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rlcli.config.common import ModelConfig, RecipeBase, Section
from rlcli.config.reward import RewardConfig
from rlcli.config.tasks import ReasoningGymSource


class ToolSpec(Section):
    """A tool with options: ``{spec: search, options: {corpus_path: data/wiki.txt}}``."""

    spec: str
    """Built-in name (``calculator``, ``python``, ``search``), ``path/to/file.py:fn`` or ``module:fn``."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the built-in's factory (or for a factory function of yours)."""


class EnvConfig(Section):
    """Tools and the rules of an episode."""

    tools: dict[str, str | ToolSpec] = Field(default_factory=dict)
    """Name the model uses -> tool: ``{Calculator: calculator, Search: {spec: search, options: {...}},
    Weather: recipes/weather.py:lookup}``. May be empty when ``environment`` (or ``environments``) gives the
    tools."""
    environment: str | ToolSpec | None = None
    """A stateful environment (TRL's ``environment_factory`` contract, docs/environments.md): ``path/to/file.py:Class``,
    ``module:Class`` or ``builtin:python_session`` (or ``{spec: ..., options: {...}}``, options passed to the
    constructor). One instance per episode, ``reset(**row)`` before the first turn (a string it returns is
    appended to the prompt); its public methods are the episode's tools (next to ``tools``); ``get_reward()``, when
    it has one, scores the episode (``reward.environment_weight``); a ``done`` attribute set true ends the
    episode. Its code runs in the trainer's process under ``tool_timeout_s``."""
    environments: dict[str, str | ToolSpec] | None = None
    """Several stateful environments by name, ``{game: recipes/game.py:Game, code: builtin:python_session}``: each row
    picks one by its ``environment_column`` (which ``reset`` does not get), and only that one's tools are shown to
    the model. Not with ``environment``."""
    environment_column: str = "environment"
    """``environments`` only: the row column that names an episode's environment."""
    protocol: Literal["tag", "json", "chat"] = "tag"
    """``tag``: ``<request><Name>args<call>`` ... ``output<response>`` ... ``<submit>`` (TRL's TextEnvironment);
    ``json``: ``<tool_call>{"name":..,"arguments":{..}}</tool_call>`` answered in ``<tool_response>``;
    ``chat``: the episode is a chat conversation rendered by the model's own chat template (pretrained chat models):
    a turn ends at the template's end-of-turn token, calls are read by ``tool_call_parser``, and each result is
    the template's ``tool`` message followed by its next generation prompt."""
    tool_call_parser: str = "hermes"
    """``chat`` only: how tool calls are read from an assistant turn. ``hermes``: ``<tool_call>{"name": ..,
    "arguments": {..}}</tool_call>`` (Qwen, Hermes, SmolLM2 after rlcli's SFT recipe); ``llama3_json``: a turn
    that is one JSON object ``{"name": .., "parameters": {..}}``; or ``path/to/file.py:fn`` / ``module:fn``, a
    function from the turn's text to a list of ``rlcli.env.ToolCall`` / ``rlcli.env.Malformed``."""
    system_message: str | None = None
    """``chat`` only: a system message put before every prompt (unless the prompt's messages start with one); the
    tool description is appended to it for templates without tool support."""
    max_turns: int = Field(4, gt=0)
    """Model turns per episode (a call on the last turn is still answered). A turn's budget is
    ``generation.max_new_tokens``."""
    max_tool_output_tokens: int = Field(64, gt=0)
    """Longer tool output is cut (and counted as truncated)."""
    max_length: int = Field(512, gt=1)
    """Cap on the whole episode, prompt included, in tokens."""
    describe_tools: bool = False
    """Put the protocol's tool instructions (rendered from the tools' signatures and docstrings) before each
    prompt. ``chat``: tell the model about the tools: as the template's ``tools`` when it renders them, else as a
    system message in the parser's format."""
    few_shot_prefix: str = ""
    """Text put before every prompt (example episodes, say). Not with ``chat`` (give example turns as messages)."""
    tool_timeout_s: float = Field(10.0, gt=0)
    """A tool call running longer is killed and answered with an error text."""
    tool_isolation: Literal["fork", "inline"] = "fork"
    """``fork``: each call runs in a forked process that is killed, with everything it started, on timeout; its
    memory is capped (``tool_memory_mb``) and its prints are counted, not shown (safe with any tool; ~15 ms per
    call). ``inline``: calls run in the training process (fast; the time limit interrupts Python code on the main
    thread only, and a crash in a tool ends the run: only for tools that bound their own work, like the built-in
    calculator)."""
    tool_memory_mb: int = Field(1024, gt=0)
    """``fork`` only: memory (address space) one call may add to the forked trainer's; past it allocations fail and
    the call is answered ``Error: MemoryError``. Up to 16 calls run at once."""

    @model_validator(mode="after")
    def _some_tools(self) -> "EnvConfig":
        if self.environment is not None and self.environments is not None:
            raise ValueError("give either 'environment' or 'environments', not both")
        if self.environments is not None and not self.environments:
            raise ValueError("'environments' is empty: name at least one")
        if not self.tools and self.environment is None and self.environments is None:
            raise ValueError("give at least one tool (env.tools) or a stateful environment (env.environment)")
        return self

    def environment_specs(self) -> dict[str | None, ToolSpec]:
        """The stateful environments by name (None: the one ``environment``), as specs with options."""
        given = {None: self.environment} if self.environment is not None else dict(self.environments or {})
        return {name: spec if isinstance(spec, ToolSpec) else ToolSpec(spec=spec) for name, spec in given.items()}


class RolloutData(Section):
    """Prompts for ``rlcli env-rollout``."""

    path: str | None = None
    """A local file or directory (jsonl, json, csv, parquet) or a hub dataset id (or, instead, ``reasoning_gym``)."""
    reasoning_gym: ReasoningGymSource | None = None
    """Generate the prompts with reasoning-gym instead of reading ``path``: ``split: train`` the training rows,
    ``split: eval`` the held-out ones (docs/environments.md, "Tasks from reasoning-gym")."""
    split: str = "train"
    """Dataset split (hub datasets; a local directory's files named after it; ``train`` or ``eval`` with
    ``reasoning_gym``)."""
    name: str | None = None
    """Hub dataset configuration name."""
    prompt_field: str | None = None
    """Column with the prompt text (default: prompt, query or text)."""
    max_rows: int | None = Field(None, gt=0)
    """Use the first N rows (default: all)."""

    @model_validator(mode="after")
    def _one_source(self) -> "RolloutData":
        from rlcli.config.errors import RecipeProblems
        from rlcli.config.tasks import task_source_problems

        problems = task_source_problems(self, "data")
        if problems:
            raise RecipeProblems(problems)
        return self


class RolloutGeneration(Section):
    """Sampling for ``rlcli env-rollout`` (which trains nothing, so any cut of the distribution is fine)."""

    max_new_tokens: int = Field(64, gt=0)
    """Token budget of one model turn."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature; 0 = greedy."""
    top_k: int = Field(0, ge=0)
    """Sample among the k most likely tokens (0: all)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Sample among the smallest set of tokens reaching this probability (1.0: all)."""


class EnvRolloutRecipe(RecipeBase):
    """Run episodes of a model with tools, show them and write them to JSONL."""

    output_dir: str
    """Directory this rollout writes into: the resolved recipe (recipe.yaml), the episodes (episodes.jsonl), their
    statistics (summary.json) and, with ``accept_min_reward``, accepted.jsonl. No checkpoints: nothing is trained."""

    model: ModelConfig
    data: RolloutData
    env: EnvConfig
    reward: RewardConfig | None = None
    """Optional: score every episode (as in PPO)."""
    generation: RolloutGeneration = Field(default_factory=RolloutGeneration)
    batch_size: int = Field(32, gt=0)
    """Episodes generated together."""
    show: int = Field(3, ge=0)
    """Histories to render in the terminal."""
    show_tokens: bool = False
    """Render them token by token instead of as text."""
    accept_min_reward: float | None = None
    """Also write ``accepted.jsonl``: the episodes whose reward is at least this (needs ``reward``). Its rows are SFT
    data as they are, so env-rollout -> ``rlcli sft data.path=OUTPUT_DIR/accepted.jsonl`` is rejection sampling
    (expert iteration) with no glue code."""
    overwrite_output_dir: bool = True
    """Replace a previous env-rollout's episodes in output_dir (never a training run's files)."""
