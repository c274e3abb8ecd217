"""Checks of one heatmap config: the config itself, every listed slide and feature file, the
checkpoint in the configured model, the encoder when one is needed, and a rough run estimate.

Slides and H5 files are opened header-only (cheap for thousands of rows); only ``sample_rows``
rows are read in full, to time a row and scale that to the list.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..formats import IMAGE_FORMATS
from .report import Check, DoctorReport, first_line

__all__ = [
    "Row",
    "check_checkpoint",
    "check_encoder_weights",
    "check_rows",
    "estimate_run",
    "load_config_checked",
    "run_device",
]

_SHOW = 3  # items named per line; the rest are counted
_MAX_READ_PX = 2048  # side of the vis-level crop read when timing a row


@dataclass
class Row:
    """What the doctor learnt about one process-list row."""

    slide_id: str
    slide_path: Path | None  # None: missing or unreadable
    h5_path: Path | None = None  # None: missing or unusable
    n_patches: int = 0
    vis_level: int = 0
    vis_dims: tuple[int, int] | None = None  # (width, height) at vis_level


def _bytes_per_pixel(save_ext: str) -> float:
    """A saved heatmap's bytes per pixel by ``save_ext`` (a guess: content decides; raw RGB
    for an unknown extension)."""
    fmt = IMAGE_FORMATS.get(save_ext.lower())
    return fmt.bytes_per_pixel if fmt is not None else 3.0


def load_config_checked(path: Path) -> tuple[Any, list[Check]]:
    """The loaded config (or None) and its check lines: one per problem when it is invalid."""
    from clam_heat.config import load_config
    from clam_heat.errors import ConfigError

    try:
        cfg = load_config(path)
    except ConfigError as err:
        fix = "correct it in the config (clam-heat validate CONFIG lists the same problems)"
        return None, [Check("config", False, problem, fix) for problem in err.problems]
    model = cfg.model_arguments
    detail = (
        f"{cfg.source_path} is valid ({model.model_type}, {cfg.exp_arguments.n_classes} "
        f"classes, embed_dim {model.embed_dim})"
    )
    return cfg, [Check("config", True, detail)]


def _to_process(value: Any) -> bool:
    """The runner's rule: a row runs when ``process`` reads as the number 1."""
    try:
        return int(float(value)) == 1
    except (TypeError, ValueError):
        return False


def _listed(items: list[str], total: int) -> str:
    """
    >>> _listed(["a", "b", "c", "d"], 9)
    '4 of 9: a; b; c; ... (1 more)'
    """
    more = f"; ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"{len(items)} of {total}: " + "; ".join(items[:_SHOW]) + more


def _h5_shape(path: Path) -> tuple[int, int]:
    """(patches, feature width) from the file's header, without reading the features."""
    import h5py

    with h5py.File(path, "r") as handle:
        shape = handle["features"].shape
    return int(shape[-2]), int(shape[-1])


def _inspect_slide(row: Row, vis_level: int) -> str | None:
    """Open the slide; note the vis level and its size. Returns the problem, if any."""
    from clam_heat.errors import ClamHeatError
    from clam_heat.slide import open_slide

    try:
        with open_slide(row.slide_path) as slide:
            level = vis_level if vis_level >= 0 else slide.best_level_for_downsample(32)
            row.vis_level = min(level, slide.level_count - 1)
            row.vis_dims = slide.level_dimensions[row.vis_level]
    except ClamHeatError as err:  # SlideError: its message names the file and the fix
        row.slide_path = None
        return f"{row.slide_id} ({err})"
    except Exception as err:  # noqa: BLE001 - a library failure
        row.slide_path = None
        return f"{row.slide_id} ({first_line(err)})"
    return None


def _to_do_text(records: list[dict[str, Any]], total: int) -> str:
    """How many selected rows a run would still process (not done), of how many.

    >>> _to_do_text([{"status": "done"}, {"status": "failed"}, {"status": "tbp"}], 4)
    '2 of 4 rows still to process (1 done, 1 failed: rerun with --retry-failed)'
    >>> _to_do_text([{"status": "done"}], 1)
    '0 of 1 row still to process (1 done)'
    """
    statuses = [str(r.get("status", "")) for r in records]
    done, failed = statuses.count("done"), statuses.count("failed")
    notes = [f"{done} done"] if done else []
    if failed:
        notes.append(f"{failed} failed: rerun with --retry-failed")
    rows = "row" if total == 1 else "rows"
    text = f"{len(records) - done} of {total} {rows} still to process"
    return text + (f" ({', '.join(notes)})" if notes else "")


def check_rows(report: DoctorReport, cfg: Any) -> list[Row]:
    """Every row to process: its slide exists and opens, its features H5 exists and is as wide
    as the model's input. The list is the one a run would build (nothing is written)."""
    from clam_heat.errors import ClamHeatError
    from clam_heat.features import find_features_file
    from clam_heat.process_list import build_process_list, slide_path_for_row
    from clam_heat.rows import grouping_for

    try:
        df, list_path = build_process_list(cfg, write=False)
    except ClamHeatError as err:
        report.add("process list", False, str(err), "fix the process list or data_dir")
        return []
    records = [r for r in df.to_dict("records") if _to_process(r.get("process", 1))]
    if not records:
        report.add("process list", None, f"{list_path}: no row has process = 1", "set it to 1")
        return []
    report.add("process list", True, f"{list_path}: {_to_do_text(records, len(df))}")
    exp, runner, width = cfg.exp_arguments, cfg.runner_arguments, cfg.model_arguments.embed_dim
    names = cfg.data_arguments.label_names()
    rows: list[Row] = []
    missing: list[str] = []
    broken: list[str] = []
    no_h5: list[str] = []
    bad_h5: list[str] = []
    for record in records:
        row = Row(str(record["slide_id"]), None)
        rows.append(row)
        try:
            path = slide_path_for_row(record, cfg.data_arguments)
        except ClamHeatError as err:
            broken.append(f"{row.slide_id} ({err})")
            path = None
        if path is not None and not path.is_file():
            missing.append(f"{row.slide_id} ({path})")
        elif path is not None:
            row.slide_path = path
            problem = _inspect_slide(row, cfg.heatmap_arguments.vis_level)
            if problem:
                broken.append(problem)
        raw_dir = Path(exp.raw_save_dir) / exp.save_exp_code / grouping_for(record, names)
        raw_dir = raw_dir / row.slide_id
        try:
            h5 = find_features_file(row.slide_id, features_dir=runner.features_dir, raw_dir=raw_dir)
        except ClamHeatError:
            no_h5.append(f"{row.slide_id} (looked in {runner.features_dir or raw_dir})")
            continue
        try:
            row.n_patches, found = _h5_shape(h5)
        except Exception as err:  # noqa: BLE001 - h5py, OSError, no 'features' dataset
            bad_h5.append(f"{row.slide_id} ({h5}: {first_line(err)})")
            continue
        if found != width:
            bad_h5.append(f"{row.slide_id} ({h5}: features are {found} wide, embed_dim {width})")
            continue
        row.h5_path = h5
    _report_rows(report, cfg, len(rows), missing, broken, no_h5, bad_h5)
    return rows


def _report_rows(
    report: DoctorReport,
    cfg: Any,
    n: int,
    missing: list[str],
    broken: list[str],
    no_h5: list[str],
    bad_h5: list[str],
) -> None:
    if missing:
        fix = "check data_arguments.data_dir and slide_ext, or set process to 0 on those rows"
        report.add("slides", False, "missing " + _listed(missing, n), fix)
    if broken:
        fix = "re-export those slides (e.g. as pyramidal tiled TIFF) or set process to 0"
        report.add("slides", False, "cannot open " + _listed(broken, n), fix)
    if not missing and not broken:
        report.add("slides", True, f"{n} of {n} found and open")
    if no_h5:
        extract = cfg.runner_arguments.extract_features
        detail = "no features H5 for " + _listed(no_h5, n)
        fix = (
            "set runner_arguments.features_dir to the folder of <slide_id>.h5 (TRIDENT "
            "features_<encoder>/, CLAM feat_dir), or set extract_features: true"
        )
        if extract:
            detail += " (extract_features will encode them)"
        report.add("features", None if extract else False, detail, fix)
    if bad_h5:
        fix = "use features from the checkpoint's encoder (embed_dim is its width)"
        report.add("features", False, "unusable H5 for " + _listed(bad_h5, n), fix)
    if not no_h5 and not bad_h5:
        width = cfg.model_arguments.embed_dim
        report.add("features", True, f"{n} of {n} H5 found, {width} wide")


def run_device(wanted: str) -> str:
    """The device a run would use for ``runner_arguments.device`` (CPU if CUDA is absent)."""
    import torch

    if wanted == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda" if wanted == "auto" else wanted


def check_checkpoint(report: DoctorReport, cfg: Any, device: str) -> Any:
    """Load the checkpoint strictly into the configured model; returns the model, or None."""
    from clam_heat.errors import ClamHeatError
    from clam_heat.models import load_model

    args = cfg.model_arguments
    try:
        model = load_model(
            args.ckpt_path,
            args.model_type,
            n_classes=cfg.exp_arguments.n_classes,
            embed_dim=args.embed_dim,
            model_size=args.model_size,
            device=device,
        )
    except ClamHeatError as err:
        fix = (
            "set model_arguments.ckpt_path to the trained checkpoint, with model_type, "
            "embed_dim and exp_arguments.n_classes as it was trained"
        )
        report.add("checkpoint", False, str(err), fix)
        return None
    n_params = sum(p.numel() for p in model.parameters())
    detail = f"{args.ckpt_path} loads into {args.model_type} ({n_params:,} parameters, {device})"
    report.add("checkpoint", True, detail)
    return model


def check_encoder_weights(report: DoctorReport, cfg: Any, rows: list[Row]) -> None:
    """The patch encoder, needed only for calc_heatmap or for slides without features."""
    needed = cfg.heatmap_arguments.calc_heatmap or (
        cfg.runner_arguments.extract_features and any(r.h5_path is None for r in rows)
    )
    if not needed:
        return
    from clam_heat.encoders import ENCODER_NAMES, find_encoder_weights

    name = cfg.encoder_arguments.model_name
    if name not in ENCODER_NAMES:
        detail = f"{name!r} is not an encoder clam-heat runs ({', '.join(ENCODER_NAMES)})"
        fix = "set calc_heatmap: false and use precomputed features, or choose one of those"
        report.add("encoder", False, detail, fix)
        return
    weights = find_encoder_weights(name, cfg.runner_arguments.encoder_weights)
    if name not in ("tiny_cnn", "conch_v1_5") and (weights is None or not weights.is_file()):
        fix = "set runner_arguments.encoder_weights to the file, or put it in the HF cache"
        report.add("encoder", False, f"{name}: weights not found ({weights or 'none'})", fix)
        return
    report.add("encoder", True, f"{name}: {weights or 'no weights file needed'}")


def _row_bytes(cfg: Any, row: Row) -> int:
    """Rough bytes one row writes: images at the vis level, score H5s, sampled patches."""
    hm, runner = cfg.heatmap_arguments, cfg.runner_arguments
    w, h = row.vis_dims or (0, 0)
    image = int(w * h * _bytes_per_pixel(hm.save_ext))
    total = image * (2 if hm.save_orig else 1) + row.n_patches * 24 + 4096
    if runner.write_pyramid_tiff:
        total += image
    if hm.calc_heatmap:  # the overlap pass stores scores on a finer grid
        total += int(row.n_patches * 24 / (1 - cfg.patching_arguments.overlap) ** 2)
    if runner.write_geojson:
        total += row.n_patches * 200
    side = cfg.patching_arguments.patch_size
    total += sum(spec.k * side * side * 2 for spec in cfg.sample_arguments.samples if spec.sample)
    return total


def _duration(seconds: float) -> str:
    """
    >>> _duration(12.3), _duration(125), _duration(7300)
    ('12 s', '2.1 min', '2.0 h')
    """
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _time_row(cfg: Any, row: Row, model: Any, device: str) -> float:
    """Seconds to read the row's bag, run one forward and read its vis-level image."""
    from clam_heat.features import load_bag
    from clam_heat.models import run_attention
    from clam_heat.slide import open_slide

    runner = cfg.runner_arguments
    start = time.perf_counter()
    with open_slide(row.slide_path) as slide, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a guessed patch size is reported by the run itself
        bag = load_bag(
            row.h5_path,
            slide=slide,
            patches_dir=runner.patches_dir,
            patch_size_level0_override=runner.patch_size_level0,
            max_patches=runner.max_patches,
        )
        run_attention(model, bag.features, device=device)
        w, h = row.vis_dims or (1, 1)
        crop = (min(w, _MAX_READ_PX), min(h, _MAX_READ_PX))
        read_start = time.perf_counter()
        slide.read_region((0, 0), row.vis_level, crop)
        read = time.perf_counter() - read_start
    # only a crop was read: scale its time to the whole vis-level image
    return time.perf_counter() - start + read * ((w * h) / (crop[0] * crop[1]) - 1)


def estimate_run(
    report: DoctorReport, cfg: Any, rows: list[Row], model: Any, device: str, sample_rows: int
) -> int | None:
    """Disk from every sized row, time from ``sample_rows`` timed rows; both scaled to the list.

    Returns the estimated bytes (None when no slide could be sized).
    """
    sized = [r for r in rows if r.vis_dims is not None]
    if not sized:
        report.add("disk estimate", None, "no readable slide to size the outputs from")
        return None
    need = int(sum(_row_bytes(cfg, r) for r in sized) / len(sized) * len(rows))
    note = "rough: images sized at the vis level, compression guessed from save_ext"
    report.add("disk estimate", True, f"~{need / 2**20:,.0f} MB for {len(rows)} rows ({note})")
    if model is None:
        return need
    seconds: list[float] = []
    for row in [r for r in sized if r.h5_path is not None][: max(sample_rows, 0)]:
        try:
            seconds.append(_time_row(cfg, row, model, device))
        except Exception as err:  # noqa: BLE001 - the row would fail the same way in a run
            fix = "replace that H5 (TRIDENT/CLAM features with coords) or set process to 0"
            report.add("features", False, f"{row.slide_id}: {first_line(err)}", fix)
    if not seconds:
        report.add("time estimate", None, "no row with a slide and features to time")
        return need
    per_row = sum(seconds) / len(seconds)
    extra = (
        "; calc_heatmap's encoder pass comes on top" if cfg.heatmap_arguments.calc_heatmap else ""
    )
    detail = (
        f"~{_duration(per_row * len(rows))} for {len(rows)} rows on {device} (rough: timed "
        f"{len(seconds)} rows' features, forward and vis-level read, {per_row:.2f} s each; "
        f"segmentation, drawing and saving add more, often 2-5x{extra})"
    )
    report.add("time estimate", True, detail)
    return need
