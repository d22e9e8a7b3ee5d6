"""Read rows from local files (jsonl / json / csv / parquet, or a directory of them) or a hub dataset."""

from __future__ import annotations

from pathlib import Path

import datasets

from rlcli.config.common import DataSource
from rlcli.config.errors import UserError
from rlcli.models.loading import source_kind

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def check_data_source(src: DataSource, key: str = "data") -> list[str]:
    """Problems findable without reading the data: local files that do not exist, unknown file types."""
    problems = []
    for field, path in (("path", src.path), ("eval_path", src.eval_path)):
        if path is None:
            continue
        p = Path(path)
        if p.is_file() or p.suffix in _BUILDERS or p.suffix in {".txt", ".tsv"} or path.startswith((".", "/")):
            if not p.exists():
                problems.append(f"{key}.{field}: file {path} does not exist (relative to the working directory)")
            elif p.is_file() and p.suffix not in _BUILDERS:
                problems.append(f"{key}.{field}: unsupported file type {p.suffix!r} (use {', '.join(_BUILDERS)})")
        elif not p.exists():
            try:
                source_kind(path)
            except UserError as exc:
                problems.append(f"{key}.{field}: {exc}")
    return problems


def load_rows(path: str, split: str = "train", name: str | None = None, max_rows: int | None = None) -> datasets.Dataset:
    """One split of a dataset as a ``datasets.Dataset``; raises ``UserError`` when it cannot be read or is empty."""
    p = Path(path)
    try:
        if p.is_file():
            builder = _BUILDERS.get(p.suffix)
            if builder is None:
                raise UserError(f"data file {path}: unsupported file type {p.suffix!r} (use {', '.join(_BUILDERS)})")
            if p.stat().st_size < 4096 and not p.read_bytes().strip():  # datasets fails on it with a bare StopIteration
                raise UserError(f"data {path} (split {split!r}) is empty: it has no rows")
            ds = datasets.load_dataset(builder, data_files={"train": str(p)}, split=split)
        elif p.is_dir():
            ds = datasets.load_dataset(str(p), name=name, split=split)
        else:
            source_kind(path)  # raises for things that are neither a path nor a hub id
            ds = datasets.load_dataset(path, name=name, split=split)
    except UserError:
        raise
    except FileNotFoundError as exc:
        raise UserError(f"data {path}: not found ({exc})") from None
    except ValueError as exc:
        raise UserError(f"data {path} (split {split!r}): {exc}") from None
    except Exception as exc:  # pyarrow / json parse errors carry the useful text in their message
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"data {path}: could not be read: {msg}") from None
    if isinstance(ds, datasets.DatasetDict):
        raise UserError(f"data {path}: has several splits ({', '.join(ds)}); set the split")
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    if len(ds) == 0:
        raise UserError(f"data {path} (split {split!r}) is empty: it has no rows")
    return ds


def train_eval_rows(src: DataSource, seed: int, check=None) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The training rows and the evaluation rows (a separate split/file, a held-out fraction, or none).

    ``check(rows, path)``, when given, runs on the training rows before a fraction is held out, so the errors it
    raises number rows as the file does (after the shuffled split they would not).
    """
    train = load_rows(src.path, src.split, src.name, src.max_rows)
    if check is not None:
        check(train, src.path)
    if src.eval_path is not None or src.eval_split is not None:
        path = src.eval_path or src.path
        split = src.eval_split or "train"
        return train, load_rows(path, split, src.name)
    if src.eval_fraction > 0:
        n_eval = max(1, round(len(train) * src.eval_fraction))
        if n_eval >= len(train):
            raise UserError(f"data {src.path}: eval_fraction={src.eval_fraction} leaves no training rows")
        parts = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        return parts["train"], parts["test"]
    return train, None


def require_columns(ds: datasets.Dataset, columns: list[str], path: str, what: str) -> None:
    """Raise naming the first row that lacks one of ``columns`` (missing column or null value)."""
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise UserError(
            f"data {path}: {what} needs column(s) {', '.join(repr(c) for c in missing)}, "
            f"but the rows have {', '.join(repr(c) for c in ds.column_names)}"
        )
    for i, row in enumerate(ds.select_columns(columns)):
        for c in columns:
            if row[c] is None:
                raise UserError(f"data {path}: row {i} has no value for {c!r} (needed for {what})")
