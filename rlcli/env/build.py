"""Build a text environment from an ``env:`` recipe section, and check that section before any weights load."""

from __future__ import annotations

from typing import Callable

from rlcli.config.env import EnvConfig, ToolSpec
from rlcli.config.errors import UserError
from rlcli.env.environment import TextEnvironment
from rlcli.rl.sampling import SamplingRules
from rlcli.env.protocols import JsonProtocol, TagProtocol
from rlcli.env.tools import load_tool


def _build_tool(name: str, spec: str | ToolSpec) -> Callable[..., str]:
    spec = spec if isinstance(spec, ToolSpec) else ToolSpec(spec=spec)
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
    """Problems with the env section (unknown tools, bad plug-in paths), for --dry-run."""
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
    return TextEnvironment(
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
