"""mkdocs hooks (mkdocs.yml): Markdown read as GitHub reads it, where Python-Markdown reads it otherwise.

The research log was written for GitHub, where a list may start right under a paragraph line; Python-Markdown needs
a blank line between them and renders such a list as running text. ``on_page_markdown`` inserts that blank line
(outside code blocks) when a page is rendered, so the pages themselves stay as written.
"""

from __future__ import annotations

import re
from typing import Any

ITEM = re.compile(r"^\s*(?:[-*+]|\d+\.)\s")
FENCE = re.compile(r"^\s*(?:```|~~~)")


def on_page_markdown(markdown: str, **_: Any) -> str:
    out: list[str] = []
    fenced = False
    for line in markdown.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and ITEM.match(line) and out:
            previous = out[-1]
            # A paragraph (or table) line right above: not a list item, not an item's indented continuation.
            if previous.strip() and not ITEM.match(previous) and not previous.startswith((" ", "\t")):
                out.append("")
        out.append(line)
    return "\n".join(out)
