"""The reference pages, generated from the code: the job file schema from study.config's
pydantic models (each field's type, default and the comment written beside it) and the
command line from study.cli's argparse. `tests/test_docs.py` fails when a committed page
differs from what this writes.

    uv run python docs/reference/generate.py     # rewrites docs/reference/{job,cli}.md
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

HERE = Path(__file__).resolve().parent


def _comments(cls: type) -> dict[str, str]:
    """A model's field comments: the lines of ``#`` above a field and the one beside it."""
    out, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if not line.startswith("    ") or line.startswith("     "):
            above = []
            continue
        if text.startswith("#"):
            above.append(text.lstrip("#").strip())
            continue
        m = re.match(r"^(\w+)\s*:\s*[^#]*?(?:#\s*(.*))?$", text)
        if m and not text.startswith(("def ", "@", "class ", "model_config")):
            out[m[1]] = " ".join([*above, m[2] or ""]).strip()
        above = []
    return out


def _models(annotation) -> list[type]:
    """The pydantic models inside a field's type (``X | None``, ``list[X]``, ``dict[str, X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _type(annotation) -> str:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    if isinstance(annotation, type):
        return annotation.__name__
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type(a) for a in args)}]"
    return str(annotation).replace("typing.", "")


def _default(field) -> str:
    if field.default is not PydanticUndefined:
        return "required" if field.is_required() else f"`{field.default!r}`"
    if field.default_factory is not None:
        value = field.default_factory()
        return "(its defaults)" if isinstance(value, BaseModel) else f"`{value!r}`"
    return "required"


def job_page() -> str:
    from study.config import JobConfig

    lines = [
        "# Job file reference",
        "",
        "Generated from `study/config/` by `docs/reference/generate.py`: every key of a job file,",
        "its type, its default and the comment beside it in the code. See [Job files](../guide/jobs.md)",
        "for how a job file reads.",
        "",
    ]
    todo, done = [JobConfig], set()
    while todo:
        cls = todo.pop(0)
        if cls in done:
            continue
        done.add(cls)
        doc = " ".join((inspect.getdoc(cls) or "").split())
        lines += [f"## {cls.__name__}", ""] + ([doc, ""] if doc and cls.__doc__ else [])
        lines += ["| key | type | default | what |", "|---|---|---|---|"]
        notes = _comments(cls)
        for name, field in cls.model_fields.items():
            what = notes.get(name, "").replace("|", "\\|")
            lines.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {what} |")
            todo += [m for m in _models(field.annotation) if m not in done]
        lines.append("")
    return "\n".join(lines)


def cli_page() -> str:
    import argparse

    from study import cli

    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal's width: one width here
    parser = cli.build_parser()
    lines = [
        "# Command line reference",
        "",
        "Generated from `study/cli.py` by `docs/reference/generate.py`: `study --help` and each",
        "command's `--help`.",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
        "",
    ]

    def commands(p, prefix):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        for name, sub in subs[0].choices.items() if subs else ():
            yield f"{prefix} {name}", sub
            yield from commands(sub, f"{prefix} {name}")

    for name, sub in commands(parser, "study"):
        lines += [f"## {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


PAGES = {"job.md": job_page, "cli.md": cli_page}


def main() -> int:
    for name, make in PAGES.items():
        (HERE / name).write_text(make())
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
