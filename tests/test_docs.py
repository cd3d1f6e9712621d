"""Every command in the docs is checked: README.md and docs/*.md.

Each fenced ``bash`` block carries a marker on the line just before its fence:

- ``<!-- runnable -->``: run here, in order, in a temporary directory per page that holds a
  fresh built-in sample store, ``sample.zarr`` (and links to the repository's ``tests/``,
  ``examples/`` and ``benchmarks/``, which some commands read). ``python`` blocks may be
  marked runnable too.
- ``<!-- tested-by: tests/test_x.py::test_name -->``: a test that runs the same thing (the
  full-size command needs a GPU, a cluster, several hosts or a long run); it must exist.
- ``<!-- not-run: reason -->``: only for what cannot run anywhere in CI; rare, with a reason.

Also: every fence names its language (so no command hides in an unlabelled block), the
README stays short, and relative links (and their #anchors) point at what exists.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import background

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250
MAX_NOT_RUN = 3
BLOCK_TIMEOUT_S = 600
LINKED_INTO_RUN_DIR = ("tests", "examples", "benchmarks")
PACKAGES = ("aurora_loop", "callbacks", "datasets")

FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([^`\s]*)")
MARKER = re.compile(r"^\s*<!--\s*(runnable|tested-by:|not-run:)\s*(.*?)\s*-->\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # the text may span lines
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None  # "runnable", "tested-by:" or "not-run:"
    argument: str  # the test for tested-by, the reason for not-run

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse(page: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a page, and its lines outside them (blank in their place)."""
    lines = page.read_text().splitlines()
    blocks, prose = [], []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            prose.append(lines[i])
            i += 1
            continue
        fence, lang = match.group(1), match.group(2).lower()
        start = i
        i += 1
        body = []
        while i < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        previous = MARKER.match(lines[start - 1]) if start else None
        marker = previous.group(1) if previous else None
        argument = previous.group(2) if previous else ""
        blocks.append(Block(page, start + 1, lang, "\n".join(body) + "\n", marker, argument))
        prose.extend([""] * (i - start))
    return blocks, prose


ALL_BLOCKS = [block for page in PAGES for block in parse(page)[0]]
RUN_PAGES = [page for page in PAGES if any(b.marker == "runnable" for b in parse(page)[0])]


def test_every_fence_names_its_language():
    unnamed = [b.where for b in ALL_BLOCKS if not b.lang]
    assert not unnamed, f"fenced blocks without a language (use bash for commands, text for output): {unnamed}"


def test_every_bash_block_has_a_marker():
    missing = [b.where for b in ALL_BLOCKS if b.lang in ("bash", "sh", "shell", "console") and b.marker is None]
    assert not missing, (
        "bash blocks without a marker on the line before the fence "
        "(<!-- runnable -->, <!-- tested-by: tests/test_x.py::test_name --> or <!-- not-run: reason -->): " + ", ".join(missing)
    )


def test_commands_are_in_bash_blocks():
    other_shells = [b.where for b in ALL_BLOCKS if b.lang in ("sh", "shell", "console")]
    assert not other_shells, f"write command blocks as ```bash: {other_shells}"


def test_only_bash_and_python_blocks_run():
    wrong = [f"{b.where} ({b.lang})" for b in ALL_BLOCKS if b.marker == "runnable" and b.lang not in ("bash", "python")]
    assert not wrong, f"only bash and python blocks can be runnable: {wrong}"


def test_no_stray_markers():
    """A marker must sit on the line just before a fence, or it checks nothing."""
    stray = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for n, line in enumerate(lines):
            if MARKER.match(line) and not (n + 1 < len(lines) and FENCE.match(lines[n + 1])):
                stray.append(f"{page.relative_to(ROOT)}:{n + 1}")
    assert not stray, f"markers not followed by a fence: {stray}"


def _test_names(path: Path) -> set[str]:
    """Test functions of a file: ``test_x`` and ``Class::test_x``."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.update(
                f"{node.name}::{item.name}" for item in node.body if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
            )
    return names


def test_tested_by_names_an_existing_test():
    problems = []
    for block in ALL_BLOCKS:
        if block.marker != "tested-by:":
            continue
        file, sep, name = block.argument.partition("::")
        path = ROOT / file
        if not sep or not name.split("::")[-1].startswith("test_"):
            problems.append(f"{block.where}: {block.argument!r} is not tests/test_x.py::test_name")
        elif not path.is_file():
            problems.append(f"{block.where}: {file} does not exist")
        elif name not in _test_names(path):
            problems.append(f"{block.where}: {file} has no test {name}")
    assert not problems, "\n".join(problems)


def test_not_run_is_rare_and_gives_a_reason():
    not_run = [b for b in ALL_BLOCKS if b.marker == "not-run:"]
    without_reason = [b.where for b in not_run if len(b.argument) < 10]
    assert not without_reason, f"not-run markers need a reason: {without_reason}"
    assert len(not_run) <= MAX_NOT_RUN, f"{len(not_run)} not-run blocks (at most {MAX_NOT_RUN}): {[b.where for b in not_run]}"


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {README_MAX_LINES - 1})"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to dashes."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    text = re.sub(r"[^\w\- ]", "", text.replace("`", ""))
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, seen = set(), {}
    for line in parse(page)[1]:
        match = HEADING.match(line)
        if match:
            slug = _slug(match.group(2))
            count = seen.get(slug, 0)
            anchors.add(slug if count == 0 else f"{slug}-{count}")
            seen[slug] = count + 1
    return anchors


def test_relative_links_point_at_what_exists():
    broken = []
    for page in PAGES:
        prose = "\n".join(parse(page)[1])
        prose = re.sub(r"`[^`\n]*`", lambda m: " " * len(m.group(0)), prose)  # no links inside inline code
        for match in LINK.finditer(prose):
            target = match.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            where = f"{page.relative_to(ROOT)}:{prose.count(chr(10), 0, match.start()) + 1}: {target}"
            if not path.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{where} (no heading #{anchor} in {path.relative_to(ROOT)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_architecture_names_every_module():
    """docs/architecture.md gives every module of the three packages its line."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    modules = sorted(str(p.relative_to(ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
    missing = [m for m in modules if f"`{m}`" not in text]
    assert not missing, f"docs/architecture.md does not describe: {missing}"
    gone = sorted(set(re.findall(r"^\| `((?:aurora_loop|callbacks|datasets)/[\w/]+\.py)`", text, re.M)) - set(modules))
    assert not gone, f"docs/architecture.md describes modules that no longer exist: {gone}"


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # aurora-train, aurora-loop
    env["JAX_NUM_CPU_DEVICES"] = "1"  # a block may set its own
    env.pop("PYTHONPATH", None)
    return env


_SAMPLE_LOCK = threading.Lock()


def _sample_store(root: Path) -> Path:
    """The built-in sample store, written once (by the first job that needs it) and copied
    into each page's run directory."""
    with _SAMPLE_LOCK:
        store = root / "sample" / "sample.zarr"
        if not store.exists():
            store.parent.mkdir(parents=True, exist_ok=True)
            result = background.run(["aurora-loop", "sample-data", "sample.zarr"], cwd=store.parent, env=_environment(),
                                    timeout=BLOCK_TIMEOUT_S)
            assert result.returncode == 0, result.stderr
        return store


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# The pages, the benchmarks and the example are independent subprocess work, mostly XLA
# compiling on one thread: they run in the background (tests/background.py), submitted when
# collection ends, and each test then checks its own result.


def _run_page(page: Path, root: Path, directory: Path) -> tuple[str | None, str]:
    """A page's runnable blocks, in order, in one directory: bash -euo pipefail, or python.
    Returns (the failure message or None, the blocks' timings)."""
    directory.mkdir(parents=True)
    shutil.copytree(_sample_store(root), directory / "sample.zarr")
    for name in LINKED_INTO_RUN_DIR:
        (directory / name).symlink_to(ROOT / name)
    env = _environment()
    timings = []
    for block in (b for b in parse(page)[0] if b.marker == "runnable"):
        if block.lang == "python":
            script = directory / f"block_{block.line}.py"
            script.write_text(block.code)
            command = [sys.executable, str(script)]
        else:
            command = ["bash", "-euo", "pipefail", "-c", block.code]
        start = time.monotonic()
        result = background.run(command, cwd=directory, env=env, timeout=BLOCK_TIMEOUT_S)
        timings.append(f"{block.where}: {time.monotonic() - start:.1f} s")
        if result.returncode != 0:
            return (
                f"{block.where}: the {block.lang} block failed with exit status {result.returncode}\n"
                f"--- block ---\n{block.code}--- stderr (tail) ---\n{_tail(result.stderr)}\n--- stdout (tail) ---\n{_tail(result.stdout, 10)}"
            ), "\n".join(timings)
    return None, "\n".join(timings)


_JOBS: dict[str, Future] = {}  # "page:<path>" or "smoke:<name>" -> the background job
_JOBS_LOCK = threading.Lock()


def _start_jobs(tmp_path_factory: pytest.TempPathFactory, pages: bool = True, smokes: bool = True) -> None:
    """Submit the page runs and the smoke runs that are not submitted yet (once per session)."""
    runner = background.background()
    with _JOBS_LOCK:
        if pages and not any(k.startswith("page:") for k in _JOBS):
            root = tmp_path_factory.mktemp("pages")
            for i, page in enumerate(RUN_PAGES):
                _JOBS[f"page:{page}"] = runner.submit(lambda page=page, i=i: _run_page(page, root, root / f"page{i}"))
        if smokes and not any(k.startswith("smoke:") for k in _JOBS):
            for name in SMOKE_ORDER:
                directory = tmp_path_factory.mktemp(name)
                _JOBS[f"smoke:{name}"] = runner.submit(lambda name=name, directory=directory: _run_smoke(name, directory))


def start_background_work(tmp_path_factory: pytest.TempPathFactory, names: set[str]) -> None:
    """Called by conftest.py when collection ends, with the selected tests' names."""
    _start_jobs(tmp_path_factory, pages=any(n.startswith("test_runnable_blocks_run") for n in names),
                smokes=any(n.startswith(("test_benchmarks_run_at_a_smoke_size", "test_fine_tune_example_runs")) for n in names))


@pytest.fixture(scope="module")
def page_runs(tmp_path_factory) -> dict[Path, tuple[str | None, str]]:
    _start_jobs(tmp_path_factory, smokes=False)
    return {page: background.background().wait(_JOBS[f"page:{page}"]) for page in RUN_PAGES}


@pytest.mark.parametrize("page", RUN_PAGES, ids=[str(p.relative_to(ROOT)) for p in RUN_PAGES])
def test_runnable_blocks_run(page, page_runs):
    failure, timings = page_runs[page]
    print(timings)
    assert failure is None, failure


# The benchmarks' documented commands take minutes to hours (docs/performance.md); these
# smoke sizes keep each script working: it runs and ends with its ratio line.
BENCHMARK_SMOKE = {
    "loop_overhead": ["--steps", "5", "--repeats", "1"],
    "loader_throughput": ["--grid", "16x32", "--levels", "2", "--times", "8", "--repeats", "1"],
    "compile_time": ["--model", "tiny", "--grid", "32", "64", "--levels", "4", "--repeats", "1"],
    "step_time": ["--model", "tiny", "--grid", "32", "64", "--levels", "4", "--steps", "1", "--warmup", "1", "--no-memory"],
    "attention": ["--model", "tiny", "--grid", "32", "64", "--levels", "4", "--rounds", "1"],
    "memory": ["--model", "tiny", "--grid", "16", "32", "--levels", "2", "--devices", "2"],
    "reference_ab": ["--model", "tiny", "--grid", "32", "64", "--levels", "4", "--rounds", "1",
                     "--variants", "default,windowed_qkv,before_26", "--level-chunk-tokens", "64"],
    "scan_blocks": ["--model", "tiny", "--grid", "32", "64", "--levels", "4", "--depths", "1,4,1", "--rounds", "1", "--no-remat"],
    "memory_table": ["--model", "tiny", "--grid", "32x64", "--quick", "--devices", "2", "--out", "table.jsonl"],
    "memory_vs_reference": ["--grid", "32", "64", "--levels", "4"],
    "space_memory": ["--model", "tiny", "--grid", "208x64", "--spaces", "1,2", "--no-fsdp"],
}


# Benchmarks with tests of their own.
NOT_SMOKED = {"gpu_report": "tests/test_gpu_report.py", "scaling": "tests/test_scaling_benchmark.py"}


def _fine_tune_command() -> list[str]:
    """examples/fine_tune.py (docs/finetuning.md) at a smoke size: one epoch, ended early by its own --max_time."""
    return [
        sys.executable,
        str(ROOT / "examples" / "fine_tune.py"),
        "--output_dir",
        "ft",
        "--epochs",
        "1",
        "--max_time",
        "00:00:30",
    ]


def _run_smoke(name: str, directory: Path) -> tuple[subprocess.CompletedProcess, Path]:
    command = _fine_tune_command() if name == "fine_tune" else [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *BENCHMARK_SMOKE[name]]
    env = _environment()
    env["JAX_NUM_CPU_DEVICES"] = "2" if name in ("memory", "memory_table", "space_memory") else "1"
    return background.run(command, cwd=directory, env=env, timeout=BLOCK_TIMEOUT_S), directory


# The longest first, so that the lanes end together.
SMOKE_ORDER = ["fine_tune", "memory", "memory_vs_reference", "memory_table", "space_memory", "attention", "scan_blocks", "reference_ab", "step_time", "compile_time", "loop_overhead", "loader_throughput"]


def test_every_benchmark_has_a_smoke_run():
    assert sorted(SMOKE_ORDER) == sorted([*BENCHMARK_SMOKE, "fine_tune"])
    assert sorted(BENCHMARK_SMOKE) == sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_")
                                             and p.stem not in NOT_SMOKED)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every benchmark at its smoke size and the fine-tuning example."""
    _start_jobs(tmp_path_factory, pages=False)
    return {name: background.background().wait(_JOBS[f"smoke:{name}"]) for name in SMOKE_ORDER}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BENCHMARK_SMOKE))
def test_benchmarks_run_at_a_smoke_size(name, smoke_runs):
    result, _ = smoke_runs[name]
    assert result.returncode == 0, f"{' '.join(result.args)}: exit status {result.returncode}\n{_tail(result.stderr)}"
    last = result.stdout.strip().splitlines()[-1]
    assert re.match(r"^\w+=", last), f"{name}: the last line should be its ratio, got {last!r}"


@pytest.mark.slow
def test_fine_tune_example_runs(smoke_runs):
    """examples/fine_tune.py (docs/finetuning.md) at a smoke size: one epoch, ended early by its own --max_time."""
    result, directory = smoke_runs["fine_tune"]
    assert result.returncode == 0, f"{' '.join(result.args)}: exit status {result.returncode}\n{_tail(result.stderr)}"
    assert "2t RMSE by lead time (EMA weights): 6h" in result.stdout, _tail(result.stdout)
    assert (directory / "ft" / "checkpoints").is_dir()
