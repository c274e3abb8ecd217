"""``clam-heat doctor``: check the setup before a long run, one line per check with its fix.

Why: a run over hundreds of slides should not fail on slide 200 because a package, the OpenSlide
library, a GPU, a slide file or the checkpoint was wrong from the start. The doctor runs the real
components on tiny inputs and, given a config, looks at every listed slide and feature file,
loads the checkpoint into the configured model and times a few rows to estimate the whole list.

    report = run_doctor("config.yaml", output_dir=None)
    print("\\n".join(format_report(report)))
    raise SystemExit(exit_code(report))

Modules: :mod:`.report` (``Check``, ``DoctorReport``, formatting), :mod:`.environment` (the
machine), :mod:`.project` (one config). Heavy packages are imported inside the checks, so
importing this package is cheap and a missing package is a failed line, not a traceback.
"""

from __future__ import annotations

from pathlib import Path

from .environment import (
    DEPENDENCIES,
    Dependency,
    check_browser,
    check_dependency,
    check_encoder_backend,
    check_openslide,
    check_outputs,
    check_python,
    check_torch,
)
from .report import Check, DoctorReport, exit_code, format_report

__all__ = [
    "DEPENDENCIES",
    "Check",
    "Dependency",
    "DoctorReport",
    "exit_code",
    "format_report",
    "run_doctor",
]


def run_doctor(
    config: Path | str | None = None,
    *,
    output_dir: Path | str | None = None,
    sample_rows: int = 3,
) -> DoctorReport:
    """Check the machine and, with ``config``, the config, its data, checkpoint and outputs.

    ``output_dir`` is checked for writing and free space besides the config's save folders
    (without a config and without ``output_dir``: the current folder). ``sample_rows`` rows are
    read in full and timed to estimate the run. Never raises for a failed check: each is a line.
    """
    from . import project

    report = DoctorReport()
    cfg, config_checks = (None, []) if config is None else project.load_config_checked(Path(config))
    check_python(report)
    modules = {dep.module: check_dependency(report, dep) for dep in DEPENDENCIES}
    check_openslide(report, modules["openslide"])
    torch = modules["torch"]
    wanted = cfg.runner_arguments.device if cfg is not None else "auto"
    check_torch(report, torch, wanted)
    if torch is not None:
        check_encoder_backend(report)
    report.checks.extend(config_checks)
    need: int | None = None
    folders: dict[str, Path] = {}
    if output_dir is not None:
        folders["--output-dir"] = Path(output_dir).expanduser().absolute()
    if cfg is not None:
        rows = project.check_rows(report, cfg)
        model, device = None, "cpu"
        if torch is not None:
            device = project.run_device(wanted)
            model = project.check_checkpoint(report, cfg, device)
            project.check_encoder_weights(report, cfg, rows)
        if rows:
            need = project.estimate_run(report, cfg, rows, model, device, sample_rows)
        exp = cfg.exp_arguments
        folders["raw_save_dir"] = Path(exp.raw_save_dir)
        folders["production_save_dir"] = Path(exp.production_save_dir)
        folders["results_dir"] = Path(cfg.runner_arguments.results_dir)
    check_outputs(report, folders or {"current folder": Path.cwd()}, need)
    check_browser(report)
    return report
