"""Griffe extension for the API reference: show docstring doctests as code blocks.

Our docstrings carry runnable ``>>>`` examples in their prose (pytest runs them with
``--doctest-modules``). Markdown would read ``>>>`` as nested quotes and ``[True, False]`` as a
link reference, so each run of doctest lines (prompts and their output, up to a blank line) is
fenced as ``pycon`` before mkdocstrings renders the docstring. Docstrings are not changed on disk.
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    """Wrap every block starting with a ``>>>`` line in a ``pycon`` fence (tests/test_docs.py)."""
    out: list[str] = []
    inside = False
    fenced = False  # already inside a ``` block written by the author
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
        if not fenced and not inside and stripped.startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}```pycon")
            inside = True
        elif inside and not stripped:
            out.append(f"{indent}```")
            inside = False
        out.append(line)
    if inside:
        out.append(f"{indent}```")
    return "\n".join(out)


class FenceDoctests(griffe.Extension):
    """Fence doctest blocks of every loaded object's docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
