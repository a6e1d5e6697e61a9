"""Write docs/api.md, the index of vidtok's public API, from the docstrings.

    python scripts/api_doc.py > docs/api.md

One line per name in `vidtok.__all__` (its signature and its docstring's first sentence); the full
reference is pydoc's, offline: `python -m pydoc vidtok.DyToK`, or `python -m pydoc -b` to browse.
tests/test_docs.py checks the committed page equals this script's output.
"""

from __future__ import annotations

import inspect

import vidtok


def summary(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    return first.split(". ")[0].rstrip(".") + "." if first else ""


def signature(name: str, obj) -> str:
    """`name(args)` for a function, its fields for a class; `name(...)` where that runs long."""
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        return name
    try:
        text = str(inspect.signature(obj).replace(return_annotation=inspect.Signature.empty))
    except (TypeError, ValueError):
        return name
    return name + (text if len(text) <= 50 else "(...)")


def page() -> str:
    lines = [
        "# API index",
        "",
        "Generated from the docstrings by `python scripts/api_doc.py > docs/api.md` (a test keeps it current).",
        "The full reference is pydoc's, offline: `python -m pydoc vidtok.DyToK` for one name,",
        "`python -m pydoc -w vidtok` for an HTML page, `python -m pydoc -b` to browse every module.",
        "",
        "| name | kind | what it is |",
        "|---|---|---|",
    ]
    for name in vidtok.__all__:
        obj = getattr(vidtok, name)
        kind = "exception" if inspect.isclass(obj) and issubclass(obj, BaseException) else "class" if inspect.isclass(obj) else "function"
        cell = signature(name, obj).replace("|", "\\|")  # a union's | would end the table cell
        lines.append(f"| `{cell}` | {kind} | {summary(obj).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(page(), end="")
