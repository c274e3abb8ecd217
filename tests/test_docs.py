"""The documentation holds: the site builds strictly (no broken link, anchor or docstring), the
README stays a front page whose commands are real, and the configuration page matches the schema.

The site is built into the test's own tmp_path and nothing is written in the checkout, so the
test runs in parallel with the rest of the suite.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import typer

from clam_heat.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

#: Lines of the README a reader sees before scrolling: the two commands must be in it.
FIRST_SCREEN = 40


def _load_docs_module(name: str) -> ModuleType:
    """A script of docs/ (not a package) imported by path."""
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bash_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, body) of every ```bash block of a Markdown text."""
    return [
        (text[: m.start()].count("\n") + 2, m.group(1))
        for m in re.finditer(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    ]


def _command_lines(body: str) -> list[str]:
    """Shell lines of a block, with backslash continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    lines = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def _cli_options() -> dict[str, set[str]]:
    group = typer.main.get_command(app)
    return {
        name: {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for name, command in group.commands.items()  # type: ignore[attr-defined]
    }


def _clam_heat_calls(text: str) -> list[tuple[str, str, list[str]]]:
    """(line, subcommand, --options) of every ``clam-heat`` call in the text's bash blocks."""
    calls = []
    for _, body in _bash_blocks(text):
        for line in _command_lines(body):
            for part in line.split("&&"):
                words = part.split()
                if "clam-heat" not in words:
                    continue
                rest = words[words.index("clam-heat") + 1 :]
                if not rest or rest[0] in ("...", "COMMAND"):
                    continue
                options = [w.strip("[]|").split("=")[0] for w in rest]
                calls.append((line, rest[0], [o for o in options if o.startswith("--")]))
    return calls


def _cited_pages() -> list[tuple[str, str, str]]:
    """(file, page, anchor) of every ``docs/<page>.md#<anchor>`` cited in the code and tests."""
    cited = []
    for folder in ("clam_heat", "tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            for m in re.finditer(r"docs/([\w/.-]+?\.md)(?:#([\w-]+))?", text):
                cited.append((str(path.relative_to(ROOT)), m.group(1), m.group(2) or ""))
    return cited


def test_site_builds_strictly(tmp_path: Path) -> None:
    """``mkdocs build --strict``: a broken link or anchor, an unknown page or a docstring the API
    reference cannot render fails the build (and this test)."""
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
         "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # the pages the code comments cite, with their anchors, and the generated API reference
    rules = (site / "rules" / "heatmaps" / "index.html").read_text(encoding="utf-8")
    assert 'id="percentile-scores"' in rules
    formats = (site / "rules" / "formats" / "index.html").read_text(encoding="utf-8")
    assert 'id="patch-size-rules"' in formats
    api = (site / "api" / "heatmap" / "index.html").read_text(encoding="utf-8")
    assert "clam_heat.heatmap.maths.to_percentiles" in api
    assert "language-pycon" in api or 'class="gp"' in api  # doctests shown as code
    # every docs page (and anchor) a code comment cites exists in the built site
    for source, page, anchor in _cited_pages():
        html = site / ("index.html" if page == "index.md" else page[: -len(".md")] + "/index.html")
        assert html.is_file(), f"{source} cites docs/{page}, which is not a page of the site"
        if anchor:
            text = html.read_text(encoding="utf-8")
            assert f'id="{anchor}"' in text, f"{source} cites docs/{page}#{anchor}: no such anchor"


def test_readme_is_a_front_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move sections to docs/"


def test_readme_links_resolve() -> None:
    """The README is not part of the site build, so its links are checked here: every relative
    link (pages, pictures) names a file of the checkout."""
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and t[0] != "#"]
    assert "docs/configuration.md" in local and "docs/img/video_frames.jpg" in local
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_first_screen_has_the_two_commands() -> None:
    """The demo command and the test command are at the top, and the test command is the one CI
    runs, word for word."""
    text = README.read_text(encoding="utf-8")
    first = "\n".join(text.splitlines()[:FIRST_SCREEN])
    blocks = _bash_blocks(first)
    assert blocks, f"no ```bash block in the first {FIRST_SCREEN} lines of README.md"
    _, body = blocks[0]
    comments = [line for line in body.splitlines() if line.startswith("#")]
    assert comments[0].startswith("# 1. install and run the demo"), comments
    assert comments[1].startswith("# 2. install and run the tests"), comments
    demo, tests = _command_lines(body)
    assert demo.endswith("clam-heat demo")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert tests in ci, ".ci/run must run exactly the README's test command"
    # both install the pinned torch first, then the package
    for command in (demo, tests):
        steps = [s.strip() for s in command.split("&&")]
        torch_step = next(i for i, s in enumerate(steps) if s.startswith("pip install torch"))
        package_step = next(i for i, s in enumerate(steps) if s.startswith("pip install -e"))
        assert torch_step < package_step
    assert shlex.split(tests.split("&&")[-1]) == ["pytest"]


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in DOCS.rglob("*.md"))]
)
def test_every_documented_command_is_real(page: str) -> None:
    """Each ``clam-heat`` call in a README or docs bash block names a real command and options
    that command has (as ``--help`` lists them)."""
    path = ROOT / page
    options = _cli_options()
    for line, command, flags in _clam_heat_calls(path.read_text(encoding="utf-8")):
        assert command in options, f"{page}: {line!r}: no command {command!r}"
        unknown = [f for f in flags if f not in options[command]]
        assert not unknown, f"{page}: {line!r}: {command} has no option {unknown}"
    # the repository's own scripts (docs/, bench/, examples/) that a page tells you to run
    for _, body in _bash_blocks(path.read_text(encoding="utf-8")):
        for line in _command_lines(body):
            for script in re.findall(r"\bpython3? ((?:docs|bench|examples)/\S+\.py)", line):
                assert (ROOT / script).is_file(), f"{page}: {line!r}: no script {script}"


def test_command_check_catches_a_wrong_option() -> None:
    """The checker above is not vacuous: it sees calls inside blocks, continuations included."""
    text = "```bash\nclam-heat run CONFIG \\\n    --dry-run --wrokers 2   # typo\n```\n"
    ((_, command, flags),) = _clam_heat_calls(text)
    assert command == "run"
    assert "--wrokers" in flags and "--wrokers" not in _cli_options()["run"]


def test_configuration_page_matches_the_schema() -> None:
    """docs/configuration.md lists every key with its current default and description."""
    from clam_heat.config.schema import BLOCKS, HeatmapConfig

    make = _load_docs_module("make_config_reference")
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    first = make.config_reference()
    HeatmapConfig()  # validating a config resolves pydantic's forward references (``classes``)
    assert make.config_reference() == first, "the page must not depend on what ran before"
    assert make.updated_page(page) == page, (
        "docs/configuration.md is out of date: run python docs/make_config_reference.py"
    )

    for block, model in BLOCKS.items():
        assert f"{{#{block}}}" in page
        for key in model.model_fields:
            assert f"| `{key}` |" in page, f"{block}.{key} missing from the page"


def test_configuration_page_shows_the_defaults() -> None:
    """Spot checks against CLAM's template values, written by hand (not from the schema)."""
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    for row in (
        "| `alpha` | float (>= 0, <= 1) | `0.4` |",
        "| `vis_level` | int (>= -1) | `1` |",
        "| `label_dict` | mapping str → int | `{LUAD: 0, LSCC: 1}` |",
        "| `samples[].k` | int (>= 1) | `15` |",
        "| `flush_seconds` | float (>= 0) | `30.0` |",
    ):
        assert row.replace(">", "&gt;").replace("<", "&lt;") in page, row


def test_doctest_fences() -> None:
    """The API reference's griffe extension fences doctests, and leaves author fences alone."""
    fence = _load_docs_module("griffe_doctests").fence_doctests
    text = "Sum.\n\n    >>> 1 + 1\n    2\n\nDone.\n\n```python\n>>> x\n```"
    assert fence(text).splitlines() == [
        "Sum.", "", "    ```pycon", "    >>> 1 + 1", "    2", "    ```", "", "Done.", "",
        "```python", ">>> x", "```",
    ]  # fmt: skip
