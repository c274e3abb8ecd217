"""A process-list row as the stages see it (:class:`RowContext`) and every on-disk name.

CLAM's folder layout, kept so CLAM's tools read our outputs::

    <raw_save_dir>/<save_exp_code>/config.yaml                        the resolved config
    <raw_save_dir>/<save_exp_code>/<grouping>/<slide_id>/             raw_dir: one slide's
        <slide_id>.ledger.json, _segmentation.geojson, _mask.jpg,     intermediate files
        <slide_id>.h5 (own features), _blockmap.h5, _blockmap.png,
        <slide_id>_<overlap>_roi_<True|False>.h5 (overlap pass)
    <production_save_dir>/<save_exp_code>/<grouping>/                 production_dir:
        <CLAM's long heatmap name>, _heatmap_pyramid.tiff, _attention.geojson, _orig_<l>.<ext>
    <production_save_dir>/<save_exp_code>/sampled_patches/label_<l>_pred_<p>/<sampler>/
        <slide_id>/ (threshold mode): PNGs or <slide_id>_patches.h5, manifest.csv,
        <slide_id>_patches.geojson
    <raw_save_dir>/<save_exp_code>/cohort_scores.h5                   score_scale: cohort
    raw_dir/<slide_id>_class_<name>_blockmap.h5, production_dir/<slide_id>_class_<name>.<ext>
                                                                      classes: all | [names]

``<grouping>`` is the row's label (:func:`grouping_for`). Stages, the viewer and the runner
take every path from here, so a name changes in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import HeatmapConfig
from .errors import ProcessListError

__all__ = [
    "RowContext",
    "attention_geojson_path",
    "blockmap_h5_path",
    "blockmap_name",
    "blockmap_png_path",
    "build_contexts",
    "class_heatmap_path",
    "faithfulness_json_path",
    "method_heatmap_path",
    "method_scores_h5_path",
    "class_scores_h5_path",
    "cohort_scores_path",
    "features_cache_path",
    "grouping_for",
    "mask_jpg_path",
    "output_roots",
    "orig_name",
    "orig_path",
    "overlap_h5_name",
    "overlap_h5_path",
    "production_heatmap_name",
    "production_heatmap_path",
    "pyramid_heatmap_path",
    "resolved_config_path",
    "results_csv_path",
    "sampled_patches_dir",
    "segmentation_geojson_path",
    "threshold_export_dir",
    "threshold_file_names",
]


@dataclass
class RowContext:
    """Everything one row's stages need; built by the driver, usable in a worker process."""

    cfg: HeatmapConfig
    slide_id: str
    row: dict[str, Any]
    slide_path: Path
    label: str
    row_params: dict[str, Any]
    _slide: Any = field(default=None, repr=False)

    @property
    def raw_root(self) -> Path:
        exp = self.cfg.exp_arguments
        return Path(exp.raw_save_dir) / exp.save_exp_code

    @property
    def production_root(self) -> Path:
        exp = self.cfg.exp_arguments
        return Path(exp.production_save_dir) / exp.save_exp_code

    @property
    def raw_dir(self) -> Path:
        """CLAM's ``raw_save_dir/save_exp_code/<grouping>/<slide_id>/``."""
        return self.raw_root / self.label / self.slide_id

    @property
    def production_dir(self) -> Path:
        return self.production_root / self.label

    @property
    def ledger_path(self) -> Path:
        return self.raw_dir / f"{self.slide_id}.ledger.json"

    def raw(self, suffix: str) -> Path:
        return self.raw_dir / f"{self.slide_id}{suffix}"

    def slide(self) -> Any:
        """The opened slide (opened once per row, lazily)."""
        if self._slide is None:
            from .slide import open_slide

            self._slide = open_slide(self.slide_path)
        return self._slide

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def roi(self) -> tuple[int, int, int, int] | None:
        """Level-0 (x1, y1, x2, y2) from the row when ``use_roi``; a clear error if unusable."""
        if not self.cfg.heatmap_arguments.use_roi:
            return None
        values = []
        for key in ("x1", "y1", "x2", "y2"):
            raw = self.row.get(key)
            try:
                number = float(raw)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                number = float("nan")
            if not np.isfinite(number):
                raise ProcessListError(
                    f"slide {self.slide_id}: heatmap_arguments.use_roi is true but column {key!r} "
                    f"is {raw!r}; fill x1, y1, x2, y2 (level-0 px) or set use_roi: false"
                )
            values.append(int(number))
        x1, y1, x2, y2 = values
        if x2 <= x1 or y2 <= y1:
            raise ProcessListError(
                f"slide {self.slide_id}: ROI x1={x1}, y1={y1}, x2={x2}, y2={y2} is empty "
                "(need x2 > x1 and y2 > y1)"
            )
        return x1, y1, x2, y2


def grouping_for(row: dict[str, Any], label_names: dict[int, str]) -> str:
    """CLAM's per-row sub-folder: the label if it is a name, else the label_dict name of the int."""
    label = row.get("label")
    if label is None or (isinstance(label, float) and np.isnan(label)) or str(label).strip() == "":
        return "Unspecified"
    text = str(label).strip()
    try:
        as_int = int(float(text))
    except ValueError:
        return text
    return label_names.get(as_int, text)


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def build_contexts(cfg: HeatmapConfig, df: pd.DataFrame) -> list[RowContext]:
    """Contexts for the rows with ``process == 1`` (process-list order)."""
    from .process_list import load_preset, row_params, slide_path_for_row

    defaults = load_preset(cfg.data_arguments.preset)
    names = cfg.data_arguments.label_names()
    contexts = []
    for record in df.to_dict("records"):
        try:
            process = int(float(record.get("process", 1)))
        except (TypeError, ValueError):
            process = 0
        if process != 1:
            continue
        slide_id = str(record["slide_id"])
        contexts.append(
            RowContext(
                cfg=cfg,
                slide_id=slide_id,
                row=record,
                slide_path=slide_path_for_row(record, cfg.data_arguments),
                label=grouping_for(record, names),
                row_params=row_params(record, defaults),
            )
        )
    return contexts


# --------------------------------------------------------------------------------------------
# CLAM's file names
# --------------------------------------------------------------------------------------------


def production_heatmap_name(slide_id: str, heatmap_args: Mapping[str, Any], overlap: float) -> str:
    """CLAM's production heatmap file name.

    >>> args = dict(use_roi=False, blur=False, use_ref_scores=True, blank_canvas=False,
    ...             alpha=0.4, vis_level=1, binarize=False, binary_thresh=-1, save_ext="jpg")
    >>> production_heatmap_name("C3L-01663-21", args, 0.5)
    'C3L-01663-21_0.5_roi_0_blur_0_rs_1_bc_0_a_0.4_l_1_bi_0_-1.0.jpg'
    """
    keys = (
        "use_roi",
        "blur",
        "use_ref_scores",
        "blank_canvas",
        "alpha",
        "vis_level",
        "binarize",
        "binary_thresh",
        "save_ext",
    )
    missing = [k for k in keys if k not in heatmap_args]
    if missing:
        raise ValueError(f"heatmap_arguments lacks {', '.join(missing)} (needed for the file name)")
    a = heatmap_args
    return (
        f"{slide_id}_{float(overlap)}_roi_{int(a['use_roi'])}_blur_{int(a['blur'])}"
        f"_rs_{int(a['use_ref_scores'])}_bc_{int(a['blank_canvas'])}_a_{float(a['alpha'])}"
        f"_l_{int(a['vis_level'])}_bi_{int(a['binarize'])}_{float(a['binary_thresh'])}"
        f".{a['save_ext']}"
    )


def blockmap_name(slide_id: str) -> str:
    """The coarse heatmap's file name (in the raw results folder).

    >>> blockmap_name("s1")
    's1_blockmap.png'
    """
    return f"{slide_id}_blockmap.png"


def orig_name(slide_id: str, level: int, ext: str) -> str:
    """The plain slide image's file name.

    >>> orig_name("s1", 2, "jpg")
    's1_orig_2.jpg'
    """
    return f"{slide_id}_orig_{int(level)}.{ext}"


def overlap_h5_name(slide_id: str, overlap: float | int | str, use_roi: bool) -> str:
    """CLAM's name of the overlapping-pass file: overlap as written in the YAML, roi True/False.

    >>> overlap_h5_name("C3L-01663-21", 0.5, False)
    'C3L-01663-21_0.5_roi_False.h5'
    >>> overlap_h5_name("s1", 0, 1)
    's1_0_roi_True.h5'
    """
    return f"{slide_id}_{overlap}_roi_{bool(use_roi)}.h5"


# --------------------------------------------------------------------------------------------
# Paths of one row's files
# --------------------------------------------------------------------------------------------


#: MIL-Lab's results file name in ``quick``'s output folder.
MIL_LAB_CSV = "heatmap_results.csv"


def mil_lab_heatmap_path(out: Path, slide_id: str) -> Path:
    """``OUT/<slide_id>_heatmap.png``, MIL-Lab's per-slide image name (``quick``)."""
    return Path(out) / f"{slide_id}_heatmap.png"


def segmentation_geojson_path(ctx: RowContext) -> Path:
    """The segment stage's tissue contours."""
    return ctx.raw("_segmentation.geojson")


def mask_jpg_path(ctx: RowContext) -> Path:
    """The segment stage's overview image (CLAM's ``_mask.jpg``)."""
    return ctx.raw("_mask.jpg")


def features_cache_path(ctx: RowContext) -> Path:
    """CLAM's raw feature cache ``<raw>/<id>.h5``, written when we encode the bag ourselves."""
    return ctx.raw(".h5")


def blockmap_h5_path(ctx: RowContext) -> Path:
    """CLAM's ``_blockmap.h5``: the bag's attention scores and coords."""
    return ctx.raw("_blockmap.h5")


def overlap_h5_path(ctx: RowContext) -> Path:
    """The overlap pass's scores (``calc_heatmap``), named as CLAM names it."""
    overlap = ctx.cfg.patching_arguments.overlap
    return ctx.raw_dir / overlap_h5_name(
        ctx.slide_id, f"{overlap:g}", ctx.cfg.heatmap_arguments.use_roi
    )


def blockmap_png_path(ctx: RowContext) -> Path:
    """The coarse heatmap (raw folder)."""
    return ctx.raw_dir / blockmap_name(ctx.slide_id)


def production_heatmap_path(ctx: RowContext) -> Path:
    """Where the ``heatmap`` stage writes the row's production heatmap (CLAM's long name)."""
    overlap = ctx.cfg.patching_arguments.overlap
    name = production_heatmap_name(ctx.slide_id, ctx.cfg.block("heatmap_arguments"), overlap)
    return ctx.production_dir / name


def pyramid_heatmap_path(ctx: RowContext) -> Path:
    """Where the ``heatmap`` stage writes the pyramidal TIFF (``write_pyramid_tiff``)."""
    return ctx.production_dir / f"{ctx.slide_id}_heatmap_pyramid.tiff"


def orig_path(ctx: RowContext, level: int) -> Path:
    """The plain slide image at ``level`` (``save_orig``)."""
    hm = ctx.cfg.heatmap_arguments
    return ctx.production_dir / orig_name(ctx.slide_id, level, hm.save_ext)


def attention_geojson_path(ctx: RowContext) -> Path:
    """The attention GeoJSON (``write_geojson``)."""
    return ctx.production_dir / f"{ctx.slide_id}_attention.geojson"


def sampled_patches_dir(ctx: RowContext, pred: int, sampler: str) -> Path:
    """One sampler's folder of patches (CLAM's ``sampled_patches/label_<l>_pred_<p>/<name>``)."""
    return ctx.production_root / "sampled_patches" / f"label_{ctx.label}_pred_{pred}" / sampler


def threshold_export_dir(ctx: RowContext, pred: int, sampler: str) -> Path:
    """A threshold sampler's per-slide folder (many patches per slide: one folder each)."""
    return sampled_patches_dir(ctx, pred, sampler) / ctx.slide_id


def threshold_file_names(slide_id: str) -> dict[str, str]:
    """File names inside :func:`threshold_export_dir`.

    >>> threshold_file_names("s1")["h5"]
    's1_patches.h5'
    """
    return {
        "h5": f"{slide_id}_patches.h5",
        "manifest": "manifest.csv",
        "geojson": f"{slide_id}_patches.geojson",
    }


def _safe_class(name: str) -> str:
    """A class name made safe for a file name (letters, digits, '-', '_', '.'; others '_')."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


def class_scores_h5_path(ctx: RowContext, class_name: str) -> Path:
    """One class's bag attention (CLAM's score layout), for ``heatmap_arguments.classes``.

    >>> from clam_heat.config import HeatmapConfig
    >>> ctx = RowContext(HeatmapConfig(), "s1", {}, Path("s1.svs"), "LUAD", {})
    >>> class_scores_h5_path(ctx, "LSCC").name
    's1_class_LSCC_blockmap.h5'
    """
    return ctx.raw(f"_class_{_safe_class(class_name)}_blockmap.h5")


def method_scores_h5_path(ctx: RowContext, method: str, class_name: str | None = None) -> Path:
    """One attribution method's map (blockmap layout): ``<id>_<method>_blockmap.h5``, or
    ``<id>_<method>_class_<name>_blockmap.h5`` for one class of ``classes``.

    >>> from clam_heat.config import HeatmapConfig
    >>> ctx = RowContext(HeatmapConfig(), "s1", {}, Path("s1.svs"), "LUAD", {})
    >>> method_scores_h5_path(ctx, "occlusion").name
    's1_occlusion_blockmap.h5'
    """
    part = f"_class_{_safe_class(class_name)}" if class_name is not None else ""
    return ctx.raw(f"_{method}{part}_blockmap.h5")


def method_heatmap_path(ctx: RowContext, method: str, class_name: str | None = None) -> Path:
    """One method's production image: ``<id>_<method>_heatmap.<ext>`` (or ``_class_<name>``)."""
    ext = ctx.cfg.heatmap_arguments.save_ext
    if class_name is not None:
        return ctx.production_dir / f"{ctx.slide_id}_{method}_class_{_safe_class(class_name)}.{ext}"
    return ctx.production_dir / f"{ctx.slide_id}_{method}_heatmap.{ext}"


def faithfulness_json_path(ctx: RowContext) -> Path:
    """The row's deletion and insertion curves (``<raw>/<id>_faithfulness.json``)."""
    return ctx.raw("_faithfulness.json")


def class_heatmap_path(ctx: RowContext, class_name: str) -> Path:
    """One class's heatmap, named with the class (``heatmap_arguments.classes``)."""
    ext = ctx.cfg.heatmap_arguments.save_ext
    return ctx.production_dir / f"{ctx.slide_id}_class_{_safe_class(class_name)}.{ext}"


# --------------------------------------------------------------------------------------------
# Paths of one run's files
# --------------------------------------------------------------------------------------------


def resolved_config_path(cfg: HeatmapConfig) -> Path:
    """The resolved config a run saves beside its raw results."""
    exp = cfg.exp_arguments
    return Path(exp.raw_save_dir) / exp.save_exp_code / "config.yaml"


def cohort_scores_path(cfg: HeatmapConfig) -> Path:
    """The run's sorted cohort scores (``heatmap_arguments.score_scale: cohort``)."""
    exp = cfg.exp_arguments
    return Path(exp.raw_save_dir) / exp.save_exp_code / "cohort_scores.h5"


def results_csv_path(cfg: HeatmapConfig) -> Path:
    """CLAM's results CSV (``results_dir/<list stem or save_exp_code>.csv``)."""
    return Path(cfg.results_csv_path)


def output_roots(cfg: HeatmapConfig) -> tuple[Path, Path]:
    """The run's raw and production roots (``<dir>/<save_exp_code>``)."""
    exp = cfg.exp_arguments
    return (
        Path(exp.raw_save_dir) / exp.save_exp_code,
        Path(exp.production_save_dir) / exp.save_exp_code,
    )
