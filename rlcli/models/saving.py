"""Saving a trained model in Hugging Face format: the one function the final save and ``best/`` go through, so
both hold one layout.

What a directory :func:`save_model` writes holds:

- full fine-tuning: the model (``config.json``, ``model.safetensors``) and the tokenizer;
- LoRA: the adapter (``adapter_config.json``, ``adapter_model.safetensors``, loadable with
  ``peft.AutoPeftModelForCausalLM``) and the tokenizer; ``base/`` holds the base model when it was built from
  scratch (no hub holds it; the adapter points at that copy); ``merged/`` the merged model when asked
  (``lora.merge_on_save``);
- PPO with a critic: the value head (``value_head.safetensors``, ``value_head.json``), or a separate critic in
  ``critic/``, laid out the same way (its model or adapter, ``base/`` for a from-scratch base, its value head).

Everything is written into a temporary directory inside the run directory (claimed in its manifest first), then
moved into place: a model is never half-written, and whatever stops the process meanwhile (a full disk, Ctrl-C,
another process's failure) removes the temporary directory and leaves what was there before.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path

from rlcli import rundir


def save_model(model, tokenizer, target: str | Path, *, run_dir: str | Path, built_from_scratch: bool, merge: bool,
               value_head=None, critic=None, files: dict[str, str] | None = None) -> None:
    """Save ``model`` (a plain or peft model; ``value_head`` beside it, or ``critic``, a separate critic's
    ``ValueHeadModel``, in ``critic/``) with ``tokenizer`` into ``target``: the run directory itself (the final model:
    its files join the run's others) or a directory inside it (``best/``: replaced whole). ``files``: more text files
    for the directory (name -> content), such as ``best.json``. Main process only."""
    out, target = Path(run_dir), Path(target)
    whole = target.resolve() != out.resolve()
    tmp = out / (f".{target.name}.tmp" if whole else ".final.tmp")
    rundir.claim(out, tmp.name, *([target.name] if whole else []))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        # the final save is the model's last use: merge it in place; a save during training merges a copy
        _write(model, tokenizer, tmp, target, built_from_scratch=built_from_scratch, merge=merge,
               merge_in_place=not whole)
        from rlcli.models.value_head import CRITIC_DIR, save_value_head

        if value_head is not None:
            save_value_head(value_head, tmp)
        if critic is not None:
            (tmp / CRITIC_DIR).mkdir()
            _write(critic.pretrained, tokenizer, tmp / CRITIC_DIR, target / CRITIC_DIR,
                   built_from_scratch=built_from_scratch, merge=False, merge_in_place=False)
            save_value_head(critic.value_head, tmp / CRITIC_DIR)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        rundir.apply_umask(tmp)
        if whole:
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            return
        rundir.claim(out, *(item.name for item in tmp.iterdir()))
        for item in tmp.iterdir():
            if (target / item.name).is_dir():
                shutil.rmtree(target / item.name)
            item.rename(target / item.name)
        tmp.rmdir()
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # the half-written model goes; checkpoints and the rest stay
        raise rundir.as_no_space(exc, tmp) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write(model, tokenizer, tmp: Path, target: Path, *, built_from_scratch: bool, merge: bool,
           merge_in_place: bool) -> None:
    if not hasattr(model, "peft_config"):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return
    configs = list(model.peft_config.values())
    pointed = [cfg.base_model_name_or_path for cfg in configs]
    try:
        if built_from_scratch:
            # peft's unload() strips the LoRA layers without merging; on a copy, to keep the adapter
            base = copy.deepcopy(model).unload()
            base.save_pretrained(tmp / "base")
            tokenizer.save_pretrained(tmp / "base")
            for cfg in configs:
                cfg.base_model_name_or_path = str((target / "base").resolve())
        with warnings.catch_warnings():
            # peft looks for the base's config at its final path, which is only filled after the move
            warnings.filterwarnings("ignore", message="Could not find a config file")
            model.save_pretrained(tmp)
    finally:
        for cfg, value in zip(configs, pointed):  # the live model keeps pointing where it did
            cfg.base_model_name_or_path = value
    tokenizer.save_pretrained(tmp)
    if merge:
        merged = (model if merge_in_place else copy.deepcopy(model)).merge_and_unload()
        merged.save_pretrained(tmp / "merged")
        tokenizer.save_pretrained(tmp / "merged")
