"""The quick path: turn four folders/files given as flags into a normal :class:`HeatmapConfig`.

``clam-heat quick --ckpt CKPT --h5-dir FEATURES --slide-dir SLIDES --out OUT`` needs no YAML.
Everything else starts at CLAM's template values (the schema defaults of :mod:`clam_heat.config`)
and what can be read from the inputs is read rather than asked for:

- ``embed_dim``: the width of ``features`` in the first feature H5;
- ``n_classes``: the classifier head of the checkpoint;
- ``slide_ext``: the one extension shared by the slides whose stem matches an H5 stem;
- the slides: the H5 stems that have a slide file (unmatched H5s and slides are warnings);
- ``label_dict``: the labels of ``--labels`` (``slide_id,label``), else one name per class index
  (rows then have no ``label`` column, which CLAM files under ``Unspecified``).

Why a config and not a separate code path: the result is written to ``OUT/config.yaml`` (and the
slide list to ``OUT/process_list.csv``) before anything runs, so the run is the ordinary
``run`` pipeline with its ledger, a rerun of the same command resumes, and the user can switch to
``clam-heat run OUT/config.yaml`` and edit YAML whenever flags stop being enough.

Quick-path choices that differ from the template, because only features are given:
``heatmap_arguments.calc_heatmap`` is false (the fine pass needs encoder weights) and
``save_exp_code`` is ``quick``. Any key can still be set with ``--set BLOCK.KEY=VALUE``.
Input problems raise :class:`~clam_heat.errors.ConfigError` (exit code 2) naming the flag, the
file and the fix.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .config import HeatmapConfig
from .errors import ClamHeatError, ConfigError

__all__ = [
    "QUICK_HEADER",
    "QuickOptions",
    "QuickPlan",
    "build_quick_config",
    "checkpoint_classes",
    "feature_width",
    "label_dict_for",
    "match_slides",
    "prepare_quick",
    "read_labels",
]

QUICK_HEADER = "# written by `clam-heat quick`; rerun or edit it with `clam-heat run {path}`\n"
"""First line of ``OUT/config.yaml`` (``{path}`` is the file itself)."""

#: How many names a warning or error quotes before "...".
_SHOWN = 3

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


def _few(names: Iterable[str]) -> str:
    """``a, b, c, ...`` for messages (sorted, at most :data:`_SHOWN` names).

    >>> _few(["d", "a", "c", "b"]), _few(["x"])
    ('a, b, c, ...', 'x')
    """
    items = sorted(names)
    return ", ".join(items[:_SHOWN]) + (", ..." if len(items) > _SHOWN else "")


# --------------------------------------------------------------------------------------------
# reading the inputs


def _feature_files(h5_dir: Path) -> dict[str, Path]:
    """``stem -> H5`` in ``h5_dir`` (TRIDENT ``features_<enc>/``) or its CLAM ``h5_files/``."""
    if not h5_dir.is_dir():
        raise ConfigError(
            f"--h5-dir {h5_dir}: no such folder; pass the folder holding <slide_id>.h5 feature "
            "files (TRIDENT features_<encoder>/ or CLAM's feat_dir)"
        )
    for folder in (h5_dir, h5_dir / "h5_files"):
        found = {
            p.stem: p
            for p in sorted(folder.glob("*.h5"))
            if p.is_file() and not p.name.startswith(".")
        }
        if found:
            return found
    raise ConfigError(
        f"--h5-dir {h5_dir}: no .h5 files (nor in {h5_dir / 'h5_files'}); pass the folder "
        "holding <slide_id>.h5 feature files (TRIDENT features_<encoder>/ or CLAM's feat_dir)"
    )


def feature_width(path: Path) -> int:
    """D of the ``features`` dataset, (N, D) or (1, N, D), read from the header only."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            node = handle.get("features")
            shape = tuple(node.shape) if isinstance(node, h5py.Dataset) else None
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unreadable"
        raise ConfigError(
            f"{path}: not a readable HDF5 file ({first}); re-extract it or remove it from --h5-dir"
        ) from None
    if shape is None:
        raise ConfigError(
            f"{path}: no 'features' dataset; --h5-dir must hold TRIDENT or CLAM feature files"
        )
    if len(shape) == 2 or (len(shape) == 3 and shape[0] == 1):
        return int(shape[-1])
    raise ConfigError(f"{path}: 'features' has shape {shape}, expected (N, D) or (1, N, D)")


def _slide_files(slide_dir: Path) -> list[str]:
    if not slide_dir.is_dir():
        raise ConfigError(f"--slide-dir {slide_dir}: no such folder; pass the folder of slides")
    return sorted(p.name for p in slide_dir.iterdir() if p.is_file() and not p.name.startswith("."))


def _split_name(name: str, stems: set[str]) -> tuple[str, str] | None:
    """``(stem, ext)`` of a slide file name whose stem is an H5 stem (longest stem first).

    >>> _split_name("a.b.svs", {"a", "a.b"}), _split_name("a.ome.tiff", {"a"})
    (('a.b', '.svs'), ('a', '.ome.tiff'))
    >>> _split_name("c.svs", {"a"}) is None
    True
    """
    cut = name.rfind(".")
    while cut > 0:
        if name[:cut] in stems:
            return name[:cut], name[cut:]
        cut = name.rfind(".", 0, cut)
    return None


def match_slides(
    h5_stems: Iterable[str], slide_names: Iterable[str], slide_ext: str | None = None
) -> tuple[str, list[str], list[str], list[str]]:
    """Pair feature files with slides: ``(slide_ext, matched, h5_only, slides_only)``.

    Without ``slide_ext`` it is the one extension shared by the slides whose stem is an H5 stem;
    several such extensions raise :class:`ConfigError` listing them. ``slides_only`` counts only
    files with that extension (other files in the folder are not slides).

    >>> match_slides(["a", "b", "c"], ["a.svs", "b.svs", "d.svs", "notes.txt"])
    ('.svs', ['a', 'b'], ['c'], ['d'])
    >>> match_slides(["a", "b"], ["a.svs", "b.tiff"])
    Traceback (most recent call last):
    ...
    clam_heat.errors.ConfigError: --slide-dir: the slides matching the H5 files have 2 extensions (.svs: a; .tiff: b); pass --slide-ext to pick one
    """  # noqa: E501 - a doctest output line cannot wrap
    stems = set(h5_stems)
    names = list(slide_names)
    if slide_ext is None:
        by_ext: dict[str, list[str]] = {}
        for name in names:
            split = _split_name(name, stems)
            if split is not None:
                by_ext.setdefault(split[1], []).append(split[0])
        if len(by_ext) > 1:
            parts = "; ".join(f"{ext}: {_few(ids)}" for ext, ids in sorted(by_ext.items()))
            raise ConfigError(
                f"--slide-dir: the slides matching the H5 files have {len(by_ext)} extensions "
                f"({parts}); pass --slide-ext to pick one"
            )
        if not by_ext:
            raise ConfigError(
                f"--slide-dir: no slide file is named like an H5 file (H5 stems: {_few(stems)}; "
                f"slides: {_few(names) or 'none'}); a slide <id>.<ext> needs features <id>.h5"
            )
        slide_ext = next(iter(by_ext))
    with_ext = {n.removesuffix(slide_ext) for n in names if n.endswith(slide_ext)}
    with_ext.discard("")
    matched = sorted(stems & with_ext)
    if not matched:
        raise ConfigError(
            f"--slide-dir: no '*{slide_ext}' slide is named like an H5 file (H5 stems: "
            f"{_few(stems)}); check --slide-ext and the folders"
        )
    return slide_ext, matched, sorted(stems - with_ext), sorted(with_ext - stems)


def checkpoint_classes(ckpt: Path) -> int | None:
    """Class count read from a checkpoint's classifier head, or None when it has none we know."""
    from .models import checkpoint_n_classes, load_checkpoint_state

    if not ckpt.is_file():
        raise ConfigError(
            f"--ckpt {ckpt}: no such file; pass your trained model's state dict "
            "(CLAM s_<fold>_checkpoint.pt)"
        )
    try:
        state = load_checkpoint_state(ckpt)
    except ClamHeatError as err:
        raise ConfigError(f"--ckpt {err}") from None
    return checkpoint_n_classes(state)


def read_labels(path: Path, slide_ext: str) -> dict[str, str]:
    """``slide_id -> label`` from a ``slide_id,label`` CSV (blank labels are left out)."""
    import pandas as pd

    from .process_list import normalize_slide_id

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--labels {path}: cannot be read as CSV ({first})") from None
    absent = [c for c in ("slide_id", "label") if c not in table.columns]
    if absent:
        raise ConfigError(
            f"--labels {path}: no {absent[0]!r} column; the file needs a header slide_id,label"
        )
    labels: dict[str, str] = {}
    for sid, label in zip(table["slide_id"], table["label"], strict=True):
        sid, label = normalize_slide_id(sid.strip(), slide_ext), label.strip()
        if not sid or not label:
            continue
        if labels.get(sid, label) != label:
            raise ConfigError(
                f"--labels {path}: slide {sid!r} has two labels ({labels[sid]!r}, {label!r}); "
                "keep one row per slide"
            )
        labels[sid] = label
    return labels


def label_dict_for(
    labels: Iterable[str], n_classes: int, source: Path | None
) -> tuple[dict[str, int], str | None]:
    """CLAM's ``label_dict`` for these labels, and a warning when its order is a guess.

    Integer labels are class indices, so each index is its own name; class names are numbered
    in sorted order (the training order is not stored in a checkpoint), and indices no label
    uses get ``class_<i>``.

    >>> label_dict_for([], 2, None)
    ({'0': 0, '1': 1}, None)
    >>> label_dict_for(["1", "0", "1"], 2, None)
    ({'0': 0, '1': 1}, None)
    >>> label_dict_for(["tumour", "normal"], 3, None)[0]
    {'normal': 0, 'tumour': 1, 'class_2': 2}
    """
    names = sorted(set(labels))
    if all(name.lstrip("-").isdigit() for name in names):
        bad = [n for n in names if not 0 <= int(n) < n_classes]
        if bad:
            raise ConfigError(
                f"--labels {source}: label {bad[0]} is not a class index 0..{n_classes - 1} "
                f"(the model has {n_classes} classes)"
            )
        return {str(i): i for i in range(n_classes)}, None
    if len(names) > n_classes:
        raise ConfigError(
            f"--labels {source}: {len(names)} distinct labels ({_few(names)}) but the model has "
            f"{n_classes} classes; fix the labels or pass --n-classes"
        )
    mapping = {name: i for i, name in enumerate(names)}
    taken = set(mapping)
    for i in range(len(names), n_classes):
        name = f"class_{i}"
        while name in taken:
            name += "_"
        mapping[name] = i
        taken.add(name)
    order = ", ".join(f"{k}: {v}" for k, v in mapping.items())
    warning = (
        f"label_dict guessed from {source} in sorted order {{{order}}}; if the model was trained "
        "with another order pass --set 'data_arguments.label_dict={...}'"
    )
    return mapping, warning


# --------------------------------------------------------------------------------------------
# building the config


def _absolute(path: Path) -> Path:
    return Path(path).expanduser().absolute()


def _sets_key(sets: Sequence[str], block: str, key: str) -> bool:
    """Whether a ``--set`` names ``block.key`` (then the flag-derived value is not used)."""
    return any(s.partition("=")[0].strip() == f"{block}.{key}" for s in sets)


def _unmatched_warnings(
    h5_only: Sequence[str], slides_only: Sequence[str], h5_dir: Path, slide_dir: Path, ext: str
) -> list[str]:
    """One line each for H5s without a slide and slides without an H5 (counts, a few names)."""
    lines = []
    if h5_only:
        lines.append(
            f"{len(h5_only)} H5 file(s) in {h5_dir} have no '*{ext}' slide in {slide_dir}, "
            f"skipped: {_few(h5_only)}"
        )
    if slides_only:
        lines.append(
            f"{len(slides_only)} slide(s) in {slide_dir} have no H5 in {h5_dir}, skipped: "
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


def _n_classes(ckpt: Path, given: int | None) -> int:
    """The checkpoint's class count; ``--n-classes`` fills in when it cannot be read."""
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
    from .config import config_from_dict

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
    embed_dim = _embed_dim(features[matched[0]], options.embed_dim)
    n_classes = _n_classes(ckpt, options.n_classes)

    labels: dict[str, str] = {}
    label_source = _absolute(options.labels) if options.labels is not None else None
    if label_source is not None:
        every = read_labels(label_source, slide_ext)
        labels = {sid: every[sid] for sid in matched if sid in every}
        unlabeled = [sid for sid in matched if sid not in labels]
        if unlabeled:
            warnings.append(
                f"{len(unlabeled)} slide(s) have no label in {label_source} (filed under "
                f"Unspecified): {_few(unlabeled)}"
            )
    label_dict, guess = label_dict_for(labels.values(), n_classes, label_source)
    if guess and not _sets_key(options.sets, "data_arguments", "label_dict"):
        warnings.append(guess)

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
        "heatmap_arguments": {"calc_heatmap": False},  # the fine pass needs encoder weights
        "runner_arguments": {
            "features_dir": str(h5_dir),
            "results_dir": str(out / "results"),
            "workers": options.workers,
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
    folder); without ``--labels`` existing labels are kept.
    """
    import pandas as pd

    from .process_list import build_process_list_from, load_preset, write_csv_atomic

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
            df["label"] = new
            write_csv_atomic(df, path)
    return path


def prepare_quick(options: QuickOptions) -> QuickPlan:
    """The library call behind ``clam-heat quick``: build the config, then write it and the list.

    ``OUT/config.yaml`` is written before anything runs, so ``clam-heat run OUT/config.yaml``
    repeats the run; an existing config for other inputs is replaced with a warning. The process
    list keeps its statuses across reruns, so rerunning the same command resumes.
    """
    plan = build_quick_config(options)
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
