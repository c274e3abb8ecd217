"""Reading the quick path's inputs: feature files, slides, the checkpoint's class count, labels.

Every problem is a :class:`~clam_heat.errors.ConfigError` (exit code 2) naming the flag and the
file. MIL-Lab's ``--csv`` selection and ``--limit`` live here too (:func:`select_slides`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import ClamHeatError, ConfigError, counted, message_line

#: How many names a warning or error quotes before "...".
_SHOWN = 3


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
        reason = message_line(err, "unreadable")
        raise ConfigError(
            f"{path}: not a readable HDF5 file ({reason}); re-extract it or remove it from --h5-dir"
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
    from ..models import checkpoint_n_classes, load_checkpoint_state

    if not ckpt.exists():
        raise ConfigError(
            f"--ckpt {ckpt}: no such file; pass your trained model's state dict "
            "(CLAM s_<fold>_checkpoint.pt, model.safetensors or a save_pretrained folder)"
        )
    try:
        state = load_checkpoint_state(ckpt)
    except ClamHeatError as err:
        raise ConfigError(f"--ckpt {err}") from None
    return checkpoint_n_classes(state)


def read_slide_table(
    path: Path, slide_ext: str, *, flag: str = "--labels", need_label: bool = True
) -> tuple[list[str], dict[str, str]]:
    """``(slide ids in file order, slide_id -> label)`` from a CSV with a ``slide_id`` column.

    ``--labels`` needs ``slide_id,label``; MIL-Lab's ``--csv`` needs only ``slide_id`` (its
    ``label`` column, when present, sets labels). Blank ids and blank labels are left out.
    """
    import pandas as pd

    from ..process_list import normalize_slide_id

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        first = message_line(err)
        raise ConfigError(f"{flag} {path}: cannot be read as CSV ({first})") from None
    wanted = ("slide_id", "label") if need_label else ("slide_id",)
    absent = [c for c in wanted if c not in table.columns]
    if absent:
        header = "slide_id,label" if need_label else "slide_id (and optionally label)"
        raise ConfigError(
            f"{flag} {path}: no {absent[0]!r} column; the file needs a header {header}"
        )
    has_label = "label" in table.columns
    ids: list[str] = []
    labels: dict[str, str] = {}
    for sid, label in zip(
        table["slide_id"], table["label"] if has_label else [""] * len(table), strict=True
    ):
        sid, label = normalize_slide_id(sid.strip(), slide_ext), label.strip()
        if sid and sid not in ids:
            ids.append(sid)
        if not sid or not label:
            continue
        if labels.get(sid, label) != label:
            raise ConfigError(
                f"{flag} {path}: slide {sid!r} has two labels ({labels[sid]!r}, {label!r}); "
                "keep one row per slide"
            )
        labels[sid] = label
    return ids, labels


def read_labels(path: Path, slide_ext: str) -> dict[str, str]:
    """``slide_id -> label`` from a ``slide_id,label`` CSV (blank labels are left out)."""
    return read_slide_table(path, slide_ext)[1]


def select_slides(
    matched: Sequence[str], wanted: Sequence[str] | None, limit: int | None, source: Path | None
) -> tuple[list[str], list[str]]:
    """MIL-Lab's selection: the matched slides listed in ``--csv`` (all when None), then the
    first ``--limit`` of them in sorted order; ``(selected, warnings)``.

    >>> select_slides(["a", "b", "c"], ["c", "a", "z"], None, Path("s.csv"))
    (['a', 'c'], ['1 slide listed in s.csv has no slide and H5 pair, skipped: z'])
    >>> select_slides(["b", "a", "c"], None, 2, None)
    (['a', 'b'], [])
    """
    warnings: list[str] = []
    chosen = sorted(matched)
    if wanted is not None:
        missing = sorted(set(wanted) - set(matched))
        if missing:
            warnings.append(
                f"{counted(len(missing), 'slide')} listed in {source} "
                f"{'has' if len(missing) == 1 else 'have'} no slide and H5 pair, "
                f"skipped: {_few(missing)}"
            )
        chosen = [sid for sid in chosen if sid in set(wanted)]
        if not chosen:
            raise ConfigError(
                f"--csv {source}: none of its {len(wanted)} slide_id(s) ({_few(wanted)}) has both "
                "a slide and an H5; check the ids and --slide-dir / --h5-dir"
            )
    if limit is not None:
        chosen = chosen[:limit]
    return chosen, warnings


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
