"""Checks made once, before any row is touched: the output roots and the global inputs.

A problem that every row would hit (an output folder under a regular file, a read-only or full
volume, a missing or wrong-architecture checkpoint, missing encoder weights) stops the run here
with exit code 2 and one line naming the folder, file or key and the fix, instead of failing
10,000 rows one by one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import (
    CheckpointError,
    ClamHeatError,
    OutputError,
    message_line,
    os_error_advice,
)

__all__ = [
    "GlobalInputError",
    "OutputRootError",
    "check_global_inputs",
    "check_output_roots",
    "preflight",
]

#: Bytes written (and synced) into each output root to prove it can take data, not only names.
PROBE_BYTES = 64 * 1024


class OutputRootError(OutputError):
    """An output root cannot be written: bad input found before any work (exit 2)."""

    exit_code = 2


class GlobalInputError(CheckpointError):
    """The checkpoint or the encoder weights are unusable for every row (exit 2)."""

    exit_code = 2


def output_folders(cfg: Any) -> list[tuple[str, Path]]:
    """(config key, folder) of every place a run writes, in the order they are checked."""
    exp = cfg.exp_arguments
    folders = [
        ("exp_arguments.raw_save_dir", Path(exp.raw_save_dir)),
        ("exp_arguments.production_save_dir", Path(exp.production_save_dir)),
        ("runner_arguments.results_dir", Path(cfg.results_csv_path).parent),
        ("the process list's folder", Path(cfg.process_list_path).parent),
    ]
    seen: set[Path] = set()
    unique = []
    for key, folder in folders:
        if folder not in seen:
            seen.add(folder)
            unique.append((key, folder))
    return unique


def _probe(folder: Path) -> None:
    """Create ``folder`` and write, sync and remove a small hidden file in it."""
    from .atomic import PROBE_NAME, temp_path_for

    folder.mkdir(parents=True, exist_ok=True)
    try:
        probe = temp_path_for(folder / PROBE_NAME, tag="probe")
    except OutputError as err:  # mkstemp's OSError, already explained
        raise _Explained(str(err)) from None
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * PROBE_BYTES)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        probe.unlink(missing_ok=True)


class _Explained(Exception):
    """An OutputError text from :mod:`clam_heat.atomic` (carried out of :func:`_probe`)."""


def check_output_roots(folders: Iterable[tuple[str, Path]]) -> None:
    """Each folder can be created and written (data, not only names), or one line, exit 2."""
    for key, folder in folders:
        try:
            _probe(folder)
        except OSError as err:
            raise OutputRootError(
                f"{key} {folder}: cannot write output here; {os_error_advice(folder, err)}"
            ) from None
        except _Explained as err:
            raise OutputRootError(f"{key} {folder}: cannot write output here; {err}") from None


def check_global_inputs(
    cfg: Any, stage_names: Iterable[str], *, in_process: bool = True, remember: Path | None = None
) -> None:
    """The checkpoint loads into the configured model with finite weights, and the encoder
    builds (weights found, readable, not pickled, of the width ``embed_dim`` expects) whenever
    a stage will encode patches: every row would fail the same way, so the run stops once.

    Both checks run in the model process when the run started one (torch stays out of the
    driver; the encoder it builds is the one the overlap stage then uses there).
    ``in_process``: the rows run in this process (then the encoder built is kept).
    ``remember`` names a small JSON file that records a checkpoint that passed (its identity
    and the model keys): while both stay the same the load is not repeated, so a rerun with
    nothing to do never imports torch.
    """
    from . import model_process

    names = set(stage_names)
    passed = None  # a checkpoint key to record once every check has passed
    if names & {"infer", "overlap", "heatmap", "sample"}:
        key = _checkpoint_key(cfg)
        if remember is None or _remembered(remember) != key:
            model_process.call(check_checkpoint, cfg)
            passed = key
    if needs_encoder(cfg, names):
        model_process.call(check_encoder, cfg, in_process)
    if remember is not None and passed is not None:  # a refused run writes nothing
        _remember(remember, passed)


def check_checkpoint(cfg: Any) -> None:
    """Load the checkpoint once on the CPU; refuse NaN/Inf weights naming the checkpoint, and
    a ``heatmap_arguments.method`` the model cannot give or per-class maps of a model with one
    map (checked here, once, not by a stage of each row: a row whose scores are already
    computed would otherwise draw ``attention`` from a model that has none)."""
    from .models import load_model

    args = cfg.model_arguments
    ckpt = Path(args.ckpt_path)
    try:
        model = load_model(
            ckpt,
            args.model_type,
            n_classes=cfg.exp_arguments.n_classes,
            embed_dim=args.embed_dim,
            model_size=args.model_size,
            device="cpu",
        )
    except ClamHeatError as err:
        raise GlobalInputError(f"model_arguments.ckpt_path: {err}") from None
    bad = nonfinite_weight(model.state_dict())
    if bad is not None:
        key, count = bad
        raise GlobalInputError(
            f"model_arguments.ckpt_path: {ckpt}: {count} NaN/Inf values in weight {key!r}; "
            "the training run diverged or the file is damaged: use an earlier checkpoint"
        )
    from .explain import check_methods
    from .stages.class_maps import ClassMapsStage, check_per_class

    try:  # e.g. attention asked of a model with no per-patch attention map: every row's problem
        check_methods(model, cfg.heatmap_arguments.methods())
        if ClassMapsStage().enabled(cfg):  # one attention map per class, asked of a model
            check_per_class(cfg)
    except ClamHeatError as err:
        raise GlobalInputError(message_line(err)) from None


def nonfinite_weight(state: Mapping[str, Any]) -> tuple[str, int] | None:
    """(first key, count) of a floating-point tensor holding NaN or Inf, or None.

    >>> import torch
    >>> nonfinite_weight({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])})
    ('b', 1)
    >>> nonfinite_weight({"a": torch.ones(2), "n": torch.tensor([3])}) is None
    True
    """
    import torch

    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            count = int((~torch.isfinite(value)).sum())
            if count:
                return key, count
    return None


def needs_encoder(cfg: Any, stage_names: Iterable[str]) -> bool:
    """Whether a stage of this run encodes patches: the overlap pass (``calc_heatmap``, on in
    CLAM's own template) or ``extract_features`` for rows without a feature H5."""
    names = set(stage_names)
    overlap = "overlap" in names and bool(cfg.heatmap_arguments.calc_heatmap)
    return overlap or ("infer" in names and _extracts_features(cfg))


def check_encoder(cfg: Any, in_process: bool = True) -> None:
    """Build the patch encoder once, as a row would; any failure is one line naming the weights.

    The encoder is built through the per-process cache of :mod:`clam_heat.stages.resources`,
    so rows run in this process (``in_process``) reuse it instead of loading the weights a
    second time; when workers run them, they build their own, so it is built on the CPU and
    dropped.
    """
    from .encoders import build_encoder, find_encoder_weights
    from .stages.resources import encoder_for

    enc = cfg.encoder_arguments
    key = "runner_arguments.encoder_weights"
    weights = find_encoder_weights(enc.model_name, cfg.runner_arguments.encoder_weights)
    if weights is not None and not weights.is_file():
        raise GlobalInputError(
            f"{key}: {weights}: no such file; download the {enc.model_name} weights there or "
            "fix the path"
        )
    if weights is not None and weights.stat().st_size == 0:
        raise GlobalInputError(f"{key}: {weights}: 0 bytes; re-copy it")
    try:
        if not in_process:  # workers build their own: check on the CPU here
            build_encoder(
                enc.model_name,
                target_img_size=enc.target_img_size,
                weights=cfg.runner_arguments.encoder_weights,
                device="cpu",
                dim=cfg.model_arguments.embed_dim,
            )
        else:
            encoder_for(cfg)
    except OSError as err:
        raise GlobalInputError(
            f"{key}: {weights}: cannot be read; {os_error_advice(weights or Path('.'), err)}"
        ) from None
    except ClamHeatError as err:
        text = message_line(err)
        named = any(block in text for block in ("_arguments.", "CKPT_PATH"))
        raise GlobalInputError(text if named else f"{key}: {text}") from None


#: Where a run records the checkpoint that loaded (in the raw root; see check_global_inputs).
CHECKPOINT_RECORD = ".checkpoint_checked.json"


def _checkpoint_key(cfg: Any) -> dict[str, Any]:
    """What the checkpoint check depends on: the file's identity, the model keys and what is
    asked of the model (methods, per-class maps: what it cannot give is refused there)."""
    from . import __version__
    from .ledger import file_identity

    args = cfg.model_arguments
    identity = file_identity(Path(args.ckpt_path))
    identity.pop("path", None)  # the content (or size + mtime) loads wherever the file lives
    return {
        "package_version": __version__,
        "checkpoint": identity,
        "model_type": args.model_type,
        "model_size": args.model_size,
        "embed_dim": args.embed_dim,
        "n_classes": cfg.exp_arguments.n_classes,
        "methods": list(cfg.heatmap_arguments.methods()),
        "classes": cfg.heatmap_arguments.classes,
    }


def _remembered(path: Path) -> Any:
    """The key recorded at ``path`` (None when absent or unreadable: the check runs)."""
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remember(path: Path, key: dict[str, Any]) -> None:
    """Record ``key`` (best effort: a record that cannot be written only costs a reload)."""
    import json

    from .atomic import write_text_atomic

    with contextlib.suppress(OSError, OutputError):
        write_text_atomic(path, json.dumps(key, sort_keys=True) + "\n", durable=False)


def _extracts_features(cfg: Any) -> bool:
    """Whether rows without a feature H5 are encoded from the slide (then weights are needed)."""
    return bool(getattr(cfg.runner_arguments, "extract_features", False))


def preflight(
    cfg: Any, stages: Iterable[Any], *, dry_run: bool = False, in_process: bool = True
) -> None:
    """Everything checked once before any row is touched (a dry run writes nothing, so it
    checks only the inputs). ``in_process``: the rows run in this process."""
    from .rows import output_roots

    remember = output_roots(cfg)[0] / CHECKPOINT_RECORD
    if not dry_run:
        check_output_roots(output_folders(cfg))
    names = [getattr(s, "name", str(s)) for s in stages]
    # a dry run writes nothing, so it checks the checkpoint without the record
    check_global_inputs(
        cfg, names, in_process=in_process, remember=remember if not dry_run else None
    )
