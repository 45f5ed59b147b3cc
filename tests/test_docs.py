"""The documentation holds together: a short README, links that resolve, a research log that stays as written, a
measured table that equals its JSON, and a site that builds in strict mode.

The link check reads the Markdown itself (no mkdocs needed): a relative link in README.md must name a file or folder
of the repository; one in docs/ must name a page or file of the site, on disk under docs/ or generated at build
time (docs/_gen/), so a link that leaves docs/ fails here as it would fail the strict build. Anchors are checked
against the target's headings (Python-Markdown's slugs, and ``{#id}`` attributes).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MAX_README_LINES = 200


def _gen(name: str) -> ModuleType:
    """A module of docs/_gen by file (it is not a package)."""
    spec = importlib.util.spec_from_file_location(f"crest_docs_{name}", DOCS / "_gen" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


RESULTS, REFERENCE, COPIES = _gen("results"), _gen("reference"), _gen("copies")

# The research log, one file per round: (file, its first line). Their bodies are the README's research sections as
# written; DIGESTS pins them (sha256 of the text after the heading, first 16 hex digits), so an edit shows up. A
# link path adjusted for a new location is the one change allowed: update the digest with it.
RESEARCH = {
    "00-training-benchmark.md": ("# Training benchmark", "1f1b6fc6234aab2a"),
    "01-first-measurements.md": ("# First measurements (tuning protocol, 2026-11-29)", "273b8393d2c6bf65"),
    "02-second-round.md": (
        "# Second round of tuning: the coreset weights, and what the noisy task does (2026-11-29)",
        "da7e199c0194c246",
    ),
    "03-frontier-clean.md": ("# The frontier on the clean task: test set, seeds 0-2 (2026-11-29)", "62e74981e1d60794"),
    "04-frontier-long-tailed.md": (
        "# The frontier on the long-tailed task: test set, seeds 0-2 (2026-11-29)",
        "53f9d1f4c0ea797a",
    ),
    "05-third-round.md": (
        "# Third round: a cheaper CREST step, and both frontiers again (2026-11-29)",
        "241aa2aadd2eb71a",
    ),
    "06-fourth-round.md": (
        "# Fourth round: the remaining ablations, and the ceiling on this CPU (2026-11-29)",
        "4dbd818053e869b5",
    ),
    "07-fifth-round.md": (
        "# Fifth round: reusing candidates' embeddings, and how much their age changes the selections (2026-11-29)",
        "7e4055b5baefa196",
    ),
    "08-sixth-round.md": ("# Sixth round: the embedding pass on the spare core (2026-11-30)", "c08f4387c36b28b0"),
    "09-seventh-round.md": (
        "# Seventh round: selecting over the whole random subset (joint selection), and both frontiers again "
        "(2026-11-30)",
        "843cc78a3a22bcba",
    ),
    "10-eighth-round.md": (
        "# Eighth round: a longer age for learned examples' embeddings, and both frontiers again (2026-11-30)",
        "abf00e5afc4783b2",
    ),
    "11-ninth-round.md": (
        "# Ninth round: what counts as learned, and both frontiers again (2026-11-30)",
        "334d6dfe95857dc1",
    ),
    "12-tenth-round.md": (
        "# Tenth round: the training step's logits, and both frontiers on a second CPU (2026-11-30)",
        "55614a864964930d",
    ),
    "integrations-overhead.md": ("# Integration overhead (2026-11-29 to 2026-11-30)", "071d30cac1af07fd"),
}

FENCE = re.compile(r"^(\s*)(```|~~~).*?^\1\2\s*$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code (links there are examples, not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _links(text: str) -> list[str]:
    return LINK.findall(_prose(text))


def _slug(title: str) -> str:
    """Python-Markdown's toc slug of a heading's text (the rendered text: code and links kept as their text)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(text: str) -> set[str]:
    """The ids of a Markdown page's headings: explicit ``{#id}`` or the toc slug (repeats get ``_1``, ``_2``)."""
    out: set[str] = set()
    for _, title in HEADING.findall(FENCE.sub("", text)):
        explicit = re.search(r"\{#([\w-]+)\}\s*$", title)
        if explicit:
            out.add(explicit.group(1))
            continue
        slug, n = _slug(title), 0
        while (slug if n == 0 else f"{slug}_{n}") in out:
            n += 1
        out.add(slug if n == 0 else f"{slug}_{n}")
    return out


def _doc_files() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_gen" not in p.relative_to(DOCS).parts)


def _generated() -> dict[str, str | None]:
    """{path under docs/: its Markdown, or None where it is not Markdown or needs the project to build} of what
    the build generates."""
    out: dict[str, str | None] = dict(RESULTS.pages())
    out.update(dict.fromkeys(RESULTS.copies()))
    out.update(dict.fromkeys(REFERENCE.PATHS))
    out.update({path: (ROOT / source).read_text() for path, source in COPIES.COPIES.items()})
    return out


def _reference_anchors(path: str) -> set[str] | None:
    """The anchors of a generated reference page, known without building it (its sections are its configs)."""
    if path == "reference/configuration.md":
        return {"recipes"} | {dotted.rsplit(".", 1)[1].lower() for dotted, _ in REFERENCE.CONFIGS}
    return None


def test_readme_is_short() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; keep it at {MAX_README_LINES} or fewer"


def test_readme_keeps_its_two_commands_and_the_loop() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert "## Point an existing PyTorch loop at the service\n\n```python\n" in text


def test_readme_links_resolve() -> None:
    text = README.read_text()
    broken = []
    for target in _links(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        if not path:
            ok = anchor in anchors(text)
        else:
            file = (ROOT / path).resolve()
            ok = file.exists() and file.is_relative_to(ROOT)
            if ok and anchor and file.suffix == ".md":
                ok = anchor in anchors(file.read_text())
        if not ok:
            broken.append(target)
    assert not broken, f"README.md links to what does not exist: {broken}"


@pytest.mark.parametrize("page", _doc_files(), ids=lambda p: str(p.relative_to(DOCS)))
def test_doc_links_resolve(page: Path) -> None:
    generated = _generated()
    text = page.read_text()
    here = page.parent.relative_to(DOCS)
    broken = []
    for target in _links(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        if not path:
            if anchor not in anchors(text):
                broken.append(target)
            continue
        name = os.path.normpath(here / path).replace(os.sep, "/")
        if name.startswith("../"):
            broken.append(f"{target} (leaves docs/: link to a page, or add a copy in docs/_gen/copies.py)")
            continue
        on_disk = DOCS / name
        if on_disk.is_file() and "_gen" not in Path(name).parts:
            target_text: str | None = on_disk.read_text() if on_disk.suffix == ".md" else None
        elif name in generated:
            target_text = generated[name]
        else:
            broken.append(target)
            continue
        if anchor:
            known = anchors(target_text) if target_text is not None else _reference_anchors(name)
            if known is not None and anchor not in known:
                broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)} links to what does not exist: {broken}"


def test_research_log_is_one_file_per_round_as_written() -> None:
    folder = DOCS / "research"
    found = {p.name for p in folder.glob("*.md")} - {"index.md"}
    assert found == set(RESEARCH), f"research pages differ from the log's rounds: {sorted(found ^ set(RESEARCH))}"
    index = (folder / "index.md").read_text()
    for name, (heading, digest) in RESEARCH.items():
        first, _, body = (folder / name).read_text().partition("\n")
        assert first == heading, f"{name} starts with {first!r}, not its heading {heading!r}"
        assert hashlib.sha256(body.encode()).hexdigest()[:16] == digest, (
            f"{name} changed: the research log stays as written (only a moved link's path may change; update its "
            "digest in tests/test_docs.py with it)"
        )
        assert f"]({name})" in index, f"research/index.md does not list {name}"
    assert "python -m experiments." in index  # where the harnesses the log names run now


def test_the_adoption_table_is_the_committed_results() -> None:
    page = (DOCS / "when-it-helps.md").read_text()
    assert RESULTS.adoption_table() in page, (
        "docs/when-it-helps.md's table differs from the committed frontiers: paste results.adoption_table()"
    )


def test_every_committed_result_is_dated_and_published() -> None:
    pages = "\n".join(RESULTS.pages().values())
    results = sorted(RESULTS.RESULTS.glob("*.json"))
    assert results
    for path in results:
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", RESULTS.date_of(path, RESULTS.load(path)))
        assert f"## {path.name} {{#{path.stem}}}" in pages, f"{path.name} has no section on a results page"
    assert set(RESULTS.copies()) == {f"{RESULTS.DATA}/{p.name}" for p in results}


def test_frontier_pages_do_not_pass_bounds_off_as_measurements() -> None:
    """A run past the baseline's longest has no equal-time cell, and a frontier that starts above a target gives
    only a bound on the time to it, with no speedup."""
    first = {"time_s": 50.0, "accuracy": 0.92}
    s = {
        "frontier": {"full": {"time": [first]}, "crest": {"time": [{"time_s": 40.0, "accuracy": 0.90}, first]}},
        "points": {"full": {"0.5": {"wall_s": {"mean": 50.0}}}, "crest": {"0.5": {"wall_s": {"mean": 60.0}}}},
    }
    target = {"accuracy": 0.91, "time_s": {"full": 50.0, "crest": 45.0}, "speedup_vs_full": {"crest": 50 / 45}}
    assert RESULTS._time_to(s, target, "full") == "≤ 50.0 s"
    assert RESULTS._time_to(s, target, "crest") == "45.0 s"  # full's time is a bound: no ratio with it
    pair = {"mean": 0.004, "sd": 0.001, "n": 2}
    assert RESULTS._equal_time(s, {"equal_time": pair, "equal_time_beyond": []}, "crest", "full", "0.5") == (
        "+0.0040 ± 0.0010"
    )
    beyond = {"equal_time": pair, "equal_time_beyond": [1]}
    assert RESULTS._equal_time(s, beyond, "crest", "full", "0.5") == "+0.0040 ± 0.0010 (1 seed past full data's runs)"
    # A summary written before equal_time_beyond: judged by the mean times (CREST's 60 s past full's 50 s).
    assert RESULTS._equal_time(s, {"equal_time": pair}, "crest", "full", "0.5") == "past full data's runs"


def test_an_undated_result_stops_the_build() -> None:
    with pytest.raises(ValueError, match="has no date"):
        RESULTS.date_of(RESULTS.RESULTS / "no_date_here.json", {})


@pytest.mark.slow
def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    """The whole site, generated pages and API included, with every link and anchor checked (make docs)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocs_gen_files")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    assert (tmp_path / "site" / "reference" / "configuration" / "index.html").is_file()
    assert (tmp_path / "site" / "results" / "data" / "frontier_clean_reuse_loss02.json").is_file()
