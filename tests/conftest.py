"""Shared fixtures: a tiny demo project generated once per session, copied per test."""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Test data shipped in the repository (licences in ``tests/data/LICENSES.md``).
DATA = Path(__file__).resolve().parent / "data"

#: Test-only helper modules (e.g. ``stage_faults``), importable by name here and in the worker
#: processes that unpickle test-defined stages (they inherit ``sys.path``).
HELPERS = Path(__file__).resolve().parent / "helpers"
if str(HELPERS) not in sys.path:
    sys.path.insert(0, str(HELPERS))

from tracker_env import wandb_settled  # noqa: E402  (needs HELPERS on sys.path)


@pytest.fixture(scope="session")
def openslide_fixtures() -> Path:
    """OpenSlide's own small good and broken test files."""
    path = DATA / "openslide-fixtures"
    assert path.is_dir(), f"missing {path}: part of the repository (tests/data)"
    return path


@pytest.fixture(scope="session")
def real_slide() -> Path:
    """A real Aperio H&E crop (2220x2967, one level, MPP 0.499)."""
    path = DATA / "real" / "cmu_small_region.svs"
    assert path.is_file(), f"missing {path}: part of the repository (tests/data)"
    return path


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated 5-slide tiny demo project (slides, features, checkpoint, config, list)."""
    from clam_heat.demo import make_demo_project

    folder = tmp_path_factory.mktemp("demo_source") / "demo"
    make_demo_project(folder, n_slides=5, size="tiny")
    return folder


@pytest.fixture()
def demo_project(demo_source: Path, tmp_path: Path) -> Path:
    """A fresh copy of the demo project with no outputs yet; returns its config path."""
    folder = tmp_path / "demo"
    shutil.copytree(demo_source, folder)
    return folder / "config.yaml"


def _checkout_changes(root: Path) -> set[str] | None:
    """Paths git reports as changed or untracked (not ignored) in the checkout; None if no git."""
    import subprocess

    try:
        done = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"],
            cwd=root, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return set(done.stdout.splitlines())


@pytest.fixture(scope="session", autouse=True)
def tests_leave_the_checkout_alone() -> Iterator[None]:
    """Every test writes under its temp folder: fail the run if the checkout gained files."""
    root = Path(__file__).resolve().parents[1]
    before = _checkout_changes(root)
    yield
    after = _checkout_changes(root)
    if before is not None and after is not None:
        added = sorted(after - before)
        assert not added, f"tests wrote into the checkout: {added}"


@pytest.fixture(autouse=True)
def no_model_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs inside a test worker stay in one process: forking a worker that has loaded torch
    copies its threads' locks held, and the child can wait on them forever. The model process
    is tested in fresh interpreters (tests/test_lazy_imports.py), which drop this switch."""
    monkeypatch.setenv("CLAM_HEAT_MODEL_PROCESS", "0")


@pytest.fixture(autouse=True)
def clam_heat_logging_restored() -> Iterator[None]:
    """The ``clam_heat`` logger as it was before the test: a CLI run adds a handler on its log
    file and stops propagation, which would leak into later tests (a worker pool then logs to a
    deleted test folder; ``caplog`` sees nothing)."""
    logger = logging.getLogger("clam_heat")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    for handler in list(logger.handlers):
        if handler not in handlers:
            logger.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in logger.handlers:
            logger.addHandler(handler)
    logger.propagate, logger.level = propagate, level


@pytest.fixture()
def quiet_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No tracking server, API key or user folders: everything MLflow/W&B write is in tmp_path,
    and W&B starts afresh with this environment (its service is torn down before and after)."""
    for name in ("MLFLOW_TRACKING_URI", "WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name in ("MLFLOW_ALLOW_FILE_STORE", "MLFLOW_CONFIGURE_LOGGING"):  # undone after the test
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb_settled()
    yield
    wandb_settled()


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty working directory (CLAM's paths are CWD-relative; relative config paths
    that do not exist resolve here)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work
