"""OpenEnv environments as stateful environments: ``env.environment: {spec: builtin:openenv, options: {...}}``
(``pip install 'rlcli[openenv]'``, then ``pip install --no-deps openenv==0.10.0``).

In-process from an ``Environment`` class (``environment: file.py:MyEnv``), or remote through OpenEnv's client
(``url:``), one instance or WebSocket session per episode. The model acts by calling a tool whose arguments are the
Action's fields (``action: tool``) or with each plain turn as the action (``action: text``); the observation's
``done`` ends the episode and its step rewards make the episode's reward. A failure of the environment fails its
episode, never the run. The options in full: docs/internals.md, "rlcli/tasks/openenv.py".
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import threading
import types
import typing
from typing import Any

EXTRA = "pip install 'rlcli[openenv]' && pip install --no-deps openenv==0.10.0"
JSON_TYPES = {"string": str, "integer": int, "number": float, "boolean": bool, "array": list, "object": dict}
HIDDEN = ("done", "reward", "metadata")

_sessions: dict[str, threading.BoundedSemaphore] = {}
_sessions_lock = threading.Lock()
_schemas: dict[str, dict] = {}


def missing_package() -> str | None:
    if importlib.util.find_spec("openenv") is None:
        return f"needs the openenv package, which is not installed: {EXTRA}"
    return None


def _slots(url: str, size: int) -> threading.BoundedSemaphore:
    with _sessions_lock:
        if url not in _sessions:
            _sessions[url] = threading.BoundedSemaphore(size)
        return _sessions[url]


def remote_action_schema(url: str, timeout_s: float) -> dict:
    """The JSON schema of the actions a server accepts (its ``/schema``), cached per URL."""
    if url not in _schemas:
        import requests

        try:
            answer = requests.get(url.rstrip("/") + "/schema", timeout=timeout_s)
            answer.raise_for_status()
            _schemas[url] = answer.json()["action"]
        except Exception as exc:  # noqa: BLE001 - any failure to reach it, said in one line
            raise ValueError(f"the OpenEnv server at {url} did not give its action schema (GET /schema: "
                             f"{type(exc).__name__}: {exc}); start the server first") from None
    return _schemas[url]


def action_class_of(env_cls, given: str | None):
    """The Action class an in-process environment's ``step`` takes."""
    if given is not None:
        from rlcli.plugins import resolve_object

        return resolve_object(given, what="OpenEnv action class")
    from openenv.core import Action

    try:
        hints = typing.get_type_hints(env_cls.step)
    except Exception:  # noqa: BLE001
        hints = {}
    cls = hints.get("action")
    if not (isinstance(cls, type) and issubclass(cls, Action)):
        raise ValueError(f"{env_cls.__name__}.step does not annotate its action with an openenv Action class; name "
                         "it in options.action_class (path/to/file.py:MyAction)")
    return cls


def _python_type(prop: dict) -> type:
    kind = prop.get("type")
    if kind is None and "anyOf" in prop:  # Optional[X]: the first non-null alternative
        kinds = [p.get("type") for p in prop["anyOf"] if p.get("type") != "null"]
        kind = kinds[0] if kinds else None
    return JSON_TYPES.get(kind, str)


def _action_fields(schema: dict) -> tuple[dict[str, dict], list[str]]:
    props = {k: v for k, v in schema.get("properties", {}).items() if k != "metadata"}
    return props, [k for k in schema.get("required", []) if k in props]


def _observation_text(observation: dict, field: str | None) -> str:
    if field is not None:
        value = observation.get(field)
        if value is None:
            raise ValueError(f"the observation has no field {field!r} (it has {', '.join(observation)}); set "
                             "options.observation_field")
        return value if isinstance(value, str) else json.dumps(value)
    shown = {k: v for k, v in observation.items() if k not in HIDDEN}
    if len(shown) == 1:
        (value,) = shown.values()
        return value if isinstance(value, str) else json.dumps(value)
    return json.dumps(shown)


class OpenEnvEpisode:
    """One OpenEnv episode (see the module docstring); options are the keyword arguments."""

    def __init__(self, environment: str | None = None, environment_options: dict | None = None,
                 url: str | None = None, action: str = "tool", tool_name: str = "act",
                 action_field: str | None = None, action_class: str | None = None,
                 observation_field: str | None = None, reward: str = "sum", reset_keys: list[str] | None = None,
                 max_sessions: int = 8, connect_timeout_s: float = 10.0, message_timeout_s: float = 30.0):
        why = missing_package()
        if why is not None:
            raise ValueError(f"builtin:openenv {why}")
        if (environment is None) == (url is None):
            raise ValueError("give options.environment (an Environment class, run in this process) or options.url "
                             "(a running OpenEnv server), one of them")
        if action not in ("tool", "text"):
            raise ValueError(f"options.action is 'tool' or 'text', got {action!r}")
        if reward not in ("sum", "last"):
            raise ValueError(f"options.reward is 'sum' or 'last', got {reward!r}")
        if max_sessions < 1:
            raise ValueError(f"options.max_sessions must be at least 1, got {max_sessions}")
        self.url, self.mode, self.how = url, action, reward
        self.observation_field = observation_field
        self.reset_keys = list(reset_keys if reset_keys is not None else ["seed"])
        self.max_sessions = max_sessions
        self.connect_timeout_s, self.message_timeout_s = connect_timeout_s, message_timeout_s
        self.done = False
        self.rewards: list[float] = []
        self.failure: str | None = None
        self._env = self._client = self._slot = None
        if url is None:
            from rlcli.plugins import resolve_object

            self._env_cls = resolve_object(environment, what="OpenEnv environment")
            self._env_options = dict(environment_options or {})
            self._action_cls = action_class_of(self._env_cls, action_class)
            schema = self._action_cls.model_json_schema()
        else:
            if environment_options or action_class:
                raise ValueError("options.environment_options and action_class are for an in-process environment "
                                 "(options.environment), not a server")
            schema = remote_action_schema(url, connect_timeout_s)
        self._fields, required = _action_fields(schema)
        if action == "text":
            strings = [k for k in required if _python_type(self._fields[k]) is str]
            self.action_field = action_field or (strings[0] if len(strings) == 1 else None)
            if self.action_field is None or self.action_field not in self._fields:
                raise ValueError(f"options.action_field: which field of the action gets the model's text? (fields: "
                                 f"{', '.join(self._fields) or 'none'})")
            self._respond = self._respond_text  # a plain turn is the action: no tool
        else:
            setattr(self, tool_name, types.MethodType(_tool_function(tool_name, schema, self._fields, required),
                                                      self))

    # the environment_factory contract -----------------------------------------------------------------------------

    def reset(self, **row: Any) -> str:
        kwargs = {k: row[k] for k in self.reset_keys if k in row}
        if self.url is None:
            self._env = self._env_cls(**self._env_options)
            observation = _as_dict(self._env.reset(**kwargs))
        else:
            self._slot = _slots(self.url, self.max_sessions)
            if not self._slot.acquire(timeout=self.connect_timeout_s):
                self._slot = None
                raise RuntimeError(f"no OpenEnv session free within {self.connect_timeout_s:g} s (options."
                                   f"max_sessions={self.max_sessions} open in this process; episodes generated "
                                   "together need one each)")
            from openenv.core import GenericEnvClient

            self._client = GenericEnvClient(base_url=self.url, connect_timeout_s=self.connect_timeout_s,
                                            message_timeout_s=self.message_timeout_s).sync()
            result = self._client.reset(**kwargs)
            observation = {**(result.observation or {}), "done": result.done, "reward": result.reward}
        self._record(observation, first=True)
        return "\n" + _observation_text(observation, self.observation_field)

    def get_reward(self) -> float:
        if self.failure is not None:  # a broken session fails the episode, not only the call
            raise RuntimeError(self.failure)
        if not self.rewards:
            return 0.0
        return float(sum(self.rewards) if self.how == "sum" else self.rewards[-1])

    def _close(self) -> None:
        try:
            if self._client is not None:
                self._client.close()
            elif self._env is not None and callable(getattr(self._env, "close", None)):
                self._env.close()
        finally:
            self._client = self._env = None
            if self._slot is not None:
                self._slot.release()
                self._slot = None

    # acting ------------------------------------------------------------------------------------------------------

    def _respond_text(self, text: str) -> str:
        return self._step({self.action_field: text.strip()})

    def _step(self, fields: dict) -> str:
        if self.done:
            return "The episode is over."
        try:
            if self.url is None:
                observation = _as_dict(self._env.step(self._action_cls(**fields)))
            else:
                result = self._client.step(fields)
                observation = {**(result.observation or {}), "done": result.done, "reward": result.reward}
        except Exception as exc:  # noqa: BLE001 - the environment failed: this episode is lost
            if self.mode == "tool" and _is_bad_action(exc):
                raise  # the model's arguments: an error text for the model, the episode goes on
            self.failure = f"the environment failed: {type(exc).__name__}: {exc}"
            self.done = True
            raise RuntimeError(self.failure) from None
        self._record(observation)
        return _observation_text(observation, self.observation_field)

    def _record(self, observation: dict, first: bool = False) -> None:
        reward = observation.get("reward")
        if reward is not None and not first:
            self.rewards.append(float(reward))
        if observation.get("done"):
            self.done = True


def _is_bad_action(exc: Exception) -> bool:
    """An action the environment's Action type refused (the model's mistake), as opposed to a broken environment."""
    from pydantic import ValidationError

    return isinstance(exc, (ValidationError, TypeError)) or "VALIDATION_ERROR" in str(exc)


def _as_dict(observation) -> dict:
    return observation.model_dump() if hasattr(observation, "model_dump") else dict(observation)


def _tool_function(name: str, schema: dict, fields: dict[str, dict], required: list[str]):
    """A tool method whose signature and docstring are the Action's fields (what ``rlcli.toolcalls.tool_schema``
    describes to the model)."""
    ordered = sorted(fields, key=lambda k: k not in required)  # required ones first: a signature needs that
    fields = {k: fields[k] for k in ordered}
    names = list(fields)

    def act(self, *args, **arguments):
        # the tag protocol passes its one argument positionally: it fills the fields in order
        return self._step({**dict(zip(names, args)), **arguments})

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_python_type(v),
                                 **({} if k in required else {"default": v.get("default")}))
               for k, v in fields.items()]
    act.__signature__ = inspect.Signature(params)
    act.__annotations__ = {k: _python_type(v) for k, v in fields.items()}
    act.__name__ = act.__qualname__ = name
    described = [f"    {k}: {v['description']}" for k, v in fields.items() if v.get("description")]
    summary = (schema.get("description") or f"Act in the environment ({schema.get('title', 'Action')}).").strip()
    summary = " ".join(summary.split("\n\n")[0].split())
    act.__doc__ = summary + ("\n\nArgs:\n" + "\n".join(described) if described else "")
    return act
