"""The ``rlcli`` command line: one sub-command per trainer, each taking ``CONFIG [KEY=VALUE ...]``."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.panel import Panel
from rich.syntax import Syntax
from rich.text import Text

from rlcli import __version__, peers, rundir, signals
from rlcli.launch import RESUME_HINT, is_main_process
from rlcli.rundir import RunDir
from rlcli.signals import Stopped
from rlcli.commands import COMMANDS, Command
from rlcli.config import RecipeError, UserError, recipe_to_yaml
from rlcli.config.errors import NothingToDo
from rlcli.config.loader import load_recipe_and_origin

app = typer.Typer(
    name="rlcli",
    help="Train language models with SFT, reward modelling and PPO — including models that call tools — "
    "from YAML recipes. Each command takes a recipe file and optional KEY=VALUE overrides "
    "(e.g. optim.learning_rate=3e-4 output_dir=runs/a).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

CONFIG = typer.Argument(..., help="Recipe YAML file.", show_default=False)
OVERRIDES = typer.Argument(None, help="KEY=VALUE overrides, dotted keys (optim.learning_rate=3e-4).",
                           show_default=False)
DRY_RUN = typer.Option(False, "--dry-run", help="Validate the recipe without loading weights; print it resolved.")
RESUME = typer.Option(False, "--resume", help="Continue from the newest checkpoint in output_dir.")


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _text(exc: BaseException) -> str:
    """An error's message with the notes added on its way out (a replaced run put back)."""
    return "\n".join([str(exc), *getattr(exc, "__notes__", [])])


def _fail(exc: Exception, code: int, *, first: bool = False, where: str = "") -> None:
    """Print ``exc`` as one panel and exit with ``code``: on the main process, and in a run of several processes
    also on the one that failed ``first`` (``where`` names it)."""
    if is_main_process() or first:
        title = "recipe error" if isinstance(exc, RecipeError) else "error"
        if where and not is_main_process():
            title += f" ({where})"
        # as plain text: messages quote values such as train[:100] or ['a'] that rich would read as markup
        _stderr_console().print(Panel(Text(_text(exc)), title=f"[bold red]{title}", title_align="left",
                                      border_style="red"))
    elif not where and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # failed before the processes met: nothing tells whether the main one failed the same way, so one line
        label = f"process {os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']}"
        _stderr_console().print(Text(f"error ({label}): {' '.join(_text(exc).split())[:300]}"))
    raise typer.Exit(code)


def _peer_failed(exc: BaseException) -> UserError | None:
    """In a run of several processes: ``exc`` as the echo of another process's failure (a collective whose peer
    exited, or the watch's ``PeerFailed``), said as that failure; None when this process failed on its own."""
    if not peers.this_process():
        return None
    line = peers.peer_failure(wait_s=2.0)
    if line is not None:
        return UserError(f"{line.rstrip('.')}. The run stopped on every process; {RESUME_HINT}")
    if isinstance(exc, peers.PeerFailed) or peers.lost_connection(exc):
        silent = peers.silent_peers()
        who = (", ".join(f"process {r}" for r in silent) + (" was" if len(silent) == 1 else " were")
               if silent else "another process of the run was")
        # gloo's "[.../pair.cc:553] Connection closed by peer [127.0.0.1]:7870. This is typically ..."
        seen = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).splitlines()[0] if str(exc) else "").split(". ")[0]
        return UserError(f"{who} lost without an error of its own (killed, out of memory, or its machine went "
                         f"away), so the run stopped on every process ({peers.this_process()} saw: "
                         f"{seen[:200] or type(exc).__name__}); {RESUME_HINT}")
    return None


def _stopped(exc: BaseException) -> str:
    """What a run stopped by a signal (or Ctrl-C) says: where it stopped and how it goes on."""
    if isinstance(exc, Stopped) and exc.checkpoint is not None:
        text = (f"[yellow]stopped[/] by {signals.name(exc.signum)} at the end of step {exc.step}, after writing a "
                f"checkpoint there ({exc.checkpoint}); continue with --resume")
    elif isinstance(exc, Stopped):
        text = f"[yellow]stopped[/] by {signals.name(exc.signum)}: {RESUME_HINT}"
    else:
        text = f"[yellow]interrupted[/]: {RESUME_HINT}"
    return "\n".join([text, *getattr(exc, "__notes__", [])])


def no_space_error(exc: OSError) -> UserError:
    """A full disk (or quota), as one paragraph naming where the write failed."""
    where = exc.filename or "the output directory"
    return UserError(f"no space left on {where}: the device (or your quota) is full, so the run stopped. What was "
                     "written before stays intact: the previous checkpoint and any finished model (a half-written "
                     "file is removed). Free some space, then continue with --resume (or start again)")


def _without_traceback(exc: BaseException) -> BaseException:
    """``exc`` and the exceptions chained to it, with their tracebacks (and so the frames they hold) dropped."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += [e.__cause__, e.__context__]
    return exc


def _checked(recipe, origin, preflight: Callable, resume: bool, processes: int = 1, dry_run: bool = False) -> list[str]:
    """The command's own checks, the output dir's and the trackers', their problems reported together in one error,
    each placed where its key was set (``origin``); then whether the hub ids it names can be had (``--dry-run``:
    said as a note, a recipe checked offline is still a good recipe)."""
    from rlcli.config.loader import locate
    from rlcli.logging import check_trackers
    from rlcli.models.checks import check_hub, check_recipe_model_fits

    problems = RunDir.of(recipe).check(recipe, resume=resume, origin=origin) + locate(check_trackers(recipe), origin)
    try:
        notes = preflight(recipe, origin, processes)
    except RecipeError as exc:
        raise RecipeError(exc.problems + problems) from None
    problems += locate(check_recipe_model_fits(recipe), origin)
    if problems:
        raise RecipeError(problems)
    return check_hub(recipe, warn_only=dry_run) + notes  # before anything asks the hub (and retries for a minute)


def _run(command: Command, config: Path, overrides: list[str] | None, dry_run: bool, resume: bool):
    from rlcli.launch import launch_processes, release_distributed, requested_cpu_processes

    # the process count, read from the launch once: `accelerate launch --cpu --num_processes N` started this one
    # process, so the recipe is checked here, once, for N processes, before they start (a bad recipe fails before
    # any worker exists); under torchrun / accelerate's other launchers every process reads its WORLD_SIZE
    cpu_processes = requested_cpu_processes()
    processes = cpu_processes or launch_processes()
    with signals.handled():
        try:
            failure = _attempt(command, config, overrides, dry_run, resume, cpu_processes, processes)
        except Stopped as exc:
            failure = (_without_traceback(exc), 128 + exc.signum)
        except KeyboardInterrupt as exc:
            failure = (_without_traceback(exc), 130)
        except BaseException as exc:  # a crash; with several processes, maybe only the echo of another's failure
            echo = _peer_failed(exc)
            if echo is None:
                peers.announce(exc)
                raise
            failure = (_without_traceback(echo), 1)
        # the other processes hear of this one's failure (a no-op when another failed first, or in one process)
        first = failure is not None and not isinstance(failure[0], Stopped) and peers.announce(failure[0])
        if first and not is_main_process() and peers.main_failed_alike(failure[0]):
            first = False  # the same error everywhere: the main process says it, once
        where = peers.this_process()
        # the trainer's frames, and its DDP model, are gone now (the failure was kept without its traceback): only
        # now can the process group go without risking gloo's teardown deadlock
        release_distributed()
    if failure is None:
        return
    exc, code = failure
    if isinstance(exc, (Stopped, KeyboardInterrupt)):
        if is_main_process():
            _stderr_console().print(_stopped(exc))
        raise typer.Exit(code)
    _fail(exc, code, first=first, where=where)


def _attempt(command: Command, config: Path, overrides: list[str] | None, dry_run: bool, resume: bool,
             cpu_processes: int | None, processes: int) -> tuple[BaseException, int] | None:
    """Load, check and run the command; the failure a user can act on as (error, exit code), else None."""
    from rlcli.launch import relaunch_cpu_processes

    try:
        recipe, origin = load_recipe_and_origin(command.schema(), config, overrides or [], processes=processes)
        if origin.notes and is_main_process() and not cpu_processes:  # (the relaunched processes say it)
            from rich.markup import escape

            for note in origin.notes:
                _stderr_console().print(f"[yellow]note[/]: {escape(note.render())}")
        if not dry_run and hasattr(getattr(recipe, "train", None), "host_memory"):
            from rlcli.host import set_host_memory

            # before torch's first CPU allocation: importing the trainer (peft) makes one
            set_host_memory(recipe.train.host_memory)
        notes = _checked(recipe, origin, command.preflight(), resume, processes, dry_run)
        if dry_run:
            from rlcli.logging import console

            if is_main_process():
                console.print(Syntax(recipe_to_yaml(recipe), "yaml", theme="ansi_dark", background_color="default"))
                for note in notes:
                    console.print(f"[cyan]•[/] {note}")
                console.print(f"[green]dry run OK[/]: {config} is valid (no weights were loaded)")
            return None
        if cpu_processes:
            relaunch_cpu_processes(sys.argv[1:], cpu_processes)  # runs the N processes, then exits with their status
        command.run()(recipe, resume=resume)
    except NothingToDo as exc:
        if is_main_process():
            _stderr_console().print(f"[green]nothing to do[/]: {exc}")
    except RecipeError as exc:
        return _without_traceback(exc), 2
    except UserError as exc:
        return _without_traceback(exc), 1
    except OSError as exc:
        if not rundir.no_space(exc):
            raise
        return _without_traceback(no_space_error(exc)), 1
    return None


def _register(command: Command) -> None:
    """One sub-command of the registry: ``CONFIG [KEY=VALUE ...]``, ``--dry-run``, and ``--resume`` for trainers."""
    if command.trains:
        def run(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES, dry_run: bool = DRY_RUN,
                resume: bool = RESUME) -> None:
            _run(command, config, overrides, dry_run, resume)
    else:
        def run(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES, dry_run: bool = DRY_RUN) -> None:
            _run(command, config, overrides, dry_run, False)
    run.__doc__ = command.help
    app.command(command.name)(run)


for _command in COMMANDS.values():
    if _command.recipe_run:
        _register(_command)


@app.command("serve-reward")
def serve_reward(
    config: Path = CONFIG,
    overrides: Optional[list[str]] = OVERRIDES,
    dry_run: bool = DRY_RUN,
) -> None:
    """Serve a reward function or reward model over HTTP: the JSON contract a recipe's reward.url calls."""
    from rlcli.rewards.serve import serve

    try:
        serve(config, overrides or [], dry_run=dry_run)
    except RecipeError as exc:
        _fail(_without_traceback(exc), 2)
    except UserError as exc:
        _fail(_without_traceback(exc), 1)


@app.command()
def explain(
    target: str = typer.Argument(..., help="A command, or a command and a dotted key: ppo, ppo.kl, ppo.kl.coef.",
                                 show_default=False),
    key: Optional[str] = typer.Argument(None, help="A dotted key, if not given in TARGET (rlcli explain ppo kl.coef).",
                                        show_default=False),
) -> None:
    """What a recipe key means: its type, default, allowed values and documentation (a section: its keys)."""
    from rlcli.config.explain import explain as explain_key, split_target

    try:
        command, dotted = split_target(target, key)
        text = explain_key(command, dotted)
    except RecipeError as exc:
        _fail(exc, 2)
    from rlcli.logging import console

    console.print(Text(text))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rlcli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """rlcli: SFT, reward models and PPO for language models, driven by YAML recipes."""


def _quiet_libraries() -> None:
    # rlcli shows its own progress; library progress bars and advisory warnings would bury it.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import torch
    import transformers

    if not torch.accelerator.is_available() and importlib.util.find_spec("deepspeed") is not None:
        # DeepSpeed, once installed (rlcli[deepspeed]), is imported by accelerate and transformers and logs "Setting
        # accelerator to CPU ..." on every CPU run; naming the CPU is what its own detection concludes, said quietly
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def main() -> None:
    _quiet_libraries()
    app(prog_name="rlcli")


if __name__ == "__main__":
    sys.exit(main())
