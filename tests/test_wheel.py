"""What the product ships: the wheel that ``make wheel`` builds holds the four installed packages and nothing of the
project's research (``experiments/``), and the images' build context and Dockerfiles leave the research out too."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The installed packages; the wheel's metadata folder beside them.
PACKAGES = {"crest", "crest_bench", "selector_service", "trainer_client"}
# crest_bench: the benchmarks a user runs on their own machine (crest bench ...), the demo and the GPU check.
BENCH_MODULES = {
    "__init__",
    "_progress",
    "_workers",
    "cli",
    "crest_flags",
    "crest_workload",
    "dataloading",
    "demo",
    "facility_location",
    "gpu_check",
    "integrations",
    "report",
    "service",
    "train",
    "train_data",
    "train_methods",
    "train_report",
}
RESEARCH = re.compile(r"experiments|frontier|offload|staleness", re.IGNORECASE)


def test_the_wheel_holds_the_product_and_no_research_harness(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("crest_selection-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops - {next(t for t in tops if t.endswith(".dist-info"))} == PACKAGES
    bench = {Path(n).stem for n in names if n.startswith("crest_bench/")}
    assert bench == BENCH_MODULES
    assert [n for n in names if RESEARCH.search(n)] == []
    assert "crest/selector/v1/selector.proto" in names and "trainer_client/integrations/steps.py" in names


def test_the_images_copy_no_research_harness() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "experiments" in ignored
    for dockerfile in sorted((ROOT / "deploy").glob("*.Dockerfile")):
        sources = [line.split()[1:-1] for line in dockerfile.read_text().splitlines() if line.startswith("COPY ")]
        copied = [s for words in sources for s in words if not s.startswith("--")]
        assert copied, dockerfile
        assert [s for s in copied if RESEARCH.search(s) or s in (".", "./")] == [], (dockerfile.name, copied)
