"""Value parsers, path resolution and shared rules used by the config blocks."""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    ValidationInfo,
)

from ..formats import IMAGE_FORMATS

CONFIG_SEARCH_DIRS: tuple[str, ...] = (".", "configs", "heatmaps/configs")
"""Folders (under the CWD) searched for a bare config name, in order."""

PROCESS_LIST_DIRS: tuple[str, ...] = ("process_lists", "heatmaps/process_lists")
"""Sub-folders searched for a bare process-list name (CLAM keeps lists in the second)."""

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_YAML12_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
#: ``save_ext`` values: the image formats the heatmap writers implement
SAVE_EXTS: tuple[str, ...] = tuple(IMAGE_FORMATS)


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


def _num(value: Any) -> str:
    """Print a bound the way users write it: ``1.0`` -> ``1``.

    >>> _num(1.0), _num(0.5), _num(-1)
    ('1', '0.5', '-1')
    """
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
