"""Write docs/reference.md: every recipe key of every command, from the schema's own field docstrings.

    python scripts/recipe_reference.py            # rewrite docs/reference.md
    python scripts/recipe_reference.py --check    # exit 1 if docs/reference.md differs from the schema (CI)

The text is what ``rlcli explain`` prints, laid out as Markdown, so the reference cannot disagree with it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import BaseModel

from rlcli.config.explain import COMMANDS, _constraints, _default, _doc, _model_class, _type_name, schema_for

OUT = Path(__file__).resolve().parent.parent / "docs" / "reference.md"

HEADER = """# Recipe reference

Every key of every command's recipe, with its type, default and what it does. Generated from the schema by
`python scripts/recipe_reference.py` (CI checks it is current); `rlcli explain COMMAND.KEY` prints the same text in a
terminal. How recipes are written (overrides, plug-ins, errors) is in [recipes.md](recipes.md).
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n\n", "<br><br>").replace("\n", " ")


def _section(lines: list[str], command: str, path: str, schema: type[BaseModel], doc: str) -> None:
    title = f"`{command}` recipe" if not path else f"{command}: `{path}`"
    lines += ["", f"{'##' if not path else '###'} {title}", ""]
    if doc:
        lines += [doc, ""]
    keys, sections = [], []
    for name, field in schema.model_fields.items():
        sub = _model_class(field.annotation)
        full = f"{path}.{name}" if path else name
        if sub is not None:
            sections.append((full, sub, _doc(field, sub)))
            keys.append(f"| `{name}` | section (below) | | | {_cell(_doc(field, sub).split(chr(10))[0])} |")
            continue
        limits = _constraints(field)
        keys.append(f"| `{name}` | {_cell(_type_name(field.annotation))} | `{_default(field)}` | {limits} | "
                    f"{_cell(_doc(field, None))} |")
    if keys:
        lines += ["| key | type | default | allowed | what it does |", "|---|---|---|---|---|", *keys]
    for full, sub, sub_doc in sections:
        _section(lines, command, full, sub, sub_doc)


def render() -> str:
    lines = [HEADER.rstrip()]
    for command in COMMANDS:
        schema = schema_for(command)
        _section(lines, command, "", schema, _doc(None, schema))
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the file is not what the schema gives")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python scripts/recipe_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
