"""The ``rlcli serve-reward`` recipe: a ``reward:`` section (a function or a reward model) and where to serve it."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from rlcli.config.common import Section, variable_name
from rlcli.config.errors import Problem, RecipeProblems
from rlcli.config.reward import RewardConfig


class ServeRewardRecipe(Section):
    """Serve one reward source over HTTP, with the JSON contract ``reward.url`` calls (docs/reward-models.md,
    "Rewards over HTTP"), so that one reward model can score for several runs."""

    reward: RewardConfig
    """What scores: ``function`` or ``model`` (``adapter``: an ``rlcli rm`` LoRA output, loaded as a model of its
    own), with the keys those take (``label``, ``normalize``, ``input``, ``batch_size``: texts per forward pass).
    ``truncate_at`` and ``missing_eos_penalty`` are the calling run's business and are refused here."""
    host: str = "127.0.0.1"
    """Address to listen on. The default answers this machine only; ``0.0.0.0`` (or ``::``) answers every network
    the machine is on: set ``token_env`` then, and ideally ``tls_certfile``."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port; 0: any free port (the address served is printed at start)."""
    path: str = "/score"
    """URL path of the scoring endpoint: clients set ``reward.url: http://HOST:PORT<path>``. ``GET /health``
    answers ``{"status": "ok"}`` (no token needed)."""
    token_env: str | None = None
    """The name of an environment variable holding the bearer token every scoring request must carry
    (``Authorization: Bearer <token>``; clients name theirs in ``reward.token_env``). Unset: no token needed. The
    token is read at start and never printed."""
    max_batch_size: int = Field(256, gt=0)
    """Most responses scored in one call of the reward: requests that arrive together (from one run's concurrent
    requests, or several runs) are merged up to this many. Also the largest request accepted (HTTP 413 beyond:
    lower the client's ``reward.batch_size``)."""
    batch_wait_ms: float = Field(5.0, ge=0)
    """How long the first request of a batch waits for others to join it, in milliseconds (0: score at once)."""
    max_request_mb: float = Field(64.0, gt=0)
    """Largest request body accepted, in MiB (HTTP 413 beyond)."""
    device: str | None = None
    """``reward.model``: where it runs (``cpu``, ``cuda``, ``cuda:1``). Default: CUDA when available, else CPU."""
    tls_certfile: str | None = None
    """Serve ``https``: a PEM certificate (chain) file; needs ``tls_keyfile``. Clients check it (``reward.ca_file``
    for a self-signed one)."""
    tls_keyfile: str | None = None
    """The certificate's private key (PEM)."""

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or value == "/health" or any(c in value for c in "?#{} "):
            raise ValueError("a URL path like /score (starting with /, not /health, no query, braces or spaces)")
        return value

    _variable_name = field_validator("token_env")(variable_name)

    @model_validator(mode="after")
    def _servable(self) -> ServeRewardRecipe:
        r, problems = self.reward, []
        if not r.has_source:
            problems.append(Problem("reward", "give reward.function or reward.model: the scores this service serves"))
        for key, default in (("weight", 1.0), ("environment_weight", 1.0), ("failure_score", 0.0)):
            if getattr(r, key) != default:
                problems.append(Problem(f"reward.{key}", "set it in the recipe of the run that calls this service"))
        if r.url is not None:
            problems.append(Problem("reward.url", "serve-reward serves a reward function or model, not another "
                                                  "service: give reward.function or reward.model"))
        if r.truncate_at:
            problems.append(Problem("reward.truncate_at", "set it in the recipe of the run that calls this service: "
                                                          "it cuts the responses before they are sent"))
        if r.missing_eos_penalty is not None:
            problems.append(Problem("reward.missing_eos_penalty", "set it in the recipe of the run that calls this "
                                                                  "service: only that run knows whether a response "
                                                                  "stopped"))
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            key = "tls_keyfile" if self.tls_keyfile is None else "tls_certfile"
            problems.append(Problem(key, "https needs both tls_certfile and tls_keyfile"))
        if problems:
            raise RecipeProblems(problems)
        return self
