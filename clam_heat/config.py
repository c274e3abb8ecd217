"""Load and check CLAM heatmap YAML configs (``create_heatmaps.py`` layout), unchanged.

A config has CLAM's seven blocks (``exp_arguments``, ``data_arguments``,
``patching_arguments``, ``encoder_arguments``, ``model_arguments``, ``heatmap_arguments``,
``sample_arguments``) with CLAM's key names; every key defaults to the value in CLAM's template,
so a CLAM config loads as it is. One optional block of our own, ``runner_arguments``, holds
clam-heat settings that CLAM has no key for.

Why a schema: CLAM reads the YAML into untyped namespaces, so a typo is ignored and a wrong value
surfaces as a crash deep in the slide loop. Here every block is a pydantic model with
``extra="forbid"`` and bounded fields, and *all* problems of a file are reported together in one
:class:`~clam_heat.errors.ConfigError`, each line naming file, YAML line, key path, value and rule:

    config.yaml:12 heatmap_arguments.alpah: unknown key (did you mean 'alpha'?)
    config.yaml:13 heatmap_arguments.alpha = 1.5: must be <= 1

Path resolution (values are stored on the model as absolute :class:`pathlib.Path`):

- an absolute path (``~`` expanded) is kept;
- a relative path resolves against the config file's folder if it exists there, otherwise
  against the current working directory (CLAM is CWD-relative, so CLAM configs run from the CLAM
  repo root keep working, and configs that ship next to their data also work). Output folders
  that do not exist yet therefore resolve against the CWD, like CLAM;
- a bare process-list name (no path separator, e.g. ``heatmap_demo_dataset.csv``) is searched in
  ``process_lists/`` and ``heatmaps/process_lists/`` under the config folder, then in CLAM's
  layout next to it (``<config folder>/../process_lists/``), then under the CWD, then in the
  config folder itself; if it is nowhere it resolves to ``<cwd>/process_lists/<name>`` (the
  process-list builder creates it there);
- a bare config name given to :func:`load_config` (e.g. ``clam_template.yaml``) is searched in
  ``.``, ``configs/`` and ``heatmaps/configs/`` under the CWD (see :func:`find_config`).

Validation checks values, not existence: a stage checks that a file exists when it needs it.

Overrides: CLAM's two CLI overrides (``save_exp_code``, ``overlap``) and any number of generic
``BLOCK.KEY=VALUE`` settings (the value is parsed as YAML) are validated like YAML values; their
errors name the override instead of a file line.

>>> cfg = config_from_dict({"heatmap_arguments": {"alpha": 0.5}})
>>> cfg.heatmap_arguments.alpha, cfg.patching_arguments.patch_size
(0.5, 256)
>>> config_from_dict({"heatmap_arguments": {"alpha": 1.5}})
Traceback (most recent call last):
...
clam_heat.errors.ConfigError: <dict> heatmap_arguments.alpha = 1.5: must be <= 1
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from clam_heat.errors import ConfigError

__all__ = [
    "BLOCK_NAMES",
    "CLAM_BLOCK_NAMES",
    "DataArguments",
    "EncoderArguments",
    "ExpArguments",
    "HeatmapArguments",
    "HeatmapConfig",
    "ModelArguments",
    "PatchingArguments",
    "RunnerArguments",
    "SampleArguments",
    "SampleSpec",
    "config_from_dict",
    "find_config",
    "load_config",
]

CONFIG_SEARCH_DIRS: tuple[str, ...] = (".", "configs", "heatmaps/configs")
"""Folders (under the CWD) searched for a bare config name, in order."""

PROCESS_LIST_DIRS: tuple[str, ...] = ("process_lists", "heatmaps/process_lists")
"""Sub-folders searched for a bare process-list name (CLAM keeps lists in the second)."""

MODEL_TYPES_CLAM: tuple[str, ...] = ("clam_sb", "clam_mb", "mil")
MODEL_TYPES_BARE: tuple[str, ...] = (
    "abmil",
    "transmil",
    "dsmil",
    "ilra",
    "rrt",
    "clam",
    "transformer",
)
_MIL_LAB_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_\-]+){3}")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_YAML12_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
SAVE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "tiff", "tif")


# --------------------------------------------------------------------------- validation helpers


class _KeyProblem(ValueError):
    """A check failure that knows which key (below the validated object) it is about.

    Pydantic reports model-level validator errors at the model's own location; carrying the key
    lets the loader point at the right YAML line anyway.
    """

    def __init__(self, rule: str, key: tuple[str | int, ...] = (), value: Any = ...) -> None:
        super().__init__(rule)
        self.rule = rule
        self.key = key
        self.value = value


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    """Return `` (did you mean 'x'?)`` for the closest choice, or ``""``.

    >>> _did_you_mean("alpah", ["alpha", "blur"])
    " (did you mean 'alpha'?)"
    >>> _did_you_mean("zzz", ["alpha"])
    ''
    """
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _unknown(what: str, word: str, choices: Sequence[str]) -> str:
    hint = _did_you_mean(word, choices)
    return f"unknown {what}" + (hint or f" (valid: {', '.join(choices)})")


def _context_dirs(info: ValidationInfo | None) -> tuple[Path, Path]:
    """(config folder, cwd) from the validation context; both default to the CWD."""
    ctx = info.context if info is not None and isinstance(info.context, dict) else {}
    cwd = Path(ctx.get("cwd") or Path.cwd())
    base = Path(ctx.get("base_dir") or cwd)
    return base, cwd


def _norm(path: Path) -> Path:
    return Path(os.path.normpath(path))


def _resolve(raw: str | os.PathLike[str], base: Path, cwd: Path) -> Path:
    """Config folder if the path (or its top folder) exists there, else the CWD (CLAM's rule).

    The top-folder rule lets output dirs that do not exist yet (``heatmaps/heatmap_raw_results``)
    land next to a config whose folder already has ``heatmaps/``. Absolute paths are kept.
    """
    path = Path(raw).expanduser()
    if path.is_absolute():
        return _norm(path)
    if (base / path).exists() or (
        path.parts and (base / path.parts[0]).is_dir() and path.parts[0] not in (".", "..")
    ):
        return _norm(base / path)
    return _norm(cwd / path)


def _path_text(value: Any) -> str | os.PathLike[str]:
    if isinstance(value, bool) or not isinstance(value, str | os.PathLike):
        raise _KeyProblem("must be a path (a string)")
    if str(value).strip() == "":
        raise _KeyProblem("must be a non-empty path")
    return value


def _to_path(value: Any, info: ValidationInfo) -> Path:
    base, cwd = _context_dirs(info)
    return _resolve(_path_text(value), base, cwd)


def _to_optional_path(value: Any, info: ValidationInfo) -> Path | None:
    return None if value is None else _to_path(value, info)


def _to_process_list(value: Any, info: ValidationInfo) -> Path | None:
    """Resolve a process list, searching CLAM's list folders for a bare file name."""
    if value is None:
        return None
    text = str(_path_text(value))
    base, cwd = _context_dirs(info)
    if "/" in text or os.sep in text or Path(text).expanduser().is_absolute():
        return _resolve(text, base, cwd)
    candidates = [base / d / text for d in PROCESS_LIST_DIRS]
    candidates.append(base.parent / "process_lists" / text)
    candidates += [cwd / d / text for d in PROCESS_LIST_DIRS]
    candidates.append(base / text)
    for candidate in candidates:
        if candidate.is_file():
            return _norm(candidate)
    return _norm(cwd / PROCESS_LIST_DIRS[0] / text)


def _to_data_dir(value: Any, info: ValidationInfo) -> Path | dict[str, Path]:
    """A slide folder, or a mapping {process-list key: slide folder} (CLAM's dict form)."""
    rule = "must be a folder path or a mapping {key: folder}"
    if isinstance(value, Mapping):
        if not value:
            raise _KeyProblem(rule + " (the mapping is empty)")
        out: dict[str, Path] = {}
        for key, folder in value.items():
            if isinstance(key, bool) or not isinstance(key, str | int):
                raise _KeyProblem("keys must be strings", (), key)
            try:
                out[str(key)] = _to_path(folder, info)
            except _KeyProblem as err:
                raise _KeyProblem(err.rule, (str(key),), folder) from None
        return out
    if isinstance(value, str | os.PathLike) and not isinstance(value, bool):
        return _to_path(value, info)
    raise _KeyProblem(rule)


def _yaml12_float(value: Any) -> Any:
    """Accept ``1e-3``: PyYAML (YAML 1.1) reads exponent floats without a dot as strings."""
    if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def _int01_to_bool(value: Any) -> Any:
    """Accept 0/1 for booleans: CLAM only tests truthiness and int()s them in file names."""
    if type(value) is int and value in (0, 1):
        return bool(value)
    return value


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


Float = Annotated[float, BeforeValidator(_yaml12_float)]
Bool = Annotated[bool, BeforeValidator(_int01_to_bool)]
ResolvedPath = Annotated[Path, BeforeValidator(_to_path)]
OptionalPath = Annotated[Path | None, BeforeValidator(_to_optional_path)]


@functools.cache
def _colormap_names() -> tuple[str, ...]:
    import matplotlib  # lazy: only needed when a config is validated

    return tuple(sorted(matplotlib.colormaps))


def _label_dict_rule(n_classes: int, label_dict: Mapping[str, int]) -> str | None:
    """Why ``label_dict`` does not fit ``n_classes`` (None when it does).

    >>> _label_dict_rule(2, {"LUAD": 0, "LSCC": 1}) is None
    True
    >>> _label_dict_rule(3, {"LUAD": 0, "LSCC": 1})
    'must have exactly n_classes (3) entries with values 0..2 (exp_arguments.n_classes = 3)'
    """
    if len(label_dict) == n_classes and sorted(label_dict.values()) == list(range(n_classes)):
        return None
    return (
        f"must have exactly n_classes ({n_classes}) entries with values 0..{n_classes - 1} "
        f"(exp_arguments.n_classes = {n_classes})"
    )


# --------------------------------------------------------------------------- CLAM blocks


class _Block(BaseModel):
    """Strict base: unknown keys are errors, types are not silently coerced, defaults checked."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class ExpArguments(_Block):
    """``exp_arguments``: experiment name, output roots and batch size."""

    n_classes: int = Field(
        2, ge=2, description="Number of model classes; also the number of Pred_c/p_c columns."
    )
    save_exp_code: str = Field(
        "HEATMAP_OUTPUT",
        min_length=1,
        description="Sub-folder under both save dirs; results-CSV name when no process list.",
    )
    raw_save_dir: ResolvedPath = Field(
        "heatmaps/heatmap_raw_results", description="Root of per-slide intermediates."
    )
    production_save_dir: ResolvedPath = Field(
        "heatmaps/heatmap_production_results", description="Root of the final heatmap images."
    )
    batch_size: int = Field(256, ge=1, description="Patches per encoder batch (both passes).")


class DataArguments(_Block):
    """``data_arguments``: where slides and the process list are, and the class names."""

    data_dir: Annotated[Path | dict[str, Path], BeforeValidator(_to_data_dir)] = Field(
        "heatmaps/demo/slides/",
        description="Slide folder, or {key: folder} chosen per row by the data_dir_key column.",
    )
    data_dir_key: str | None = Field(
        "source",
        description="Process-list column naming the data_dir key (read only for a mapping).",
    )
    process_list: Annotated[Path | None, BeforeValidator(_to_process_list)] = Field(
        "heatmap_demo_dataset.csv",
        description="Process-list CSV; a bare name is searched in process_lists/ folders; "
        "null = list data_dir.",
    )
    preset: OptionalPath = Field(
        "presets/bwh_biopsy.csv", description="Segmentation preset CSV (row 0 is read); or null."
    )
    slide_ext: str = Field(
        ".svs", description="Appended to ids that lack it; stripped to make slide_id."
    )
    label_dict: dict[str, int] = Field(
        default_factory=lambda: {"LUAD": 0, "LSCC": 1},
        description="Class name -> class index; exactly n_classes entries valued 0..n-1.",
    )

    @field_validator("slide_ext")
    @classmethod
    def _check_slide_ext(cls, value: str) -> str:
        if not value.startswith("."):
            raise _KeyProblem(f"must start with '.' (e.g. '.{value}')")
        return value

    @field_validator("data_dir_key")
    @classmethod
    def _check_data_dir_key(cls, value: str | None, info: ValidationInfo) -> str | None:
        # a field validator (not a model one) so it still runs when other keys are wrong
        if isinstance(info.data.get("data_dir"), dict) and not (value or "").strip():
            raise _KeyProblem(
                "must name the process-list column that selects a data_dir entry "
                "(data_dir is a mapping)"
            )
        return value

    def label_names(self) -> dict[int, str]:
        """Class index -> class name (CLAM's inverted label_dict)."""
        return {index: name for name, index in self.label_dict.items()}


class PatchingArguments(_Block):
    """``patching_arguments``: the patch grid of both encoder passes."""

    patch_size: int = Field(256, gt=0, description="Patch side in pixels at patch_level.")
    overlap: Float = Field(
        0.5,
        ge=0,
        lt=1,
        description="Overlap of the fine pass: step = int(patch_size * (1 - overlap)).",
    )
    patch_level: int = Field(0, ge=0, description="Pyramid level patches are read at.")
    custom_downsample: int = Field(
        1, ge=1, description="Read a region this many times larger and resize to patch_size."
    )


class EncoderArguments(_Block):
    """``encoder_arguments``: the patch encoder."""

    model_name: str = Field(
        "resnet50_trunc", min_length=1, description="Encoder name (CLAM's get_encoder names)."
    )
    target_img_size: int = Field(
        224, description="Resize patches to this size before the encoder; <= 0: no resize."
    )

    @field_validator("target_img_size")
    @classmethod
    def _check_conch_size(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("model_name") == "conch_v1_5" and value != 448:
            raise _KeyProblem("must be 448 for conch_v1_5")
        return value


def _check_drop_out(value: Any) -> Any:
    """A dropout rate in [0, 1]; older CLAM configs wrote a bool flag, kept as it is."""
    if isinstance(value, bool):
        return value
    value = _yaml12_float(value)
    if not isinstance(value, int | float) or not 0 <= value <= 1:
        raise _KeyProblem("must be a number in [0, 1] (or true/false)")
    return float(value)


class ModelArguments(_Block):
    """``model_arguments``: the MIL model and its checkpoint."""

    ckpt_path: ResolvedPath = Field(
        "heatmaps/demo/ckpts/s_0_checkpoint.pt", description="Model state_dict file."
    )
    model_type: str = Field(
        "clam_sb",
        description="clam_sb, clam_mb, mil, a bare MIL-Lab model (abmil, transmil, dsmil, "
        "ilra, rrt) or a MIL-Lab name <model>.<config>.<encoder>.<task>.",
    )
    initiate_fn: Literal["initiate_model"] = Field(
        "initiate_model", description="CLAM's model factory name; the only accepted value."
    )
    model_size: Literal["small", "big"] | None = Field(
        "small", description="CLAM size_arg; null means small."
    )
    drop_out: Annotated[float | bool, BeforeValidator(_check_drop_out)] = Field(
        0.0, description="Dropout at training time (no effect at inference); old configs: bool."
    )
    embed_dim: int = Field(1024, ge=1, description="Input feature dimension of the model.")

    @field_validator("model_type")
    @classmethod
    def _check_model_type(cls, value: str) -> str:
        known = MODEL_TYPES_CLAM + MODEL_TYPES_BARE
        if value in known or _MIL_LAB_NAME.fullmatch(value):
            return value
        raise _KeyProblem(
            f"must be one of {', '.join(known)} or a MIL-Lab name "
            "<model>.<config>.<encoder>.<task>" + _did_you_mean(value, known)
        )


class HeatmapArguments(_Block):
    """``heatmap_arguments``: how the heatmap images are drawn and saved."""

    vis_level: int = Field(
        1, ge=-1, description="Level of the production heatmap; -1: best level for 32x."
    )
    alpha: Float = Field(0.4, ge=0, le=1, description="Heatmap weight when blending.")
    blank_canvas: Bool = Field(False, description="Blend onto white instead of the slide.")
    save_orig: Bool = Field(True, description="Also save the plain slide image.")
    save_ext: str = Field("jpg", description="Image extension: jpg, jpeg, png, tiff or tif.")
    use_ref_scores: Bool = Field(
        True, description="Fine-pass scores as percentiles of the coarse-pass scores."
    )
    blur: Bool = Field(False, description="Gaussian-blur the production heatmap.")
    use_center_shift: Bool = Field(
        True, description="Tissue test with 4 shifted points instead of the centre only."
    )
    use_roi: Bool = Field(False, description="Restrict to the row's x1, x2, y1, y2 (level 0).")
    calc_heatmap: Bool = Field(True, description="Run the overlapping (fine) pass.")
    binarize: Bool = Field(False, description="Threshold the production heatmap.")
    binary_thresh: Float = Field(
        -1, description="Threshold on [0, 1] scores; -1: 1 / number of patches."
    )
    custom_downsample: int = Field(1, ge=1, description="Shrink the saved images by this factor.")
    cmap: str = Field("jet", description="Matplotlib colormap name.")

    @field_validator("binary_thresh")
    @classmethod
    def _check_binary_thresh(cls, value: float) -> float:
        if value == -1 or 0 < value < 1:
            return value
        raise _KeyProblem("must be -1 or in (0, 1)")

    @field_validator("save_ext")
    @classmethod
    def _check_save_ext(cls, value: str) -> str:
        if value.lower() in SAVE_EXTS:
            return value
        raise _KeyProblem(
            f"must be one of {', '.join(SAVE_EXTS)}" + _did_you_mean(value.lower(), SAVE_EXTS)
        )

    @field_validator("cmap")
    @classmethod
    def _check_cmap(cls, value: str) -> str:
        names = _colormap_names()
        if value in names:
            return value
        raise _KeyProblem("not a matplotlib colormap" + _did_you_mean(value, names))


class SampleSpec(_Block):
    """One top-patch sampler of ``sample_arguments.samples``."""

    name: str = Field(min_length=1, description="Sampler name; also its output folder name.")
    sample: Bool = Field(True, description="Run this sampler.")
    seed: int = Field(1, description="Random seed (range_sample).")
    k: int = Field(15, ge=1, description="Number of patches to save.")
    mode: Literal["topk", "reverse_topk", "range_sample"] = Field(
        "topk", description="topk: highest scores; reverse_topk: lowest; range_sample: random."
    )
    score_start: Float = Field(0, description="range_sample: lowest percentile score kept.")
    score_end: Float = Field(1, description="range_sample: highest percentile score kept.")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if "/" in value or "\\" in value or value in (".", ".."):
            raise _KeyProblem("must be a plain folder name (no '/', '\\', '.' or '..')")
        return value

    @field_validator("score_end")
    @classmethod
    def _check_range(cls, value: float, info: ValidationInfo) -> float:
        start = info.data.get("score_start")
        if start is not None and value < start:
            raise _KeyProblem(f"must be >= score_start ({_num(start)})")
        return value


def _default_samples() -> list[dict[str, Any]]:
    return [{"name": "topk_high_attention", "sample": True, "seed": 1, "k": 15, "mode": "topk"}]


class SampleArguments(_Block):
    """``sample_arguments``: the list of top-patch samplers."""

    samples: list[SampleSpec] = Field(
        default_factory=_default_samples, description="Samplers, run in order."
    )

    @model_validator(mode="after")
    def _check_unique_names(self) -> SampleArguments:
        seen: set[str] = set()
        for index, spec in enumerate(self.samples):
            if spec.name in seen:
                raise _KeyProblem(
                    "duplicate sampler name (each sampler writes to its own folder)",
                    ("samples", index, "name"),
                    spec.name,
                )
            seen.add(spec.name)
        return self


class RunnerArguments(_Block):
    """``runner_arguments``: clam-heat's own settings (CLAM configs need none of them)."""

    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    workers: int = Field(1, ge=1, description="Parallel slide workers.")
    features_dir: OptionalPath = Field(
        None,
        description="Folder of TRIDENT/CLAM feature files <slide_id>.h5; null: CLAM's raw "
        "cache <raw>/<slide_id>.h5.",
    )
    patches_dir: OptionalPath = Field(
        None, description="Folder of companion coords files for features_dir; or null."
    )
    patch_size_level0: int | None = Field(
        None, ge=1, description="Level-0 patch side of precomputed features (override)."
    )
    results_dir: ResolvedPath = Field("heatmaps/results", description="Results-CSV folder.")
    write_pyramid_tiff: Bool = Field(False, description="Also write a pyramidal TIFF heatmap.")
    write_geojson: Bool = Field(False, description="Also write patch scores as GeoJSON.")
    segment_heatmap: Bool = Field(True, description="Mask the heatmap to tissue.")
    encoder_weights: OptionalPath = Field(
        None,
        description="Local weights file for encoder_arguments.model_name (no downloads); null: "
        "look in the Hugging Face cache.",
    )
    extract_features: Bool = Field(
        False,
        description="When a slide has no feature H5, encode its non-overlapping grid with the "
        "configured encoder (CLAM's behaviour) and cache it as <raw>/<slide_id>.h5.",
    )
    loader_workers: int = Field(0, ge=0, description="DataLoader workers reading patches.")
    amp: Bool = Field(False, description="Mixed precision for the encoder on CUDA.")
    log_level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(_upper)
    ] = Field("INFO", description="Logging level.")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if _DEVICE.fullmatch(value):
            return value
        raise _KeyProblem("must be auto, cpu, cuda or cuda:N")


BLOCKS: dict[str, type[_Block]] = {
    "exp_arguments": ExpArguments,
    "data_arguments": DataArguments,
    "patching_arguments": PatchingArguments,
    "encoder_arguments": EncoderArguments,
    "model_arguments": ModelArguments,
    "heatmap_arguments": HeatmapArguments,
    "sample_arguments": SampleArguments,
    "runner_arguments": RunnerArguments,
}
BLOCK_NAMES: tuple[str, ...] = tuple(BLOCKS)
CLAM_BLOCK_NAMES: tuple[str, ...] = BLOCK_NAMES[:7]


# --------------------------------------------------------------------------- whole config


class HeatmapConfig(BaseModel):
    """A whole, checked heatmap config: CLAM's seven blocks plus ``runner_arguments``."""

    model_config = ConfigDict(extra="forbid")

    exp_arguments: ExpArguments = Field(default_factory=ExpArguments)
    data_arguments: DataArguments = Field(default_factory=DataArguments)
    patching_arguments: PatchingArguments = Field(default_factory=PatchingArguments)
    encoder_arguments: EncoderArguments = Field(default_factory=EncoderArguments)
    model_arguments: ModelArguments = Field(default_factory=ModelArguments)
    heatmap_arguments: HeatmapArguments = Field(default_factory=HeatmapArguments)
    sample_arguments: SampleArguments = Field(default_factory=SampleArguments)
    runner_arguments: RunnerArguments = Field(default_factory=RunnerArguments)
    source_path: Path | None = Field(None, exclude=True, description="The YAML file, if any.")

    _base_dir: Path | None = PrivateAttr(default=None)

    @field_validator(*BLOCK_NAMES, mode="before")
    @classmethod
    def _empty_block(cls, value: Any) -> Any:
        """``block:`` with nothing under it is an empty block, not an error."""
        return {} if value is None else value

    @model_validator(mode="after")
    def _check_label_dict(self) -> HeatmapConfig:
        labels = self.data_arguments.label_dict
        rule = _label_dict_rule(self.exp_arguments.n_classes, labels)
        if rule:
            raise _KeyProblem(rule, ("data_arguments", "label_dict"), labels)
        return self

    @property
    def config_dir(self) -> Path:
        """Folder relative paths were resolved against (the YAML's folder, else the CWD)."""
        if self.source_path is not None:
            return self.source_path.parent
        return self._base_dir if self._base_dir is not None else Path.cwd()

    @property
    def process_list_path(self) -> Path:
        """The process-list CSV: ``data_arguments.process_list`` if set, else
        ``<config folder>/process_lists/<save_exp_code>.csv`` (built from data_dir)."""
        if self.data_arguments.process_list is not None:
            return self.data_arguments.process_list
        name = f"{self.exp_arguments.save_exp_code}.csv"
        return _norm(self.config_dir / PROCESS_LIST_DIRS[0] / name)

    @property
    def results_csv_path(self) -> Path:
        """CLAM's results CSV: ``results_dir/<process-list stem or save_exp_code>.csv``."""
        process_list = self.data_arguments.process_list
        stem = process_list.stem if process_list is not None else self.exp_arguments.save_exp_code
        return self.runner_arguments.results_dir / f"{stem}.csv"

    def block(self, name: str) -> dict[str, Any]:
        """One block as a plain, JSON-compatible dict (paths as str)."""
        if name not in BLOCKS:
            raise KeyError(f"{name}: " + _unknown("block", name, BLOCK_NAMES))
        model: BaseModel = getattr(self, name)
        return model.model_dump(mode="json")

    def to_yaml_dict(self) -> dict[str, Any]:
        """All blocks with CLAM key names (paths as absolute str); loads back to an equal config."""
        return {name: self.block(name) for name in BLOCK_NAMES}


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Origin:
    """Where a value came from: a YAML line or a command-line override."""

    text: str
    order: tuple[int, int, int]
    key: tuple[str | int, ...] = ()
    override: bool = False


class _Problems:
    """Collects problems (deduplicated, sorted by where they come from) for one ConfigError."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.origins: dict[tuple[str | int, ...], _Origin] = {(): _Origin(source, (0, 0, 0))}
        self._items: list[tuple[tuple[int, int, int], str]] = []

    def origin(self, loc: tuple[str | int, ...]) -> _Origin:
        for cut in range(len(loc), -1, -1):
            found = self.origins.get(loc[:cut])
            if found is not None:
                return found
        return self.origins[()]

    def add(self, loc: tuple[str | int, ...], rule: str, value: Any = ...) -> None:
        where = self.origin(loc)
        shown = "" if value is ... else f" = {_show(value)}"
        if where.override and loc == where.key:
            text = f"{where.text}: {rule}"
        elif where.override:
            text = f"{where.text}: {_dotted(loc)}{shown}: {rule}"
        else:
            text = " ".join(filter(None, [where.text, _dotted(loc) + shown])) + f": {rule}"
        self.add_text(where.order, text)

    def add_text(self, order: tuple[int, int, int], text: str) -> None:
        if all(text != existing for _, existing in self._items):
            self._items.append((order, text))

    def __bool__(self) -> bool:
        return bool(self._items)

    def error(self, source_path: Path | None) -> ConfigError:
        ordered = [text for _, text in sorted(self._items, key=lambda item: item[0])]
        err = ConfigError(ordered)  # each line already names the file
        err.source = source_path if source_path is not None else self.source
        return err


def _dotted(loc: tuple[str | int, ...]) -> str:
    """``('sample_arguments', 'samples', 0, 'k')`` -> ``sample_arguments.samples[0].k``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "[key]":
            out += f".{part}" if out else str(part)
    return out


def _num(value: Any) -> str:
    """Print a bound the way users write it: ``1.0`` -> ``1``.

    >>> _num(1.0), _num(0.5), _num(-1)
    ('1', '0.5', '-1')
    """
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _show(value: Any) -> str:
    text = repr(value.as_posix() if isinstance(value, Path) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def _allowed_keys(parent: tuple[str | int, ...]) -> tuple[str, ...]:
    names = tuple(part for part in parent if isinstance(part, str))
    if names == ("sample_arguments", "samples"):
        return tuple(SampleSpec.model_fields)
    if len(names) == 1 and names[0] in BLOCKS:
        return tuple(BLOCKS[names[0]].model_fields)
    return BLOCK_NAMES


_TYPE_RULES = {
    "missing": "missing required key",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "dict_type": "must be a mapping of keys to values",
    "model_type": "must be a mapping of keys to values",
    "model_attributes_type": "must be a mapping of keys to values",
    "list_type": "must be a list",
}
_BOUND_RULES = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">"}
_BOUND_RULES["less_than"] = "<"
_BOUND_KEYS = {"greater_than_equal": "ge", "less_than_equal": "le", "greater_than": "gt"}
_BOUND_KEYS["less_than"] = "lt"


def _add_validation_errors(problems: _Problems, error: ValidationError) -> None:
    """Turn pydantic's errors into our one-line problems (key path, value, rule)."""
    for item in error.errors():
        loc = tuple(item["loc"])
        kind = item["type"]
        ctx = item.get("ctx") or {}
        value: Any = item.get("input")
        cause = ctx.get("error")
        if isinstance(cause, _KeyProblem):
            loc += cause.key
            rule = cause.rule
            if cause.value is not ...:
                value = cause.value
        elif kind == "extra_forbidden":
            rule = _unknown("key", str(loc[-1]), _allowed_keys(loc[:-1]))
            value = ...
        elif kind in _BOUND_RULES:
            rule = f"must be {_BOUND_RULES[kind]} {_num(ctx[_BOUND_KEYS[kind]])}"
        elif kind == "literal_error":
            rule = f"must be one of {ctx['expected']}"
        elif kind in _TYPE_RULES:
            rule = _TYPE_RULES[kind]
        else:
            message = str(item["msg"])
            rule = message[:1].lower() + message[1:]
        if kind == "missing":
            value = ...
        if loc and loc[-1] == "[key]":
            rule = "key " + rule
        problems.add(loc, rule, value)


def _record_lines(
    node: yaml.Node,
    loc: tuple[str | int, ...],
    loader: yaml.SafeLoader,
    problems: _Problems,
    name: str,
) -> None:
    """Map every key path of the YAML tree to ``name:line`` (1-based)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            try:
                key = loader.construct_object(key_node, deep=True)
            except yaml.YAMLError:
                continue
            if not isinstance(key, str | int) or isinstance(key, bool):
                key = str(key)
            mark = key_node.start_mark
            order = (0, mark.line + 1, mark.column)
            problems.origins[loc + (key,)] = _Origin(f"{name}:{mark.line + 1}", order)
            _record_lines(value_node, loc + (key,), loader, problems, name)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            mark = item.start_mark
            order = (0, mark.line + 1, mark.column)
            problems.origins[loc + (index,)] = _Origin(f"{name}:{mark.line + 1}", order)
            _record_lines(item, loc + (index,), loader, problems, name)


def _parse_yaml(text: str, problems: _Problems, name: str) -> Any:
    """safe_load the text and record the line of every key; YAML errors become problems."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        data = loader.construct_document(node)
        _record_lines(node, (), loader, problems, name)
        return data
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        line = mark.line + 1 if mark is not None else 0
        parts = [getattr(err, "context", None), getattr(err, "problem", None)]
        what = ", ".join(part for part in parts if part) or str(err).splitlines()[0]
        problems.add_text((0, line, 0), f"{name}:{line} invalid YAML: {what}")
        return None
    finally:
        loader.dispose()


def _set_override(
    data: dict[str, Any],
    problems: _Problems,
    loc: tuple[str, str],
    value: Any,
    text: str,
    order: int,
) -> None:
    """Put an override into the raw data and remember that errors there belong to it."""
    block, key = loc
    current = data.get(block)
    if current is None:
        current = {}
    if not isinstance(current, dict):
        return  # the block itself is reported as "must be a mapping"
    data[block] = {**current, key: value}
    for known in [k for k in problems.origins if k[:2] == loc]:
        del problems.origins[known]
    problems.origins[loc] = _Origin(text, (1, order, 0), loc, override=True)


def _apply_set(data: dict[str, Any], problems: _Problems, spec: str, order: int) -> None:
    """Apply one generic ``BLOCK.KEY=VALUE`` override (the value is parsed as YAML)."""
    where = f"--set {spec}"
    path, sep, raw = spec.partition("=")
    parts = path.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        problems.add_text(
            (1, order, 0), f"{where}: expected BLOCK.KEY=VALUE (e.g. heatmap_arguments.alpha=0.5)"
        )
        return
    block, key = parts
    if block not in BLOCKS:
        problems.add_text((1, order, 0), f"{where}: " + _unknown("block", block, BLOCK_NAMES))
        return
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        problems.add_text((1, order, 0), f"{where}: the value is not valid YAML")
        return
    _set_override(data, problems, (block, key), value, where, order)


def _build(
    data: Any,
    problems: _Problems,
    *,
    base_dir: Path,
    source_path: Path | None,
    overrides: Sequence[str] = (),
    save_exp_code: str | None = None,
    overlap: float | None = None,
) -> HeatmapConfig:
    """Validate raw YAML data (plus overrides) into a HeatmapConfig or raise every problem."""
    if not problems and not isinstance(data, dict):
        if data is None:
            problems.add_text((0, 0, 0), f"{problems.source}: the config is empty")
        else:
            problems.add_text(
                (0, 1, 0),
                f"{problems.source}: must be a mapping of blocks "
                f"({', '.join(CLAM_BLOCK_NAMES)}), got {type(data).__name__}",
            )
    if problems:
        raise problems.error(source_path)
    assert isinstance(data, dict)
    raw: dict[str, Any] = {}
    for key, value in data.items():
        if key in BLOCKS:
            raw[key] = value
        else:
            problems.add((key,), _unknown("block", str(key), BLOCK_NAMES))

    for order, spec in enumerate(overrides):
        _apply_set(raw, problems, spec, order)
    if save_exp_code is not None:
        text = f"--save_exp_code {save_exp_code}"
        _set_override(raw, problems, ("exp_arguments", "save_exp_code"), save_exp_code, text, 90)
    if overlap is not None:
        text = f"--overlap {overlap}"
        _set_override(raw, problems, ("patching_arguments", "overlap"), overlap, text, 91)
    for name in BLOCK_NAMES:
        raw.setdefault(name, {})  # validate every block with the path context

    context = {"base_dir": base_dir, "cwd": Path.cwd()}
    config: HeatmapConfig | None = None
    try:
        config = HeatmapConfig.model_validate({**raw, "source_path": source_path}, context=context)
    except ValidationError as err:
        _add_validation_errors(problems, err)
        _cross_check_raw(raw, problems, context)
    if problems or config is None:
        raise problems.error(source_path)
    config._base_dir = base_dir
    return config


def _cross_check_raw(raw: dict[str, Any], problems: _Problems, context: dict[str, Any]) -> None:
    """Check label_dict against n_classes even when other keys failed (report everything)."""
    try:
        exp, data = raw.get("exp_arguments") or {}, raw.get("data_arguments") or {}
        n_classes = ExpArguments.model_validate(
            {"n_classes": exp["n_classes"]} if "n_classes" in exp else {}, context=context
        ).n_classes
        labels = DataArguments.model_validate(
            {"label_dict": data["label_dict"]} if "label_dict" in data else {}, context=context
        ).label_dict
    except (ValidationError, TypeError, AttributeError):
        return
    rule = _label_dict_rule(n_classes, labels)
    if rule:
        problems.add(("data_arguments", "label_dict"), rule, labels)


def find_config(name_or_path: str | Path) -> Path:
    """Find a config file: the path as given, else under ``configs/`` or ``heatmaps/configs/``.

    Relative names are looked up under the CWD (CLAM joins ``heatmaps/configs`` with the name);
    a name without a suffix also matches ``<name>.yaml`` / ``<name>.yml``.
    Raises ConfigError when nothing matches.
    """
    given = Path(name_or_path).expanduser()
    names = [given]
    if not given.suffix:
        names += [given.with_name(given.name + ".yaml"), given.with_name(given.name + ".yml")]
    if given.is_absolute():
        candidates = names
    else:
        candidates = [Path.cwd() / folder / name for folder in CONFIG_SEARCH_DIRS for name in names]
    for candidate in candidates:
        if candidate.is_file():
            return _norm(candidate.absolute())
    if given.is_absolute():
        where = "(no such file)"
    else:
        where = f"(looked in {', '.join(d + '/' for d in CONFIG_SEARCH_DIRS)} under {Path.cwd()})"
    raise ConfigError(f"config '{name_or_path}' not found {where}")


def load_config(
    path: str | Path,
    *,
    overrides: Sequence[str] = (),
    save_exp_code: str | None = None,
    overlap: float | None = None,
) -> HeatmapConfig:
    """Load, override and check a heatmap YAML config.

    ``save_exp_code`` / ``overlap`` are CLAM's two CLI overrides; ``overrides`` holds generic
    ``BLOCK.KEY=VALUE`` settings (value parsed as YAML), applied first, in order.
    Raises ConfigError (exit code 2) listing every problem found.
    """
    found = find_config(path)
    name = found.name
    try:
        text = found.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{name}: cannot read the config ({err})", found) from None
    problems = _Problems(name)
    data = _parse_yaml(text, problems, name)
    return _build(
        data,
        problems,
        base_dir=found.parent,
        source_path=found,
        overrides=overrides,
        save_exp_code=save_exp_code,
        overlap=overlap,
    )


def config_from_dict(
    data: dict[str, Any],
    *,
    base_dir: Path | None = None,
    source: str = "<dict>",
    overrides: Sequence[str] = (),
    flag_values: Sequence[tuple[str, str, Any, str]] = (),
) -> HeatmapConfig:
    """Check a config given as a dict (as ``yaml.safe_load`` would return it).

    Relative paths resolve against ``base_dir`` if they exist there, else the CWD; problems are
    named ``<source> key.path = value: rule``. ``overrides`` are ``--set`` strings, as for
    :func:`load_config`; ``flag_values`` are ``(block, key, value, flag text)`` settings made by
    command-line flags, whose problems are reported against the flag (``--model-type x: ...``).
    """
    problems = _Problems(source)
    base = Path(base_dir).absolute() if base_dir is not None else Path.cwd()
    raw = dict(data) if isinstance(data, Mapping) else data
    if isinstance(raw, dict):
        for order, (block, key, value, text) in enumerate(flag_values):
            _set_override(raw, problems, (block, key), value, text, 80 + order)
    return _build(raw, problems, base_dir=base, source_path=None, overrides=overrides)
