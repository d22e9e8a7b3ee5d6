"""Build a text environment from an ``env:`` recipe section, and check that section before any weights load."""

from __future__ import annotations

from typing import Callable

from rlcli.config.env import EnvConfig, ToolSpec
from rlcli.config.errors import UserError
from rlcli.env.builtin_tools import sandbox_problem
from rlcli.env.environment import TextEnvironment
from rlcli.rl.sampling import SamplingRules
from rlcli.env.protocols import JsonProtocol, TagProtocol
from rlcli.env.tools import load_tool


def _tool_spec(spec: str | ToolSpec) -> ToolSpec:
    return spec if isinstance(spec, ToolSpec) else ToolSpec(spec=spec)


def _build_tool(name: str, spec: str | ToolSpec) -> Callable[..., str]:
    spec = _tool_spec(spec)
    try:
        return load_tool(spec.spec, **spec.options)
    except ValueError as exc:
        raise UserError(f"env.tools.{name}: {exc}") from None


def build_tools(cfg: EnvConfig) -> dict[str, Callable[..., str]]:
    """Name -> callable; ``UserError`` naming the tool whose spec does not resolve."""
    return {name: _build_tool(name, spec) for name, spec in cfg.tools.items()}


def build_protocol(cfg: EnvConfig):
    return TagProtocol() if cfg.protocol == "tag" else JsonProtocol()


def check_env(cfg: EnvConfig) -> list[str]:
    """Problems with the env section (unknown tools, bad plug-in paths, a python tool with no sandbox and no
    ``allow_unsandboxed`` opt-in), for --dry-run."""
    problems = []
    for name, spec in cfg.tools.items():
        try:
            _build_tool(name, spec)
        except UserError as exc:
            problems.append(str(exc))
    return problems


def build_environment(cfg: EnvConfig, model, tokenizer, *, rules: SamplingRules, eos_token_id=None) -> TextEnvironment:
    """A ``TextEnvironment`` for ``model`` (a Hugging Face causal LM) with the recipe's tools and rules."""
    tools = build_tools(cfg)
    protocol = build_protocol(cfg)
    env = TextEnvironment(
        model, tokenizer, tools, protocol,
        max_turns=cfg.max_turns,
        max_new_tokens=cfg.max_new_tokens,
        max_tool_output_tokens=cfg.max_tool_output_tokens,
        max_length=cfg.max_length,
        few_shot_prefix=cfg.few_shot_prefix,
        system_prompt=protocol.system_prompt(tools) if cfg.system_prompt else "",
        rules=rules,
        eos_token_id=eos_token_id,
        tool_timeout_s=cfg.tool_timeout_s,
        tool_isolation=cfg.tool_isolation,
    )
    env.runner.memory_mb = cfg.tool_memory_mb  # TextEnvironment has no argument for it; the runner reads it per call
    return env


def sandbox_notes(cfg: EnvConfig) -> list[str]:
    """Run-header lines: how the env section's tools are contained. Says so loudly when a ``python`` tool runs
    model-written code unsandboxed (no working bubblewrap, recipe opted in with ``allow_unsandboxed``)."""
    notes = []
    python_tools = [name for name, spec in cfg.tools.items() if _tool_spec(spec).spec == "python"]
    if python_tools:
        names, problem = ", ".join(python_tools), sandbox_problem()
        if problem is None:
            notes.append(f"tool {names}: model-written code runs in a bubblewrap sandbox (no network, no host files "
                         "but the system, own pid namespace, clean environment)")
        else:
            notes.append(f"tool {names}: UNSANDBOXED: model-written code runs with this user's files, network and "
                         f"environment ({problem}; allowed by allow_unsandboxed: true)")
    if cfg.tool_isolation == "fork":
        notes.append(f"tool calls: forked, killed with all they started after {cfg.tool_timeout_s:g} s, up to "
                     f"{cfg.tool_memory_mb} MB more memory each, prints counted, not shown")
    else:
        notes.append(f"tool calls: inline in this process; Python code is interrupted after {cfg.tool_timeout_s:g} s, "
                     "a call stuck in C code is not, a crash ends the run")
    return notes
