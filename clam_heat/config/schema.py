"""The config schema: CLAM's seven blocks plus ``runner_arguments``, with CLAM's defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..atomic import name_problem
from ..colormaps import SHIPPED_CMAPS
from ..models.registry import model_type_problem
from .fields import (
    _DEVICE,
    PROCESS_LIST_DIRS,
    SAVE_EXTS,
    Bool,
    Float,
    OptionalPath,
    ResolvedPath,
    _colormap_names,
    _did_you_mean,
    _KeyProblem,
    _label_dict_rule,
    _norm,
    _num,
    _to_data_dir,
    _to_path,
    _to_process_list,
    _unknown,
    _upper,
    _yaml12_float,
)

# --------------------------------------------------------------------------- CLAM blocks


def _show_name(name: Any) -> str:
    """A name quoted with ``repr`` escaping, cut to 60 characters (a message stays one line)."""
    text = repr(name)
    return text if len(text) <= 60 else text[:57] + "..."


def _plain_name(value: str, why: str) -> str:
    """``value`` if it can be one path segment under an output root, else a one-line problem
    (the value itself is shown by the loader, ``repr``-escaped)."""
    bad = name_problem(value)
    if bad:
        raise _KeyProblem(f"{bad}; it {why}, so give a plain name (no '/', '\\' or '..')")
    return value


ClassChoice = Literal["predicted", "all"] | list[str]


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

    @field_validator("save_exp_code")
    @classmethod
    def _check_save_exp_code(cls, value: str) -> str:
        return _plain_name(value, "names the run's folder under both save dirs")


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

    @field_validator("label_dict")
    @classmethod
    def _check_label_names(cls, value: dict[str, int]) -> dict[str, int]:
        for name in value:
            bad = name_problem(str(name))
            if bad:
                raise _KeyProblem(
                    f"class name {_show_name(name)} {bad}; class names name output folders, so "
                    "give a plain name"
                )
        return value

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
        description="A registered model (clam_sb, clam_mb, clam, abmil, transmil, dsmil, ilra, "
        "rrt, transformer, or one added with clam_heat.models.register_model), CLAM's mil, or a "
        "MIL-Lab name <model>.<config>.<encoder>.<task>.",
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
        problem = model_type_problem(value)
        if problem is not None:
            raise _KeyProblem(problem)
        return value


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
    score_scale: Literal["slide", "cohort"] = Field(
        "slide",
        description="Colour scale: slide (CLAM: percentiles within each slide) or cohort "
        "(percentiles of all the run's slides' scores, so a colour means the same on every slide).",
    )
    classes: Annotated[ClassChoice, BeforeValidator(_check_classes)] = Field(
        "predicted",
        description="Heatmaps drawn: predicted (CLAM), all (one per class, for models with "
        "per-class attention: clam_mb, dsmil) or a list of class names.",
    )

    # -- attribution methods (docs/explanations.md, clam_heat.explain); left out of ``block()``
    # while at their defaults, so a config that does not ask for them resolves (and
    # fingerprints) as before
    method: Annotated[str | list[str], BeforeValidator(_check_methods)] = Field(
        "attention",
        description="Attribution method(s) drawn: attention (CLAM), contribution, "
        "gradient_x_input, integrated_gradients, occlusion, instance; one name or a list.",
    )
    signed_cmap: str = Field(
        "RdBu_r", description="Diverging colormap of signed maps, centred on zero."
    )
    signed_scale: Literal["percentile", "raw"] = Field(
        "percentile",
        description="Signed maps: scale by the 99th percentile of |score| (percentile) or by "
        "the largest |score| (raw); zero is always the colormap's centre.",
    )
    ig_steps: int = Field(32, ge=2, le=4096, description="Integrated gradients: path steps.")
    ig_baseline: Literal["zeros", "mean"] = Field(
        "zeros", description="Integrated gradients baseline: zero features or the bag's mean."
    )
    occlusion_group: int = Field(
        4,
        ge=1,
        description="Occlusion of bags above 2,048 patches: leave out groups of N x N patches.",
    )
    faithfulness: Bool | None = Field(
        None,
        description="Deletion/insertion curves per method; default: on when a method other "
        "than attention is asked.",
    )
    faithfulness_steps: int = Field(20, ge=2, le=1000, description="Steps of each curve.")
    faithfulness_random: int = Field(
        3, ge=0, le=100, description="Seeded random orders for the faithfulness baseline."
    )

    #: Keys dumped only when set away from their default (see ``HeatmapConfig.block``).
    QUIET_DEFAULTS: ClassVar[tuple[str, ...]] = (
        "method",
        "signed_cmap",
        "signed_scale",
        "ig_steps",
        "ig_baseline",
        "occlusion_group",
        "faithfulness",
        "faithfulness_steps",
        "faithfulness_random",
    )

    def methods(self) -> list[str]:
        """``method`` as a list of distinct names, in the order given."""
        return [self.method] if isinstance(self.method, str) else list(self.method)

    def faithfulness_on(self) -> bool:
        """Whether the faithfulness stage runs (auto: any method besides attention)."""
        if self.faithfulness is not None:
            return bool(self.faithfulness)
        return self.methods() != ["attention"]

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

    @field_validator("cmap", "signed_cmap")
    @classmethod
    def _check_cmap(cls, value: str) -> str:
        if value in SHIPPED_CMAPS:
            return value
        names = _colormap_names()
        if value in names:
            return value
        raise _KeyProblem("not a matplotlib colormap" + _did_you_mean(value, names))


def _check_methods(value: Any) -> Any:
    """One method name or a non-empty list of distinct ones (torch-free registry)."""
    from ..explain.registry import method_problem

    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(v, str) for v in names):
        raise _KeyProblem("must be a method name or a list of method names")
    if len(set(names)) != len(names):
        raise _KeyProblem("lists a method twice")
    for name in names:
        problem = method_problem(name)
        if problem:
            raise _KeyProblem(problem)
    return value


def _check_classes(value: Any) -> Any:
    """``predicted``, ``all`` or a non-empty list of distinct class names."""
    if value in ("predicted", "all"):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        if len(set(value)) != len(value):
            raise _KeyProblem("lists a class twice")
        return value
    raise _KeyProblem("must be predicted, all or a list of label_dict class names")


class SampleSpec(_Block):
    """One top-patch sampler of ``sample_arguments.samples``."""

    name: str = Field(min_length=1, description="Sampler name; also its output folder name.")
    sample: Bool = Field(True, description="Run this sampler.")
    seed: int = Field(1, description="Random seed (range_sample).")
    k: int = Field(15, ge=1, description="Number of patches to save.")
    mode: Literal["topk", "reverse_topk", "range_sample", "threshold"] = Field(
        "topk",
        description="topk: highest scores; reverse_topk: lowest; range_sample: random; "
        "threshold: every patch scoring at or above threshold.",
    )
    score_start: Float = Field(0, description="range_sample: lowest percentile score kept.")
    score_end: Float = Field(1, description="range_sample: highest percentile score kept.")
    threshold: Float = Field(
        0.9, description="threshold mode: lowest score exported (percentile: on a 0-1 scale)."
    )
    score: Literal["percentile", "raw"] = Field(
        "percentile",
        description="threshold mode: compare the slide's rank percentile (0-1) or the raw score.",
    )
    format: Literal["png", "h5"] = Field(
        "png", description="threshold mode: one PNG per patch, or one HDF5 of patches per slide."
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _plain_name(value, "names the sampler's folder")

    @model_validator(mode="after")
    def _check_percentile_threshold(self) -> SampleSpec:
        if self.mode == "threshold" and self.score == "percentile" and not 0 <= self.threshold <= 1:
            raise _KeyProblem(
                "must be in [0, 1] with score: percentile (0.9 = the top 10 %); "
                "use score: raw for a raw attention threshold",
                ("threshold",),
                self.threshold,
            )
        return self

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


def _tracker_uri(value: Any, info: ValidationInfo) -> Any:
    """A URI is kept as written; a plain path (no scheme) resolves like the other paths."""
    from urllib.parse import urlparse

    if value is None:
        return None
    if not isinstance(value, str | Path) or not str(value).strip():
        raise _KeyProblem("must be a URI (file:/path, http://host:5000) or a folder path")
    text = str(value)
    if len(urlparse(text).scheme) > 1:
        return text
    return str(_to_path(text, info))


class RunnerArguments(_Block):
    """``runner_arguments``: clam-heat's own settings (CLAM configs need none of them)."""

    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    workers: int = Field(
        1, ge=1, description="Parallel slide workers (at most the pending rows and the cores)."
    )
    force_workers: Bool = Field(
        False, description="Let workers exceed the cores this process may use."
    )
    max_patches: int = Field(
        2_000_000,
        ge=1,
        description="Largest bag read (patches); a feature file declaring more fails its row "
        "before its data is read, so memory is bounded by this, not by the input.",
    )
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
    flush_seconds: float = Field(
        30.0,
        ge=0,
        description="Write the process list and results CSV at most this often during a run "
        "(row outcomes are journaled at once; 0: after every row).",
    )
    tracker: Literal["none", "mlflow", "wandb"] = Field(
        "none",
        description="Experiment tracker for the resolved config, per-slide metrics, heatmap "
        "thumbnails and the results CSV: none, mlflow (pip install 'clam-heat[mlflow]') or "
        "wandb (pip install 'clam-heat[wandb]'; offline unless a W&B API key is known).",
    )
    tracker_uri: Annotated[str | None, BeforeValidator(_tracker_uri)] = Field(
        None,
        description="MLflow tracking URI (file:/path, http://host:5000) or W&B server URL; "
        "null: MLFLOW_TRACKING_URI / W&B default, else <raw_save_dir>/<save_exp_code>/mlruns.",
    )
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

    @model_validator(mode="after")
    def _check_class_names(self) -> HeatmapConfig:
        classes = self.heatmap_arguments.classes
        labels = self.data_arguments.label_dict
        unknown = [c for c in classes if c not in labels] if isinstance(classes, list) else []
        if unknown:
            raise _KeyProblem(
                f"names {', '.join(map(repr, unknown))}, not in data_arguments.label_dict "
                f"({', '.join(labels)})",
                ("heatmap_arguments", "classes"),
                classes,
            )
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
        dumped = model.model_dump(mode="json")
        for key in getattr(model, "QUIET_DEFAULTS", ()):
            if key in dumped and dumped[key] == type(model).model_fields[key].default:
                del dumped[key]
        return dumped

    def to_yaml_dict(self) -> dict[str, Any]:
        """All blocks with CLAM key names (paths as absolute str); loads back to an equal config."""
        return {name: self.block(name) for name in BLOCK_NAMES}
