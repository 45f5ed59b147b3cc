"""Print the requirements of some of the project's extras, one per line, from pyproject.toml.

    python deploy/requirements.py selector,cpu [pyproject.toml] > requirements.txt

The images install these in a layer of their own before they copy the sources, so that a change to the code
rebuilds the project's layer only and not its dependencies'. An extra that names the project itself
(``crest-selection[selector]``) is expanded in place. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(project: dict, extras: list[str]) -> list[str]:
    """The base dependencies followed by each extra's, self-references expanded, first occurrence kept."""
    name = project["name"]
    optional = project.get("optional-dependencies", {})
    out: list[str] = list(project.get("dependencies", []))
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; pyproject.toml has {sorted(optional)}")
        seen.add(extra)
        for req in optional[extra]:
            own = re.fullmatch(rf"{re.escape(name)}\[([^\]]+)\]", req.replace(" ", ""))
            if own:
                todo.extend(own.group(1).split(","))
            else:
                out.append(req)
    return list(dict.fromkeys(out))


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1] if len(argv) == 2 else "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    print("\n".join(requirements(project, [e for e in argv[0].split(",") if e])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
