"""Build a text environment from an ``env:`` recipe section, and check that section before any weights load."""

from __future__ import annotations

import dataclasses

from typing import Callable

from rlcli.config.env import EnvConfig, ToolSpec
from rlcli.config.errors import Problem, UserError
from rlcli.launch import is_main_process
from rlcli.chat_template import ChatTemplate, ChatTemplateError
from rlcli.env.sandbox import sandbox_problem
from rlcli.env.environment import TextEnvironment
from rlcli.env.protocols import ChatProtocol, JsonProtocol, TagProtocol
from rlcli.env.stateful import EnvironmentKind, Environments, resolve_environment
from rlcli.env.tools import load_tool
from rlcli.rl.sampling import SamplingRules
from rlcli.toolcalls import load_parser, schemas_for


def _tool_spec(spec: str | ToolSpec) -> ToolSpec:
    return spec if isinstance(spec, ToolSpec) else ToolSpec(spec=spec)


def _build_tool(name: str, spec: str | ToolSpec) -> Callable[..., str]:
    spec = _tool_spec(spec)
    try:
        return load_tool(spec.spec, **spec.options)
    except ValueError as exc:
        raise UserError(str(exc), key=f"env.tools.{name}") from None


def build_tools(cfg: EnvConfig) -> dict[str, Callable[..., str]]:
    """Name -> callable; ``UserError`` naming the tool whose spec does not resolve."""
    return {name: _build_tool(name, spec) for name, spec in cfg.tools.items()}


def environment_key(name: str | None) -> str:
    return "env.environment" if name is None else f"env.environments.{name}"


def build_environments(cfg: EnvConfig, tools: dict[str, Callable] | None = None) -> Environments | None:
    """The recipe's stateful environments (each class probed with one instance, as TRL does), or None;
    ``UserError`` naming the key of one that does not resolve or whose tools clash with ``env.tools``."""
    specs = cfg.environment_specs()
    if not specs:
        return None
    tools = build_tools(cfg) if tools is None else tools
    kinds = {}
    for name, spec in specs.items():
        key = environment_key(name)
        try:
            factory = resolve_environment(spec.spec, spec.options, key=key)
        except TypeError as exc:
            raise UserError(f"{spec.spec!r}: bad options {sorted(spec.options)}: {exc}", key=key) from None
        kind = EnvironmentKind.probe_factory(name, factory, key=key)
        clash = sorted(set(kind.tool_names) & set(tools))
        if clash:
            raise UserError(f"its methods {', '.join(clash)} have the names of env.tools entries; rename one",
                            key=key)
        if not kind.tool_names and not tools and not kind.responds:
            # an environment that answers plain turns (_respond: a game played in text) needs no tools
            raise UserError(f"{type(kind.probe).__name__} has no public methods, so the model has no tools; add a "
                            "method, a _respond method or env.tools", key=key)
        kinds[name] = kind
    return Environments(kinds, cfg.environment_column, cfg.tool_timeout_s)


def env_owns_reward(cfg: EnvConfig) -> bool:
    """Whether a stateful environment of the recipe has ``get_reward`` (False when none resolves)."""
    try:
        envs = build_environments(cfg)
    except UserError:
        return False
    return envs is not None and envs.owns_reward


def _all_tools(tools: dict[str, Callable], envs: Environments | None) -> dict[str, Callable]:
    every = dict(tools)
    for kind in (envs.kinds.values() if envs is not None else ()):
        every.update(kind.tools())
    return every


def build_protocol(cfg: EnvConfig, tokenizer=None, tools: dict[str, Callable] | None = None,
                   envs: Environments | None = None):
    """The recipe's protocol; ``chat`` needs the tokenizer (its template is probed and checked here, so a template
    that cannot reproduce episodes is refused before any rollout) and the tools (a stateful environment's
    methods included)."""
    if cfg.protocol == "tag":
        return TagProtocol()
    if cfg.protocol == "json":
        return JsonProtocol()
    if tokenizer is None:
        raise ValueError("the chat protocol needs the tokenizer")
    tools = build_tools(cfg) if tools is None else tools
    envs = build_environments(cfg, tools) if envs is None else envs
    tools = _all_tools(tools, envs)
    try:
        template = ChatTemplate.of(tokenizer)
        parser = load_parser(cfg.tool_call_parser)
        schemas = schemas_for(tools) if cfg.describe_tools else None
        template.check(schemas or schemas_for(tools), parser, cfg.system_message)
    except ChatTemplateError as exc:
        raise UserError(f"env.protocol chat: {exc}. Multi-turn episodes need a template that renders every turn "
                        "exactly as it was written (edit chat_template.jinja or tokenizer_config.json in the model "
                        "directory)") from None
    except UserError as exc:
        raise UserError(f"env.tool_call_parser: {exc}") from None
    return ChatProtocol(template, parser, schemas, cfg.system_message)


def check_env(cfg: EnvConfig) -> list[Problem]:
    """Problems with the env section (unknown tools, bad plug-in paths, a python tool with no sandbox and no
    ``allow_unsandboxed`` opt-in), for --dry-run."""
    problems = []
    for name, spec in cfg.tools.items():
        try:
            _build_tool(name, spec)
        except UserError as exc:
            problems.append(exc.problem())
    if not problems:
        try:
            build_environments(cfg)
        except UserError as exc:
            problems.append(exc.problem())
    if cfg.environments is None and cfg.environment_column != EnvConfig.model_fields["environment_column"].default:
        problems.append(Problem("env.environment_column", "only used with env.environments (several environments)"))
    if cfg.protocol == "chat":
        try:
            load_parser(cfg.tool_call_parser)
        except UserError as exc:
            problems.append(Problem("env.tool_call_parser", str(exc)))
        if cfg.few_shot_prefix:
            problems.append(Problem("env.few_shot_prefix", "not used with protocol chat (the template renders the "
                                                           "whole prompt; put example turns into the prompt's "
                                                           "messages)"))
    else:
        defaults = EnvConfig.model_fields
        for key in ("tool_call_parser", "system_message"):
            if getattr(cfg, key) != defaults[key].default:
                problems.append(Problem(f"env.{key}", "only used with protocol chat (this recipe has protocol "
                                                      f"{cfg.protocol})"))
    return problems


def build_environment(cfg: EnvConfig, model, tokenizer, *, rules: SamplingRules, max_new_tokens: int,
                      eos_token_id=None, protocol=None, engine=None) -> TextEnvironment:
    """A ``TextEnvironment`` for ``model`` (a Hugging Face causal LM) with the recipe's tools and rules, each model
    turn given ``max_new_tokens`` (and the protocol, when ``build_protocol`` already made it)."""
    tools = build_tools(cfg)
    envs = build_environments(cfg, tools)
    if is_main_process():
        from rlcli.logging import console

        for note in sandbox_notes(cfg)[:1]:  # every run's header says how a python tool is contained
            if "python" in note or "UNSANDBOXED" in note:
                style = "bold red" if "UNSANDBOXED" in note else "dim"
                console.print(f"[{style}]{'warning: ' if 'UNSANDBOXED' in note else ''}{note}[/]")
    protocol = build_protocol(cfg, tokenizer, tools, envs) if protocol is None else protocol
    chat = cfg.protocol == "chat"
    if envs is not None:  # each environment's episodes are told about its own tools (and env.tools) only
        for name, kind in envs.kinds.items():
            kind_tools = {**tools, **kind.tools()}
            if chat and cfg.describe_tools and envs.multiple:
                kind = dataclasses.replace(kind, protocol=dataclasses.replace(protocol,
                                                                              tool_schemas=schemas_for(kind_tools)))
            elif not chat:
                kind = dataclasses.replace(kind, system_prompt=protocol.system_prompt(kind_tools)
                                           if cfg.describe_tools else "")
            envs.kinds[name] = kind
    env = TextEnvironment(
        model, tokenizer, tools, protocol,
        max_turns=cfg.max_turns,
        max_new_tokens=max_new_tokens,
        max_tool_output_tokens=cfg.max_tool_output_tokens,
        max_length=cfg.max_length,
        few_shot_prefix=cfg.few_shot_prefix,
        system_prompt=protocol.system_prompt(tools) if cfg.describe_tools and not chat else "",
        rules=rules,
        eos_token_id=eos_token_id,
        tool_timeout_s=cfg.tool_timeout_s,
        tool_isolation=cfg.tool_isolation,
        engine=engine,
        environments=envs,
    )
    env.runner.memory_mb = cfg.tool_memory_mb  # TextEnvironment has no argument for it; the runner reads it per call
    return env


def prompt_notes(cfg: EnvConfig) -> list[str]:
    """--dry-run lines about what the model is told: with the chat protocol and ``env.describe_tools: false`` no tool
    reaches the prompt (the template shows only the tools it is given), which only a model trained on them
    survives."""
    if cfg.protocol != "chat" or cfg.describe_tools or not (cfg.tools or cfg.environment_specs()):
        return []
    return [("env.describe_tools is false: the prompts name no tool (the chat template shows only tools it is given); "
             "right for a model fine-tuned on these tools, else set env.describe_tools: true")]


def sandbox_notes(cfg: EnvConfig) -> list[str]:
    """Run-header lines: how the env section's tools are contained. Says so loudly when a ``python`` tool runs
    model-written code unsandboxed (no working bubblewrap, recipe opted in with ``allow_unsandboxed``)."""
    notes = []
    python_tools = [name for name, spec in cfg.tools.items() if _tool_spec(spec).spec == "python"]
    python_tools += [environment_key(name) for name, spec in cfg.environment_specs().items()
                     if spec.spec == "builtin:python_session"]
    if python_tools:
        names, problem = ", ".join(python_tools), sandbox_problem()
        if problem is None:
            notes.append(f"tool {names}: model-written code runs in a bubblewrap sandbox (no network, no host files "
                         "but the system, own pid namespace, clean environment)")
        else:
            notes.append(f"tool {names}: UNSANDBOXED: model-written code runs with this user's files, network and "
                         f"environment ({problem}; allowed by allow_unsandboxed: true)")
    if cfg.environment_specs():
        notes.append(f"stateful environment: its code runs in this process, each call interrupted after "
                     f"{cfg.tool_timeout_s:g} s (Python code; a call stuck in C code is not)")
    if cfg.tool_isolation == "fork" and cfg.tools:
        notes.append(f"tool calls: forked, killed with all they started after {cfg.tool_timeout_s:g} s, up to "
                     f"{cfg.tool_memory_mb} MB more memory each, prints counted, not shown")
    elif cfg.tools:
        notes.append(f"tool calls: inline in this process; Python code is interrupted after {cfg.tool_timeout_s:g} s, "
                     "a call stuck in C code is not, a crash ends the run")
    return notes
