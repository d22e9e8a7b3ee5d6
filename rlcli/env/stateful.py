"""Stateful environments: one object per episode whose public methods are the episode's tools.

The contract is TRL's ``GRPOTrainer(environment_factory=...)``, so the same class runs in rlcli and in TRL
unchanged: constructed with no arguments, ``reset(**row)`` before the first turn, every public method but ``reset``
and ``get_reward`` a tool, ``get_reward()`` scoring the finished episode. rlcli adds ``done``, ``_respond(text)`` and
``_close()`` under names TRL ignores. A failing tool method is answered with an error text; a failing constructor,
``reset``, ``get_reward`` or ``_respond`` fails the episode (``env_error``), never the run. The code runs in the
trainer's process under a ``SIGALRM`` time limit. The contract in full: docs/internals.md, "rlcli/env/stateful.py"
(and docs/environments.md, "Stateful environments").
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rlcli.config.errors import UserError, error_text
from rlcli.env.isolation import ExitCalled, InlineTimeout, run_inline
from rlcli.plugins import resolve_object

RESERVED = ("reset", "get_reward")
BUILTIN_PREFIX = "builtin:"


class EnvironmentFailed(Exception):
    """An episode's environment failed outside a tool call (constructor, reset, get_reward, _respond)."""


def builtin_environments() -> dict[str, Callable[..., Any]]:
    from rlcli.env.python_session import PythonSession
    from rlcli.tasks.openenv import OpenEnvEpisode
    from rlcli.tasks.textarena import TextArenaGame

    return {"python_session": PythonSession, "textarena": TextArenaGame, "openenv": OpenEnvEpisode}


def resolve_environment(spec: str, options: Mapping[str, Any] | None = None, *, key: str) -> Callable[[], Any]:
    """The factory a recipe names: ``builtin:python_session``, ``path/to/file.py:Class`` or ``module:Class``, with
    ``options`` bound as constructor keyword arguments. ``UserError`` naming ``key`` when it does not resolve."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        builtins = builtin_environments()
        if name not in builtins:
            raise UserError(f"unknown built-in environment {spec!r}; built-in: "
                            f"{', '.join(BUILTIN_PREFIX + n for n in builtins)}", key=key)
        factory = builtins[name]
    else:
        if ":" not in spec:
            raise UserError(f"{spec!r} is not 'path/to/file.py:ClassName', 'package.module:ClassName' or "
                            f"'{BUILTIN_PREFIX}NAME'", key=key)
        try:
            factory = resolve_object(spec, what="environment")
        except UserError as exc:
            raise UserError(str(exc), key=key) from None
    if not callable(factory):
        raise UserError(f"{spec!r} is a {type(factory).__name__}, not a class", key=key)
    return functools.partial(factory, **options) if options else factory


def public_methods(instance: Any) -> dict[str, Callable[..., Any]]:
    """The tools of an environment instance, as TRL finds them: bound methods whose names do not start with ``_``,
    but ``reset`` and ``get_reward``, by name."""
    return {name: member for name, member in inspect.getmembers(instance, predicate=inspect.ismethod)
            if name not in RESERVED and not name.startswith("_")}


@dataclass(frozen=True)
class EnvironmentKind:
    """One named environment of a recipe: its factory, the names of its tools and whether it owns a reward
    (found on a probe instance, as TRL does)."""

    name: str | None
    factory: Callable[[], Any]
    tool_names: tuple[str, ...]
    owns_reward: bool
    responds: bool = False
    probe: Any = field(repr=False, default=None)
    protocol: Any = None
    """The protocol its episodes use, when it differs from the environment's (chat: its own tool schemas)."""
    system_prompt: str | None = None
    """The text put before its prompts (its tools described), when it differs from the environment's."""

    def tools(self) -> dict[str, Callable[..., Any]]:
        """Its tools, bound to the probe instance: for schemas and system prompts, never called."""
        return public_methods(self.probe)

    @classmethod
    def probe_factory(cls, name: str | None, factory: Callable[[], Any], *, key: str) -> EnvironmentKind:
        """Construct one instance to check the class (a callable ``reset``) and list its tools."""
        try:
            instance = factory()
        except Exception as exc:  # noqa: BLE001 - a constructor's bug is a recipe problem
            raise UserError(f"constructing the environment failed: {error_text(exc)}", key=key) from None
        if not callable(getattr(instance, "reset", None)):
            raise UserError(f"{type(instance).__name__} has no reset method (the environment_factory contract: "
                            "reset(**row) -> str | None)", key=key)
        tools = public_methods(instance)
        has_reward = callable(getattr(instance, "get_reward", None))
        responds = callable(getattr(instance, "_respond", None))
        close = getattr(instance, "_close", None)
        if callable(close):  # the probe never runs an episode
            try:
                close()
            except Exception:  # noqa: BLE001
                pass
        return cls(name, factory, tuple(tools), has_reward, responds, instance)


class EpisodeEnvironment:
    """One episode's environment instance: its tools (bound methods; ``async`` ones run on the episode's own event
    loop), its lifecycle calls under a time limit, and how it failed, if it did."""

    def __init__(self, kind: EnvironmentKind, timeout_s: float):
        self.kind = kind
        self.timeout_s = timeout_s
        self.error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.instance = self._call(kind.factory, "constructing it")
        self.tools = {name: self._sync(method) for name, method in public_methods(self.instance).items()}

    # lifecycle ---------------------------------------------------------------------------------------------------

    def reset(self, row: Mapping[str, Any]) -> str | None:
        observation = self._call(lambda: self.instance.reset(**row), "reset")
        if observation is not None and not isinstance(observation, str):
            raise EnvironmentFailed(f"reset returned {type(observation).__name__}, expected str or None")
        return observation

    @property
    def responds(self) -> bool:
        return self.kind.responds

    @property
    def done(self) -> bool:
        try:
            return bool(getattr(self.instance, "done", False))
        except Exception:  # noqa: BLE001 - a property that raises does not end the episode
            return False

    def respond(self, text: str) -> str | None:
        """The environment's observation after a turn that called no tool (``_respond``), or None."""
        hook = getattr(self.instance, "_respond", None)
        if not callable(hook):
            return None
        observation = self._call(lambda: hook(text), "_respond")
        if observation is not None and not isinstance(observation, str):
            raise EnvironmentFailed(f"_respond returned {type(observation).__name__}, expected str or None")
        return observation

    def reward(self) -> float | None:
        """``get_reward()`` as a float, None when the environment has none."""
        if not self.kind.owns_reward:
            return None
        value = self._call(self.instance.get_reward, "get_reward")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise EnvironmentFailed(f"get_reward returned {type(value).__name__}, expected a float") from None
        if not math.isfinite(value):
            raise EnvironmentFailed(f"get_reward returned {value}, expected a finite float")
        return value

    def close(self) -> None:
        close = getattr(self.instance, "_close", None) if hasattr(self, "instance") else None
        try:
            if callable(close):
                self._call(close, "_close")
        except EnvironmentFailed:
            pass  # the episode is over: nothing left to fail
        finally:
            if self._loop is not None:
                self._loop.close()
                self._loop = None

    # running its code ---------------------------------------------------------------------------------------------

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        """``fn()`` (awaited when it returns a coroutine) under the time limit; ``EnvironmentFailed`` otherwise."""
        def job():
            try:
                return True, self._await(fn())
            except InlineTimeout:
                raise
            except ExitCalled as exc:
                return False, f"Error: it called os._exit({exc.code})"
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - any failure of the environment's code
                return False, error_text(exc)

        ran = run_inline(job, self.timeout_s)
        if ran.timed_out:
            self._drop_loop()
            raise EnvironmentFailed(f"{what}: did not finish within {self.timeout_s:g} s")
        ok, value = ran.answer
        if not ok:
            raise EnvironmentFailed(f"{what}: {value}")
        return value

    def _sync(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """A tool method as ``ToolRunner`` calls it: a plain call whose coroutine, if any, is awaited here."""
        @functools.wraps(method)
        def tool(*args, **kwargs):
            try:
                value = self._await(method(*args, **kwargs))
            except InlineTimeout:
                self._drop_loop()
                raise
            return value if isinstance(value, str) else str(value)  # TRL's rule: any result is shown as str()

        return tool

    def _await(self, value: Any) -> Any:
        if not inspect.isawaitable(value):
            return value
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(_as_coroutine(value))

    def _drop_loop(self) -> None:
        """After a time limit interrupted it: the loop may hold a half-run task; the next call gets a fresh one."""
        if self._loop is not None:
            try:
                for task in asyncio.all_tasks(self._loop):
                    task.cancel()
                self._loop.close()
            except Exception:  # noqa: BLE001
                pass
            self._loop = None


async def _as_coroutine(awaitable):
    return await awaitable


class Environments:
    """The recipe's environment(s): one ``EnvironmentKind``, or several chosen per row by ``column``."""

    def __init__(self, kinds: Mapping[str | None, EnvironmentKind], column: str, timeout_s: float):
        self.kinds = dict(kinds)
        self.column = column
        self.timeout_s = timeout_s

    @property
    def multiple(self) -> bool:
        return None not in self.kinds

    @property
    def owns_reward(self) -> bool:
        return any(k.owns_reward for k in self.kinds.values())

    def kind_of(self, row: Mapping[str, Any]) -> EnvironmentKind:
        if not self.multiple:
            return self.kinds[None]
        name = row.get(self.column)
        if name not in self.kinds:
            raise UserError(f"a row's {self.column!r} is {name!r}; the recipe's environments are "
                            f"{', '.join(map(repr, self.kinds))}", key="env.environments")
        return self.kinds[name]

    def reset_arguments(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """What ``reset`` gets: the row; with several environments, without the column that chose one (TRL)."""
        return {k: v for k, v in row.items() if not (self.multiple and k == self.column)}


def append_to_prompt(prompt, text: str):
    """``prompt`` with ``text`` appended: to the string, or to the last message's content (TRL's rule)."""
    if isinstance(prompt, str):
        return prompt + text
    messages = [dict(m) for m in prompt]
    if not messages:
        return [{"role": "user", "content": text}]
    content = messages[-1].get("content")
    messages[-1]["content"] = (content or "") + text if not isinstance(content, list) else \
        content + [{"type": "text", "text": text}]
    return messages
