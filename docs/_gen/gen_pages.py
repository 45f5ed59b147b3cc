"""The mkdocs-gen-files script (mkdocs.yml): writes the generated pages and copies into the site at build time.

The pages come from ``reference.py`` (configuration, CLI, API) and ``results.py`` (the results pages and their raw
JSONs); ``copies.py`` names the files outside docs/ that the site shows (deploy/README.md).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import mkdocs_gen_files

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def load(name: str) -> ModuleType:
    """A sibling module by file (docs/_gen is not a package)."""
    spec = importlib.util.spec_from_file_location(f"crest_docs_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def main() -> None:
    reference, results, copies = load("reference"), load("results"), load("copies")
    for path, text in {**reference.pages(), **results.pages()}.items():
        with mkdocs_gen_files.open(path, "w") as f:
            f.write(text)
    for path, source in results.copies().items():
        with mkdocs_gen_files.open(path, "wb") as f:
            f.write(source.read_bytes())
    for path, source in copies.COPIES.items():
        with mkdocs_gen_files.open(path, "w") as f:
            f.write((ROOT / source).read_text())
        mkdocs_gen_files.set_edit_path(path, f"../{source}")


main()
