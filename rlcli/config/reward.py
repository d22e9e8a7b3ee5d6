"""The ``reward:`` section, shared by ``rlcli ppo`` and ``rlcli env-rollout`` (its own module, so neither recipe
module imports the other)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from rlcli.config.common import Section, variable_name
from rlcli.config.errors import Problem, RecipeProblems

# keys that only mean something for a reward service (``url``), with their defaults: set to anything else without a
# url, they are refused (compared with the default, not "was it written": a resolved recipe.yaml holds every key)
SERVICE_KEYS = {"token_env": None, "timeout_s": 60.0, "max_concurrency": 4, "retries": 3, "retry_backoff_s": 1.0,
                "verify_tls": True, "ca_file": None}
# keys of a reward model's reading that a service decides for itself
MODEL_KEYS = {"label": None, "normalize": False, "input": "prompt_and_response"}


class RewardConfig(Section):
    """Where scores come from: a Python function, a sequence-classifier reward model, a reward-model LoRA adapter
    on the policy's own base, or an HTTP reward service (one of them), and a stateful environment's own
    ``get_reward()`` (``env.environment``): an episode scores ``weight`` × the source's score +
    ``environment_weight`` × the environment's. With an environment that owns the reward the source may be left
    out."""

    function: str | None = None
    """``path/to/file.py:name`` or ``module:name``: called with the keyword arguments it declares among
    ``prompts``, ``responses``, ``rows`` (dataset rows), ``answers`` and ``histories`` (text environments),
    returning one float per sample."""
    model: str | None = None
    """Reward model: an ``rlcli rm`` output dir or a hub id of a sequence classifier. Loaded as a model of its own
    (a LoRA reward model is merged into a copy of its base)."""
    adapter: str | None = None
    """Multi-adapter RLHF: the output dir of an ``rlcli rm`` run with ``lora:`` trained on the same base model as
    this LoRA policy (``model.name_or_path``) with the same tokenizer. Only one copy of the base is held: the policy
    adapter trains, the reference is the base with every adapter off, and the reward is the base with this adapter
    on (frozen), read by its score head at the last real token. Needs ``lora:``; checked by ``--dry-run``.
    (``rlcli env-rollout`` has no policy adapter to share a base with and loads it like ``model``.)"""
    label: str | int | None = None
    """Output of the reward model to use: index or label name (``POSITIVE``, ``nothate``). Default: the only /
    first output. A reward adapter's score head has unnamed outputs: give an index."""
    normalize: bool = False
    """Normalise reward-model (or reward-adapter) scores with the mean/std saved by ``rlcli rm``."""
    url: str | None = None
    """An HTTP(S) reward service, e.g. ``http://127.0.0.1:8000/score`` (``rlcli serve-reward`` serves one): each
    batch of ``batch_size`` responses is POSTed as JSON ``{"prompts", "responses", "rows"}`` (plus ``answers`` in a
    text environment) and the service answers ``{"scores": [one number per response], "info": [optional, one object
    per response]}`` (docs/reward-models.md, "Rewards over HTTP"). ``truncate_at`` and ``missing_eos_penalty``
    apply as for any source. A service that keeps failing stops the run with one error naming it."""
    token_env: str | None = None
    """``url`` only: the name of an environment variable that holds a bearer token, sent as ``Authorization: Bearer
    <token>``. Only the variable's name is in the recipe: the token is never written to recipe.yaml, logs or
    metrics. Checked by ``--dry-run`` (the variable must be set and not empty)."""
    timeout_s: float = Field(60.0, gt=0)
    """``url`` only: seconds one request may take (connect, wait, read the answer) before it counts as failed (and
    is retried)."""
    max_concurrency: int = Field(4, gt=0)
    """``url`` only: requests in flight at once, per process."""
    retries: int = Field(3, ge=0)
    """``url`` only: how often a request is retried after a connection error, a timeout or an HTTP 5xx / 429 answer,
    waiting ``retry_backoff_s``, then 2×, 4×, ... that (±25 %) before each retry. Other failures (401 / 403, other
    4xx, an answer that is not the contract's) are not retried. Then the run stops with one error; a PPO run continues
    from its last checkpoint with ``--resume`` once the service is back."""
    retry_backoff_s: float = Field(1.0, ge=0)
    """``url`` only: the wait before the first retry (doubled for each next one)."""
    verify_tls: bool = True
    """``url`` only: check an ``https`` service's certificate and host name (against ``ca_file``, else the system's
    CAs). ``false`` sends the prompts, responses and token to whoever answers: only for a test service."""
    ca_file: str | None = None
    """``url`` only: a PEM file of the CA (or self-signed certificate) an ``https`` service's certificate is checked
    against, instead of the system's CAs."""
    batch_size: int = Field(32, gt=0)
    """Texts per reward-model forward pass; with ``url``: responses per request."""
    input: Literal["prompt_and_response", "response"] = "prompt_and_response"
    """What the reward model reads."""
    truncate_at: list[str] = Field(default_factory=list)
    """'EOS trick': score the response cut at the first of these strings (in addition to stop strings)."""
    missing_eos_penalty: float | None = None
    """Score given to responses that did not stop (no EOS / stop string) instead of their reward."""
    weight: float = 1.0
    """Multiplies the source's score (function, model, adapter or url) before the environment's is added."""
    environment_weight: float = 1.0
    """Multiplies a stateful environment's ``get_reward()`` (``env.environment``) before it is added to the source's
    weighted score (1.0, as TRL's ``environment_factory``, whose ``reward_weights`` apply to ``reward_funcs``
    only)."""
    failure_score: float = 0.0
    """The score of an episode whose stateful environment failed (its constructor, ``reset``, ``get_reward`` or
    ``_respond`` raised or ran past ``env.tool_timeout_s``), instead of any other."""

    @field_validator("url")
    @classmethod
    def _service_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"must start with http:// or https:// (got scheme {parts.scheme or 'none'!r})")
        if not parts.hostname:
            raise ValueError("names no host (expected e.g. http://127.0.0.1:8000/score)")
        if parts.username is not None or parts.password is not None:
            # they would be written to recipe.yaml and shown in errors; a token has its own, unwritten, place
            raise ValueError("must not hold credentials (user:password@): put a token in an environment variable and "
                             "name it in reward.token_env")
        return value

    _variable_name = field_validator("token_env")(variable_name)

    @property
    def has_source(self) -> bool:
        return any(v is not None for v in (self.function, self.model, self.adapter, self.url))

    @model_validator(mode="after")
    def _one_source(self) -> "RewardConfig":
        given = {k: v for k, v in (("function", self.function), ("model", self.model), ("adapter", self.adapter),
                                   ("url", self.url)) if v is not None}
        if len(given) > 1:  # none: only with an environment that owns the reward (checked by the recipes)
            got = ", ".join(f"{k}={v!r}" for k, v in given.items())
            raise ValueError(f"give exactly one of 'function', 'model', 'adapter' or 'url'; got {got}")
        problems = []
        if self.url is None:
            problems += [Problem(f"reward.{k}", f"only used with reward.url (a reward service); got "
                                                f"{getattr(self, k)!r}")
                         for k, default in SERVICE_KEYS.items() if getattr(self, k) != default]
        else:
            problems += [Problem(f"reward.{k}", f"not used with reward.url: the service decides how it reads the texts "
                                                f"(got {getattr(self, k)!r})")
                         for k, default in MODEL_KEYS.items() if getattr(self, k) != default]
        if problems:
            raise RecipeProblems(problems)
        return self
