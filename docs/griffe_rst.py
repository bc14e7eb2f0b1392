"""A griffe extension used only by the docs build (not part of the library).

The library's docstrings are written with RST roles (``:math:`...```, ``:class:`...```)
and ``.. math::`` blocks, read well as plain text and by Sphinx.  mkdocstrings renders
docstrings as Markdown, so this extension rewrites, at load time and for the docs only:

- ``:math:`X``` -> ``$X$`` and ``.. math:: X`` (plus its indented continuation) -> ``$$X$$``,
  which ``pymdownx.arithmatex`` hands to MathJax;
- ``:class:/:func:/:meth:/:mod:/:attr:/:data:/:exc:`~a.b.c``` -> inline code ``c``
  (``a.b.c`` without the tilde);
- ``::`` literal blocks -> fenced code blocks; ````x```` (RST literal) -> ```x```;
- a ``=====`` RST simple table -> a Markdown table.
"""
from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`~?([^`]+)`")
_MATH = re.compile(r":math:`([^`]+)`")


def _role(m: re.Match) -> str:
    text = m.group(0)
    target = m.group(1)
    if ":`~" in text:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def convert(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        ind = _indent(line)
        if stripped.startswith(".. math::"):
            body = [stripped[len(".. math::"):].strip()]
            i += 1
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > ind):
                if lines[i].strip():
                    body.append(lines[i].strip())
                i += 1
            math = " ".join(b for b in body if b)
            math = math.replace(r"\\", r"\\ ")  # keep MathJax line breaks intact
            out += ["", " " * ind + "$$", " " * ind + math, " " * ind + "$$", ""]
            continue
        if re.match(r"^=+(\s+=+)+\s*$", stripped):  # RST simple table -> Markdown table
            cols = [m.start() for m in re.finditer(r"=+", line)]
            rows: list[list[str]] = []
            rules = 0
            while i < len(lines) and rules < 3:
                row = lines[i]
                i += 1
                if re.match(r"^\s*=+(\s+=+)+\s*$", row):
                    rules += 1
                    continue
                if not row.strip():
                    continue
                cells = [row[a:b].strip() for a, b in zip(cols, cols[1:] + [None])]
                if rows and not cells[0]:  # continuation line
                    rows[-1] = [(p + " " + c).strip() for p, c in zip(rows[-1], cells)]
                else:
                    rows.append(cells)
            if rows:
                out += ["", "| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
                out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
                out.append("")
            continue
        if stripped == "::" or (stripped.endswith("::") and not stripped.startswith("..")):
            head = line.rstrip()[:-2].rstrip()
            if head.strip():
                out.append(head + ":")
            i += 1
            block = []
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > ind):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            if block:
                inner = min(_indent(b) for b in block if b.strip())
                out += ["", "```text"] + [b[inner:] for b in block] + ["```", ""]
            continue
        out.append(line)
        i += 1
    text = "\n".join(out)
    text = _MATH.sub(lambda m: "$" + " ".join(m.group(1).split()) + "$", text)
    text = _ROLE.sub(_role, text)
    return re.sub(r"``([^`\n]+)``", r"`\1`", text)


class RstToMarkdown(griffe.Extension):
    """Rewrite RST markup in every docstring into Markdown + arithmatex math."""

    def on_instance(self, *, node, obj, agent, **kwargs) -> None:  # noqa: D401
        if obj.docstring is not None and obj.docstring.value:
            obj.docstring.value = convert(obj.docstring.value)
