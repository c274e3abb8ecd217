"""Building the quick path's config from flags and writing it with the process list."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..config import HeatmapConfig
from ..errors import ConfigError, counted
from .inputs import (
    _feature_files,
    _few,
    _slide_files,
    feature_width,
    label_dict_for,
    match_slides,
    read_slide_table,
    select_slides,
)

__all__ = ["QUICK_HEADER", "QuickOptions", "QuickPlan", "build_quick_config", "prepare_quick"]

QUICK_HEADER = "# written by `clam-heat quick`; rerun or edit it with `clam-heat run {path}`\n"
"""First line of ``OUT/config.yaml`` (``{path}`` is the file itself)."""

#: The inputs that define "the same quick project"; a config with other values is replaced
#: with a warning.
_IDENTITY_KEYS: tuple[tuple[str, str], ...] = (
    ("model_arguments", "ckpt_path"),
    ("runner_arguments", "features_dir"),
    ("data_arguments", "data_dir"),
)


@dataclass(frozen=True)
class QuickOptions:
    """The flags of ``clam-heat quick``; None means "infer it from the inputs"."""

    ckpt: Path
    h5_dir: Path
    slide_dir: Path
    out: Path
    model_type: str = "clam_sb"
    model_size: str = "small"
    n_classes: int | None = None
    embed_dim: int | None = None
    slide_ext: str | None = None
    labels: Path | None = None
    workers: int = 1
    sets: Sequence[str] = ()
    #: MIL-Lab generate_heatmaps.py: first N slides (sorted), a slide_id[,label] CSV, and its
    #: drawing defaults (jet, alpha 0.5, vis_level -1 = auto, no tissue mask on the heatmap)
    limit: int | None = None
    csv: Path | None = None
    cmap: str = "jet"
    alpha: float = 0.5
    vis_level: int = -1
    segment: bool = False
    #: attribution methods (docs/explanations.md); empty: attention only, as before
    method: Sequence[str] = ()


@dataclass(frozen=True)
class QuickPlan:
    """A resolved quick run: the config, where it is saved, its slides and what to tell the user.

    ``warnings`` are one-line messages (unmatched files, a replaced config, a guessed label
    order); the run goes on after them.
    """

    config: HeatmapConfig
    config_path: Path
    slide_ids: tuple[str, ...]
    labels: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# building the config


def _absolute(path: Path) -> Path:
    return Path(path).expanduser().absolute()


def _sets_key(sets: Sequence[str], block: str, key: str) -> bool:
    """Whether a ``--set`` names ``block.key`` (then the flag-derived value is not used)."""
    return any(s.partition("=")[0].strip() == f"{block}.{key}" for s in sets)


def _have(items: Sequence[object]) -> str:
    return "has" if len(items) == 1 else "have"


def _unmatched_warnings(
    h5_only: Sequence[str], slides_only: Sequence[str], h5_dir: Path, slide_dir: Path, ext: str
) -> list[str]:
    """One line each for H5s without a slide and slides without an H5 (counts, a few names)."""
    lines = []
    if h5_only:
        lines.append(
            f"{counted(len(h5_only), 'H5 file')} in {h5_dir} {_have(h5_only)} no '*{ext}' slide "
            f"in {slide_dir}, "
            f"skipped: {_few(h5_only)}"
        )
    if slides_only:
        lines.append(
            f"{counted(len(slides_only), 'slide')} in {slide_dir} {_have(slides_only)} no H5 in "
            f"{h5_dir}, skipped: "
            f"{_few(slides_only)}"
        )
    return lines


def _embed_dim(first_h5: Path, given: int | None) -> int:
    """The feature width of ``first_h5``; a given ``--embed-dim`` must equal it."""
    width = feature_width(first_h5)
    if given is not None and given != width:
        raise ConfigError(
            f"--embed-dim {given} does not match {first_h5}: 'features' is {width} wide; "
            f"drop --embed-dim or pass --h5-dir with the model's features"
        )
    return width


def _check_encoder_width(model_type: str, width: int, first_h5: Path) -> None:
    """A MIL-Lab name's encoder part fixes the feature width: say so in flag words, naming the
    H5 whose width disagrees (the config check would say ``model_arguments.embed_dim``)."""
    from ..models.registry import ENCODER_DIM_MAPPING

    parts = model_type.split(".")
    encoder = parts[2] if len(parts) >= 3 else None
    expected = ENCODER_DIM_MAPPING.get(encoder or "")
    if expected is not None and expected != width:
        raise ConfigError(
            f"--model_name {model_type}: encoder {encoder!r} gives {expected}-wide features but "
            f"--h5_dir's {first_h5} has {width}-wide 'features'; pass the features of "
            f"{encoder} or a --model_name whose encoder gives {width} "
            f"({_encoders_of(width)})"
        )


def _encoders_of(width: int) -> str:
    """The encoders whose features are ``width`` wide, or the bare-name hint."""
    from ..models.registry import ENCODER_DIM_MAPPING

    names = [name for name, dim in ENCODER_DIM_MAPPING.items() if dim == width]
    return ", ".join(names) if names else "none known: use the bare model name, e.g. abmil"


#: Config keys -> the quick flags that set them, for messages about a flag-built config.
FLAG_OF_KEY: dict[str, str] = {
    "model_arguments.ckpt_path": "--checkpoint",
    "model_arguments.model_type": "--model_name",
    "model_arguments.embed_dim": "--embed_dim",
    "model_arguments.model_size": "--model-size",
    "exp_arguments.n_classes": "--num_classes",
    "runner_arguments.features_dir": "--h5_dir",
    "data_arguments.data_dir": "--slide_dir",
    "data_arguments.slide_ext": "--slide_ext",
    "heatmap_arguments.vis_level": "--vis_level",
    "heatmap_arguments.alpha": "--alpha",
    "heatmap_arguments.cmap": "--cmap",
    "heatmap_arguments.method": "--method",
}


def in_flag_words(message: str, sets: Sequence[str] = ()) -> str:
    """``message`` with the config keys quick's flags set replaced by those flags (keys the
    user set with ``--set`` keep their names).

    >>> in_flag_words("model_arguments.ckpt_path: a CLAM checkpoint; set model_type: clam_sb")
    '--checkpoint: a CLAM checkpoint; pass --model_name clam_sb'
    """
    for key, flag in FLAG_OF_KEY.items():
        if not _sets_key(sets, *key.split(".", 1)):
            message = message.replace(key, flag)
            message = message.replace(f"set {key.split('.')[1]}: ", f"pass {flag} ")
    return message


def _n_classes(ckpt: Path, given: int | None) -> int:
    """The checkpoint's class count; ``--n-classes`` fills in when it cannot be read."""
    from .inputs import checkpoint_classes

    found = checkpoint_classes(ckpt)
    if given is not None and found is not None and found != given:
        raise ConfigError(
            f"--n-classes {given} does not match --ckpt {ckpt}: its classifier has {found} "
            "classes; drop --n-classes"
        )
    n_classes = given if given is not None else found
    if n_classes is None:
        raise ConfigError(
            f"--ckpt {ckpt}: cannot read the number of classes (no classifier head we know); "
            "pass --n-classes"
        )
    return n_classes


def _validate(data: dict[str, Any], options: QuickOptions) -> HeatmapConfig:
    """Check the flag-built blocks plus ``--model-type/--model-size`` and every ``--set``.

    The two model flags go in as CLAM-style CLI overrides and ``--set`` as in ``clam-heat run``,
    so each problem is reported against the flag that caused it, all at once.
    """
    from ..config import config_from_dict

    flags = [
        ("model_arguments", "model_type", options.model_type, f"--model-type {options.model_type}"),
        ("model_arguments", "model_size", options.model_size, f"--model-size {options.model_size}"),
    ]
    return config_from_dict(
        data,
        base_dir=Path.cwd(),
        source="clam-heat quick",
        overrides=list(options.sets),
        flag_values=flags,
    )


def build_quick_config(options: QuickOptions) -> QuickPlan:
    """Infer what the flags leave open and validate the result; reads inputs, writes nothing.

    Raises :class:`ConfigError` (exit code 2) for a missing or unreadable input, nothing to
    pair, a checkpoint without a readable class count (and no ``--n-classes``) or an
    ``--embed-dim`` different from the H5 width; every message names the flag and the file.
    """
    ckpt, h5_dir = _absolute(options.ckpt), _absolute(options.h5_dir)
    slide_dir, out = _absolute(options.slide_dir), _absolute(options.out)

    features = _feature_files(h5_dir)
    slide_ext, matched, h5_only, slides_only = match_slides(
        features, _slide_files(slide_dir), options.slide_ext
    )
    warnings = _unmatched_warnings(h5_only, slides_only, h5_dir, slide_dir, slide_ext)
    labels: dict[str, str] = {}
    csv_ids: list[str] | None = None
    csv_source = _absolute(options.csv) if options.csv is not None else None
    if csv_source is not None:
        csv_ids, labels = read_slide_table(csv_source, slide_ext, flag="--csv", need_label=False)
    matched, chosen = select_slides(matched, csv_ids, options.limit, csv_source)
    warnings += chosen
    embed_dim = _embed_dim(features[matched[0]], options.embed_dim)
    _check_encoder_width(options.model_type, embed_dim, features[matched[0]])
    n_classes = _n_classes(ckpt, options.n_classes)
    if ckpt.is_dir():  # a save_pretrained folder: the run fingerprints its weights file
        from ..models.checkpoint import SAFETENSORS_NAME

        ckpt = ckpt / SAFETENSORS_NAME

    label_source = _absolute(options.labels) if options.labels is not None else csv_source
    if options.labels is not None:
        labels = {**labels, **read_slide_table(label_source, slide_ext)[1]}
    if labels:
        labels = {sid: labels[sid] for sid in matched if sid in labels}
        unlabeled = [sid for sid in matched if sid not in labels]
        if unlabeled:
            warnings.append(
                f"{counted(len(unlabeled), 'slide')} {_have(unlabeled)} no label in {label_source} "
                "(filed under "
                f"Unspecified): {_few(unlabeled)}"
            )
    label_dict, guess = label_dict_for(labels.values(), n_classes, label_source)
    if guess and not _sets_key(options.sets, "data_arguments", "label_dict"):
        warnings.append(guess)
    drawing = {"cmap": options.cmap, "alpha": options.alpha, "vis_level": options.vis_level}

    data: dict[str, Any] = {
        "exp_arguments": {
            "n_classes": n_classes,
            "save_exp_code": "quick",
            "raw_save_dir": str(out / "heatmap_raw_results"),
            "production_save_dir": str(out / "heatmap_production_results"),
        },
        "data_arguments": {
            "data_dir": str(slide_dir),
            "process_list": str(out / "process_list.csv"),
            "slide_ext": slide_ext,
            "label_dict": label_dict,
        },
        "model_arguments": {"ckpt_path": str(ckpt), "embed_dim": embed_dim},
        "heatmap_arguments": {  # no fine pass: it needs encoder weights
            "calc_heatmap": False,
            **drawing,
            **({"method": list(options.method)} if options.method else {}),
        },
        "runner_arguments": {
            "features_dir": str(h5_dir),
            "results_dir": str(out / "results"),
            "workers": options.workers,
            "segment_heatmap": options.segment,
        },
    }
    return QuickPlan(
        config=_validate(data, options),
        config_path=out / "config.yaml",
        slide_ids=tuple(matched),
        labels=labels,
        warnings=tuple(warnings),
    )


# --------------------------------------------------------------------------------------------
# writing


def _replaced_inputs(path: Path, config: HeatmapConfig) -> list[str]:
    """``key: old -> new`` for each identity key an existing config at ``path`` differs in."""
    import yaml

    try:
        old = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return ["(unreadable)"]
    if not isinstance(old, dict):
        return ["(not a config)"]
    new = config.to_yaml_dict()
    changes = []
    for block, key in _IDENTITY_KEYS:
        before = (old.get(block) or {}).get(key) if isinstance(old.get(block), dict) else None
        if before != new[block][key]:
            changes.append(f"{block}.{key} {before} -> {new[block][key]}")
    return changes


def _write_config(plan: QuickPlan) -> str | None:
    """Write ``OUT/config.yaml`` (only if its text changes); a warning if another was replaced."""
    import yaml

    path = plan.config_path
    header = QUICK_HEADER.format(path=path)
    text = header + "---\n" + yaml.safe_dump(plan.config.to_yaml_dict(), sort_keys=False)
    warning = None
    if path.is_file():
        if path.read_text(encoding="utf-8", errors="replace") == text:
            return None
        changes = _replaced_inputs(path, plan.config)
        if changes:
            warning = f"{path}: replacing a config for other inputs ({'; '.join(changes)})"
    write_text_atomic(path, text)
    return warning


def _write_process_list(plan: QuickPlan) -> Path:
    """Create or extend ``OUT/process_list.csv`` with the matched slides (statuses are kept).

    ``--labels`` wins over a label already in the list (the slide then runs under its new label
    folder); without ``--labels`` existing labels are kept. Rows outside this command's
    selection (``--csv``, ``--limit``) get ``process = 0``, so the run and its results CSV cover
    exactly the selected slides; their finished outputs stay and count again when reselected.
    """
    import pandas as pd

    from ..process_list import build_process_list_from, load_preset, write_csv_atomic

    args = plan.config.data_arguments
    assert args.process_list is not None
    seed = pd.DataFrame({"slide_id": list(plan.slide_ids)})
    if plan.labels:
        seed["label"] = [plan.labels.get(sid, "") for sid in plan.slide_ids]
    with tempfile.TemporaryDirectory(prefix="clam_heat_quick_") as tmp:
        seed_csv = Path(tmp) / "slides.csv"
        seed.to_csv(seed_csv, index=False)
        df, path = build_process_list_from(
            data_dir=args.data_dir,
            list_path=args.process_list,
            defaults=load_preset(args.preset),
            slide_ext=args.slide_ext,
            data_dir_key=args.data_dir_key or "source",
            source_csv=seed_csv,
        )
    if plan.labels:  # _merge keeps existing rows as they are; a changed --labels must win
        old = df["label"] if "label" in df.columns else pd.Series("", index=df.index)
        old = old.astype(object).where(old.notna(), "").astype(str)
        new = df["slide_id"].map(plan.labels).fillna(old)
        if (new != old).any():
            df.loc[:, "label"] = new
            write_csv_atomic(df, path)
    chosen = df["slide_id"].astype(str).isin(set(plan.slide_ids)).astype(int)
    if (pd.to_numeric(df["process"], errors="coerce").fillna(0).astype(int) != chosen).any():
        df.loc[:, "process"] = chosen.to_numpy()
        write_csv_atomic(df, path)
    return path


def _checked_plan(options: QuickOptions) -> QuickPlan:
    """The config, with its global inputs checked (the checkpoint loads into the named model)
    before anything is written: a refused start leaves no config, list or folder behind. Errors
    name the flags, not the config keys they became."""
    from ..errors import ClamHeatError
    from ..preflight import check_global_inputs
    from ..stages.registry import stages_for

    try:
        plan = build_quick_config(options)
        stages = [getattr(s, "name", str(s)) for s in stages_for(plan.config, None)]
        check_global_inputs(plan.config, stages)
    except ClamHeatError as err:
        text = in_flag_words(str(err), options.sets)
        if text == str(err):
            raise
        try:
            translated = type(err)(text)
        except TypeError:  # an error type that takes more than a message
            translated = ConfigError(text)
        raise translated from None
    return plan


def prepare_quick(options: QuickOptions) -> QuickPlan:
    """The library call behind ``clam-heat quick``: build the config, then write it and the list.

    ``OUT/config.yaml`` is written before anything runs, so ``clam-heat run OUT/config.yaml``
    repeats the run; an existing config for other inputs is replaced with a warning. The process
    list keeps its statuses across reruns, so rerunning the same command resumes.
    """
    plan = _checked_plan(options)
    warnings = list(plan.warnings)
    replaced = _write_config(plan)
    if replaced:
        warnings.append(replaced)
    _write_process_list(plan)
    return QuickPlan(
        config=plan.config,
        config_path=plan.config_path,
        slide_ids=plan.slide_ids,
        labels=plan.labels,
        warnings=tuple(warnings),
    )
