"""Checks of the machine: Python, packages, OpenSlide, torch devices, output folders, browser.

Each check runs the real component on a tiny input (a generated pyramid, a two-layer forward)
rather than only importing it, so a broken C library, driver or wheel shows here. Packages are
imported inside the checks: a missing one is a failed line, not a traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import DoctorReport, first_line

__all__ = [
    "BROWSERS",
    "DEPENDENCIES",
    "Dependency",
    "check_browser",
    "check_dependency",
    "check_encoder_backend",
    "check_openslide",
    "check_outputs",
    "check_python",
    "check_torch",
    "existing_parent",
]

PYTHON_MIN = (3, 11)
OPENSLIDE_LIBRARY_MIN = "4.0"
LOW_SPACE_MB = 1024
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


@dataclass(frozen=True)
class Dependency:
    """A package: import name, pip distribution and minimum version (as in pyproject.toml)."""

    module: str
    dist: str
    minimum: str
    required: bool = True
    why: str = ""


DEPENDENCIES: tuple[Dependency, ...] = (
    Dependency("numpy", "numpy", "1.26"),
    Dependency("pandas", "pandas", "2.1"),
    Dependency("h5py", "h5py", "3.10"),
    Dependency("torch", "torch", "2.1"),
    Dependency("openslide", "openslide-python", "1.3"),
    Dependency("tifffile", "tifffile", "2024.1"),
    Dependency("imagecodecs", "imagecodecs", "2024.1"),
    Dependency("cv2", "opencv-python-headless", "4.8"),
    Dependency("PIL", "pillow", "10"),
    Dependency("scipy", "scipy", "1.11"),
    Dependency("matplotlib", "matplotlib", "3.8"),
    Dependency("pydantic", "pydantic", "2.5"),
    Dependency("yaml", "pyyaml", "6"),
    Dependency("typer", "typer", "0.12"),
    Dependency("rich", "rich", "13"),
    Dependency("safetensors", "safetensors", "0.4"),
    Dependency(
        "pyvips", "pyvips", "2.2", True, "libvips from pyvips-binary: large JPEG/PNG heatmaps"
    ),
    Dependency("tensorboard", "tensorboard", "2.14", False, "training-time attention maps"),
    Dependency("dask", "dask[distributed]", "2024.1", False, "the dask executor"),
    Dependency("mlflow", "mlflow-skinny", "2.12", False, "runner_arguments.tracker: mlflow"),
    Dependency("wandb", "wandb", "0.19.10", False, "runner_arguments.tracker: wandb"),
)
"""What clam-heat needs (required) and what some features use (optional). ``openslide-bin``,
the OpenSlide library itself, is checked by the library-version line."""

_IMPORT_FIXES = {
    "openslide": "pip install openslide-bin (the OpenSlide library), or apt-get install "
    "libopenslide0",
    "cv2": "pip uninstall opencv-python && pip install opencv-python-headless (needs no libGL)",
}


def _version_tuple(text: str) -> tuple[int, ...]:
    """Leading numeric parts of a version.

    >>> _version_tuple("2.13.0+cpu"), _version_tuple("2024.1"), _version_tuple("1.0rc1")
    ((2, 13, 0), (2024, 1), (1, 0))
    """
    parts: list[int] = []
    for piece in text.split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    return tuple(parts)


def _version_of(module: Any, dist: str) -> str:
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(dist.split("[")[0])
    return "unknown"


def check_python(report: DoctorReport) -> None:
    found = ".".join(map(str, sys.version_info[:3]))
    need = ".".join(map(str, PYTHON_MIN))
    ok = sys.version_info[:2] >= PYTHON_MIN
    fix = f"use Python {need} or newer (a fresh venv: python{need} -m venv .venv)"
    report.add("python", ok, f"{found} at {sys.executable} (needs >= {need})", fix)


def check_dependency(report: DoctorReport, dep: Dependency) -> Any:
    """Import one package and report its version; returns the module, or None."""
    pip = f"pip install '{dep.dist}>={dep.minimum}'"
    fail: bool | None = False if dep.required else None
    try:
        module = importlib.import_module(dep.module)
    except ModuleNotFoundError as err:
        if err.name in (None, dep.module) or importlib.util.find_spec(dep.module) is None:
            role = "required" if dep.required else f"optional, for {dep.why}"
            report.add(dep.dist, fail, f"not installed ({role})", pip)
            return None
        report.add(dep.dist, fail, f"installed but cannot import ({first_line(err)})", pip)
        return None
    except Exception as err:  # noqa: BLE001 - a missing C library or a wrong ABI counts too
        fix = _IMPORT_FIXES.get(dep.module, f"{pip} --force-reinstall")
        report.add(dep.dist, fail, f"installed but cannot import ({first_line(err)})", fix)
        return None
    version = _version_of(module, dep.dist)
    too_old = _version_tuple(version) < _version_tuple(dep.minimum)
    detail = f"{version} (needs >= {dep.minimum})" if too_old else version
    if dep.module == "h5py":
        detail += f", HDF5 {getattr(getattr(module, 'version', None), 'hdf5_version', '?')}"
    elif dep.module == "torch":
        cuda = getattr(getattr(module, "version", None), "cuda", None)
        detail += f", CUDA {cuda} build" if cuda else ", CPU-only build"
    report.add(dep.dist, fail if too_old else True, detail, f"{pip} --upgrade")
    return module


def check_openslide(report: DoctorReport, openslide: Any) -> None:
    """The C library's version, then a generated tiled JPEG pyramid written, opened, read back."""
    name = "OpenSlide pyramid"
    if openslide is None:
        report.add(name, False, "skipped: openslide-python does not import", "see its line")
        return
    library = str(getattr(openslide, "__library_version__", "unknown"))
    if _version_tuple(library) < _version_tuple(OPENSLIDE_LIBRARY_MIN):
        detail = f"{library} (older than {OPENSLIDE_LIBRARY_MIN}: some formats may not open)"
        report.add("OpenSlide library", None, detail, "pip install openslide-bin")
    else:
        report.add("OpenSlide library", True, library)
    fix = "pip install --upgrade openslide-bin tifffile imagecodecs"
    try:
        from clam_heat.demo import make_demo_slide
        from clam_heat.slide import open_slide

        with tempfile.TemporaryDirectory(prefix="clam-heat-doctor-") as tmp:
            path = Path(tmp) / "pyramid.tiff"
            make_demo_slide(path, width=1024, height=768, tile=256, seed=1)
            with open_slide(path) as slide:
                dims = slide.level_dimensions
                low = slide.read_region((0, 0), len(dims) - 1, dims[-1])
                top = slide.read_region((256, 256), 0, (256, 256))
    except Exception as err:  # noqa: BLE001 - any failure here is this line's answer
        report.add(name, False, f"tiled JPEG pyramid failed ({first_line(err)})", fix)
        return
    spread = float(top.std())
    if len(dims) < 2 or low.shape[:2] != dims[-1][::-1] or spread == 0.0:
        report.add(name, False, f"read back wrong (levels {dims}, pixel spread {spread})", fix)
        return
    report.add(name, True, f"wrote, opened and read a {len(dims)}-level tiled JPEG TIFF")


def _devices(torch: Any) -> tuple[list[str], str]:
    """Devices torch can use, and the driver's warning when CUDA is not usable."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cuda = bool(torch.cuda.is_available())
    found = ["cpu"]
    if cuda:
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found, "; ".join(str(w.message).strip().split("\n")[0] for w in caught)


def _tiny_forward(torch: Any, device: str) -> None:
    """A seeded two-layer forward on ``device``, compared with the same forward on the CPU."""
    gen = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(32, 16, generator=gen), torch.randn(3, 32, generator=gen)
    x = torch.randn(64, 16, generator=gen)

    def forward(dev: str) -> Any:
        with torch.inference_mode():
            hidden = torch.relu(x.to(dev) @ w1.to(dev).T)
            return torch.softmax(hidden @ w2.to(dev).T, dim=1).float().cpu()

    got, want = forward(device), forward("cpu")
    if not torch.isfinite(got).all() or not torch.allclose(got, want, atol=1e-2):
        raise RuntimeError(f"results differ from the CPU's by {float((got - want).abs().max())}")


def check_torch(report: DoctorReport, torch: Any, wanted: str = "auto") -> None:
    """The devices torch sees, and a tiny forward on each; ``wanted``: the configured device."""
    if torch is None:
        report.add("torch devices", False, "skipped: torch does not import", "see its line")
        return
    found, note = _devices(torch)
    cuda_seen = any(d.startswith("cuda") for d in found)
    names = [
        f"{d} ({torch.cuda.get_device_name(int(d.split(':')[1]))})" if d.startswith("cuda") else d
        for d in found
    ]
    fix = "install the torch build for your CUDA driver (pytorch.org), or set device: cpu"
    if wanted.startswith("cuda") and not cuda_seen:
        why = note or ("no GPU is visible" if torch.version.cuda else "torch is a CPU-only build")
        report.add("torch devices", False, f"device {wanted!r} is configured but {why}", fix)
    elif torch.version.cuda and not cuda_seen:
        detail = f"{', '.join(names)}; the CUDA build sees no GPU" + (f" ({note})" if note else "")
        report.add("torch devices", None, detail, fix)
    else:
        report.add("torch devices", True, ", ".join(names))
    for dev in found:
        start = time.perf_counter()
        try:
            _tiny_forward(torch, dev)
        except Exception as err:  # noqa: BLE001 - a broken kernel or driver is the answer
            used = dev == "cpu" or (dev.startswith("cuda") and wanted in ("auto", "cuda", dev))
            fix_dev = "pip install --force-reinstall torch" if dev == "cpu" else fix
            report.add(f"forward on {dev}", False if used else None, first_line(err), fix_dev)
            continue
        report.add(f"forward on {dev}", True, f"ok in {1e3 * (time.perf_counter() - start):.0f} ms")


def check_encoder_backend(report: DoctorReport) -> None:
    """timm builds CLAM's timm encoders when it imports; otherwise the built-in networks do."""
    try:
        from clam_heat.encoders import encoder_backend

        backend = encoder_backend("resnet50_trunc")  # one that CLAM builds with timm
    except Exception as err:  # noqa: BLE001 - report, never crash the doctor
        report.add("timm", None, f"cannot tell the encoder backend ({first_line(err)})")
        return
    if backend.startswith("timm"):
        report.add("timm", True, f"{backend.split('==')[-1]}: encoders built with timm, as CLAM")
    elif importlib.util.find_spec("timm") is not None:
        detail = "installed but does not import; built-in networks in use (same outputs)"
        fix = "pip install the torchvision that matches your torch, or pip uninstall timm"
        report.add("timm", None, detail, fix)
    else:
        detail = "not installed: CLAM's encoders use the built-in networks (timm's layouts)"
        report.add("timm", True, detail)


def existing_parent(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing ancestor."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def _probe(existing: Path) -> str | None:
    """Why ``existing`` cannot take a new file, or None when a temp file can be made there."""
    import errno

    from clam_heat.atomic import temp_path_for
    from clam_heat.errors import ClamHeatError, os_error_advice

    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        err = PermissionError(errno.EACCES, "Permission denied", str(existing))
        return f"not writable: {os_error_advice(existing, err)}"
    try:
        temp_path_for(existing / "clam-heat-doctor", tag="probe").unlink()
    except (ClamHeatError, OSError) as err:
        return f"cannot write: {err}"
    return None


def check_outputs(
    report: DoctorReport, folders: dict[str, Path], need_bytes: int | None = None
) -> None:
    """Each output folder writable (its nearest existing folder, since a run creates the rest)
    and the free space there; ``need_bytes`` (the run's estimate) must fit on each volume.

    ``folders`` maps a label (``--output-dir``, ``raw_save_dir``...) to a folder; folders under
    the same existing folder share one line.
    """
    groups: dict[Path, list[str]] = {}
    to_create: set[Path] = set()
    for label, folder in folders.items():
        existing = existing_parent(Path(folder))
        if existing != Path(folder) and existing.is_dir():
            label += f" {Path(folder).relative_to(existing)}/"
            to_create.add(existing)
        groups.setdefault(existing, []).append(label)
    other = "choose another folder (--output-dir, or the config's save dirs), or fix permissions"
    for existing, labels in groups.items():
        name = f"output {existing}"
        whose = f" (for {', '.join(labels)}" + (
            "; the run creates them)" if existing in to_create else ")"
        )
        problem = _probe(existing)
        if problem is not None:
            report.add(name, False, problem + whose, other)
            continue
        free_mb = shutil.disk_usage(existing).free // 2**20
        detail = f"writable, {free_mb:,} MB free{whose}"
        if need_bytes is not None and need_bytes > free_mb * 2**20:
            need = f"; the list needs ~{need_bytes // 2**20:,} MB"
            report.add(name, False, detail + need, "free space or use a bigger volume")
        elif free_mb < LOW_SPACE_MB:
            report.add(name, None, detail + " (low)", "free some space before a long run")
        else:
            report.add(name, True, detail)


def check_browser(report: DoctorReport) -> None:
    """A headless-capable browser (optional: the viewer runs in any browser)."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            report.add("browser", True, f"{name} at {found}")
            return
    detail = (
        f"none of {', '.join(BROWSERS)} on PATH (optional: `clam-heat view` opens in any "
        "browser; the viewer's browser tests need headless Chromium)"
    )
    report.add("browser", None, detail, "apt-get install -y chromium-headless-shell")
