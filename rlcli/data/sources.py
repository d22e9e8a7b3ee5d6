"""Read rows from local files (jsonl / json / csv / parquet, or a directory of them) or a hub dataset; name a bad
row by its file and line (:func:`row_ref`)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from rlcli.config.common import DataSource
from rlcli.config.errors import Problem, UserError
from rlcli.launch import is_main_process
from rlcli.models.checks import source_kind

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def check_data_source(src: DataSource, key: str = "data") -> list[Problem]:
    """Problems findable without reading the data: local files that do not exist, unknown file types."""
    problems = []
    for field, path in (("path", src.path), ("eval_path", src.eval_path)):
        if path is None:
            continue
        p = Path(path)
        if p.is_file() or p.suffix in _BUILDERS or p.suffix in {".txt", ".tsv"} or path.startswith((".", "/")):
            if not p.exists():
                where = "" if p.is_absolute() else " (relative to the working directory)"
                problems.append(Problem(f"{key}.{field}", f"file {path} does not exist{where}"))
            elif p.is_file() and p.suffix not in _BUILDERS:
                problems.append(Problem(f"{key}.{field}", f"unsupported file type {p.suffix!r} (use "
                                                          f"{', '.join(_BUILDERS)})"))
            elif p.is_file() and _empty(p):
                problems.append(Problem(f"{key}.{field}", f"file {path} is empty: it has no rows"))
            elif p.is_file() and _BUILDERS[p.suffix] == "json":
                problem = _json_problem(p)  # a first pass over the rows: what would stop the run later
                if problem is not None:
                    problems.append(Problem(f"{key}.{field}", problem))
        elif not p.exists():
            try:
                source_kind(path)
            except UserError as exc:
                problems.append(Problem(f"{key}.{field}", str(exc)))
    return problems


# Where each loaded dataset's rows came from, to name a bad row by file and line: the path given to load_rows ->
# [(file, rows)] in load order.
_LAYOUT: dict[str, list[tuple[str, int]]] = {}


def row_ref(path: str, index: int) -> str:
    """Where row ``index`` (0-based, in the order :func:`load_rows` returned it) of ``path`` is, for a person:
    ``data/x.jsonl:12`` (1-based line) for a JSON-lines file, else ``data/x.csv row 12`` (1-based)."""
    offset = index
    for file, rows in _LAYOUT.get(str(path), []):
        if offset < rows:
            if file.endswith(".jsonl"):
                line = _nth_record_line(file, offset)
                if line is not None:
                    return f"{file}:{line}"
            return f"{file} row {offset + 1}"
        offset -= rows
    return f"{path} row {index + 1}"


def _nth_record_line(file: str, n: int) -> int | None:
    """1-based line of the ``n``-th (0-based) non-blank line of a text file (a JSON-lines record)."""
    try:
        with open(file, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    if n == 0:
                        return number
                    n -= 1
    except OSError:
        pass
    return None


def _empty(file: Path) -> bool:
    """``file`` holds no rows: nothing but blanks (JSON lines), ``[]`` (JSON), a header alone (CSV), or a parquet file
    of 0 rows."""
    kind = _BUILDERS[file.suffix]
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq

            return pq.ParquetFile(file).metadata.num_rows == 0
        except Exception:  # noqa: BLE001 - unreadable: the loader says why, naming the file
            return False
    try:
        with file.open("rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    text = head.decode("utf-8", errors="replace").strip()
    if kind == "csv":
        return len([line for line in text.splitlines() if line.strip()]) < 2 and len(head) < (1 << 16)
    return (not text or text == "[]") and len(head) < (1 << 16)


def _json_problem(file: Path) -> str | None:
    """``file:line: what is wrong`` for the first line of a JSON / JSON-lines file that is not a JSON object."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = file.read_bytes()[: exc.start].count(b"\n") + 1
        return f"{file}:{line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x})"
    except OSError:
        return None
    if file.suffix == ".json":
        try:
            json.loads(text)
            return None  # one JSON document: not the problem
        except ValueError as exc:
            if not str(exc).startswith("Extra data"):  # else: JSON lines in a .json file
                return f"{file}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})"
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            return f"{file}:{number}: not valid JSON: {exc.msg} (column {exc.colno})"
        if not isinstance(value, dict):
            kind = {type(None): "null", bool: "true/false", int: "a number", float: "a number", str: "a string",
                    list: "a list"}.get(type(value), type(value).__name__)
            return f"{file}:{number}: expected a JSON object ({{\"column\": value, ...}}), got {kind}"
    return None


def _read_error(path: str, files: list[Path], exc: Exception) -> UserError:
    """One paragraph for a data file datasets could not read, naming the file and line when it can be found."""
    for file in files:
        if _BUILDERS.get(file.suffix) == "json":
            problem = _json_problem(file)
            if problem is not None:
                return UserError(f"data {problem}")
    cause = exc.__cause__ or exc
    msg = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    where = str(files[0]) if len(files) == 1 else path
    return UserError(f"data {where}: could not be read: {msg}")


def _load_files(builder: str, files: list[Path], split: str, path: str) -> datasets.Dataset:
    for file in files:
        # datasets fails on an empty file with a bare StopIteration
        if file.stat().st_size < 4096 and not file.read_bytes().strip():
            raise UserError(f"data {file} is empty: it has no rows")
        if builder == "json":
            # a line that is not a JSON object (`null` first of all) crashes pyarrow's reader with a segfault:
            # every line is read here first, and the first bad one named
            problem = _json_problem(file)
            if problem is not None:
                raise UserError(f"data {problem}")
    # datasets logs the real cause (file, row) as a separate ERROR line before raising a generic error; the
    # error below says it once, with the file and line
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 10)
    try:
        return datasets.load_dataset(builder, data_files={"train": [str(f) for f in files]}, split=split)
    except UserError:
        raise
    except ValueError as exc:
        if "split" in str(exc).lower() or "Unknown" in str(exc):
            raise UserError(f"data {path} (split {split!r}): {exc}") from None
        raise _read_error(path, files, exc) from None
    except Exception as exc:  # pyarrow / json / csv parse errors
        raise _read_error(path, files, exc) from None
    finally:
        datasets.logging.set_verbosity(level)


def _dir_files(p: Path, split: str) -> tuple[list[Path], list[Path]]:
    """The data files of a local dataset directory that make ``split`` (datasets' naming rules: train*.jsonl,
    test*.csv, ..., or every file for ``train``), and the other files it holds for that split."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    base = split.split("[", 1)[0]
    try:
        files = DataFilesDict.from_patterns(get_data_patterns(str(p)), base_path=str(p))
    except Exception:
        raise UserError(f"data {p}: the directory holds no data files (use {', '.join(_BUILDERS)})") from None
    if base not in files:
        raise UserError(f"data {p}: no split {base!r}; its file names make the split(s) "
                        f"{', '.join(str(k) for k in files)}")
    chosen = sorted(Path(f) for f in files[base])
    return [f for f in chosen if f.suffix in _BUILDERS], [f for f in chosen if f.suffix not in _BUILDERS]


def _load_dir(p: Path, split: str) -> tuple[datasets.Dataset, list[tuple[Path, int]]]:
    """Every supported file of a directory's split, one format after the other; refused when the formats'
    columns differ. Returns the rows and (file, rows) in order."""
    files, others = _dir_files(p, split)
    if not files:
        raise UserError(f"data {p}: no {', '.join(_BUILDERS)} files for split {split.split('[', 1)[0]!r}"
                        + (f" (it holds {', '.join(f.name for f in others[:5])})" if others else ""))
    base = split.split("[", 1)[0]
    parts, layout = [], []
    for file in files:  # one by one: a bad file is named, and each file's rows are known for row_ref
        ds = _load_files(_BUILDERS[file.suffix], [file], "train", str(p))
        parts.append(ds)
        layout.append((file, len(ds)))
    columns = {tuple(sorted(ds.column_names)) for ds in parts}
    if len(columns) > 1:
        described = "; ".join(f"{f.relative_to(p)}: {', '.join(ds.column_names)}" for (f, _), ds in zip(layout, parts))
        raise UserError(f"data {p}: its files do not have the same columns, so they cannot be read as one dataset "
                        f"({described}); keep one kind of file per directory, or point data.path at one file")
    features = parts[0].features
    for (file, _), part in zip(layout[1:], parts[1:]):
        differ = [c for c in features if _kind(part.features[c]) != _kind(features[c])]
        if differ:
            c = differ[0]
            raise UserError(f"data {p}: column {c!r} holds {_kind(features[c])} in {layout[0][0].name} but "
                            f"{_kind(part.features[c])} in {file.name}, so the files cannot be read as one "
                            "dataset; make them agree, or point data.path at one file")
    parts = [part if part.features == features else part.cast(features) for part in parts]
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if split != base:  # a slice such as train[:100], applied to the files' rows in order
        instruction = datasets.ReadInstruction.from_spec(split).to_absolute({base: len(ds)})
        ds = ds.select([i for ins in instruction for i in range(ins.from_, ins.to)])
    return ds, layout


def _kind(feature) -> str:
    """A column type up to storage details (csv reads large_string where json reads string; int widths)."""
    import re

    text = str(feature).replace("large_string", "string")
    return re.sub(r"\b(u?int|float)\d+\b", r"\1", text)


def load_rows(path: str, split: str = "train", name: str | None = None,
              max_rows: int | None = None) -> datasets.Dataset:
    """One split of a dataset as a ``datasets.Dataset``; raises ``UserError`` when it cannot be read or is empty.

    A local directory is read file by file: every jsonl / json / csv / parquet file of the split (all of them for
    ``train`` unless file names mark splits, as datasets does), in name order; a note says which files were read.
    """
    p = Path(path)
    layout: list[tuple[Path, int]] = []
    try:
        if p.is_file():
            builder = _BUILDERS.get(p.suffix)
            if builder is None:
                raise UserError(f"data file {path}: unsupported file type {p.suffix!r} (use {', '.join(_BUILDERS)})")
            ds = _load_files(builder, [p], split, path)
            layout = [(p, len(ds))]
        elif p.is_dir() and name is None:
            ds, layout = _load_dir(p, split)
            shown = ", ".join(f"{f.relative_to(p)} ({n})" for f, n in layout[:8])
            more = f" and {len(layout) - 8} more" if len(layout) > 8 else ""
            _note(f"data {path}: read {len(ds)} rows from {len(layout)} file(s): {shown}{more}")
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
    _LAYOUT[str(path)] = [(str(f), n) for f, n in layout]
    return ds


def _note(text: str) -> None:
    if is_main_process():
        from rlcli.logging import console

        console.print(f"[yellow]note:[/] {text}")


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
                raise UserError(f"data {row_ref(path, i)}: no value for {c!r} (needed for {what})")
