"""Reading checkpoints, normalising their keys, and the strict load with its likely cause.

:func:`load_model` is the same for every registered model: read the state dict (weights only),
let the model's :class:`~.registry.ModelSpec` normalise its keys and read hidden sizes from its
shapes, build, load strictly, and on a mismatch name what differs plus the likely cause (the
spec's own guess, e.g. CLAM's model_size / n_classes, or the generic one below).
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..devices import resolve_device
from ..errors import CheckpointError, message_line
from .registry import ModelChoice, ModelSpec, all_model_specs, get_model_spec, parse_model_type

__all__ = [
    "SAFETENSORS_NAME",
    "build_model",
    "checkpoint_n_classes",
    "detect_layout",
    "load_checkpoint_state",
    "load_model",
    "normalise_mil_lab_state_dict",
    "resolve_device",
    "state_dict_mismatch",
    "strip_prefix",
]

#: MIL-Lab heads whose first dimension is the class count (DSMIL's bag head is a 3-d Conv1d
#: weight of (C, C, D); its instance head is the plain one).
_MIL_LAB_HEADS = ("model.classifier.weight", "model.i_classifier.inst_classifier.weight")


def strip_prefix(key: str, prefix: str = "module.") -> str:
    """``key`` without any number of leading ``prefix`` (DataParallel's ``module.``).

    >>> strip_prefix("module.module.model.x")
    'model.x'
    """
    while key.startswith(prefix):
        key = key[len(prefix) :]
    return key


def normalise_mil_lab_state_dict(
    state: Mapping[str, torch.Tensor], prefix: str = "model."
) -> dict[str, torch.Tensor]:
    """Strip DataParallel ``module.`` prefixes (outside or inside ``model.``), add a missing
    ``model.`` prefix (a state dict saved from the inner network) and drop ``instance_loss_fn``.

    >>> sorted(normalise_mil_lab_state_dict({"module.model.classifier.weight": 1,
    ...     "patch_embed.0.weight": 2, "model.module.global_attn.attention_c.bias": 3}))
    ['model.classifier.weight', 'model.global_attn.attention_c.bias', 'model.patch_embed.0.weight']
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if "instance_loss_fn" in key:
            continue
        key = strip_prefix(key)
        if prefix:
            key = prefix + strip_prefix(key.removeprefix(prefix))
        out[key] = value
    return out


def _unreadable_reason(err: BaseException, size: int) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, as a clause with the fix."""
    first = message_line(err)
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in first:
        return (
            "cannot be read as a weights-only torch checkpoint: it holds pickled Python objects "
            "(a plain pickle or a whole pickled model), which are never unpickled here; save it "
            "with torch.save(model.state_dict(), path)"
        )
    if isinstance(err, EOFError) or "central directory" in first or "reading zip" in first:
        return f"{size} bytes, cut short (not a complete torch archive); re-copy it"
    return (
        f"cannot be read as a weights-only torch checkpoint ({first}); "
        "save it with torch.save(model.state_dict(), path)"
    )


#: The weights file of a MIL-Lab / Hugging Face ``save_pretrained`` folder.
SAFETENSORS_NAME = "model.safetensors"


def _read_safetensors(path: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file as a state dict (the format stores tensors only: no code runs)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path}: cannot be read as safetensors ({message_line(err)}); save it again with "
            "model.save_pretrained(folder) or safetensors.torch.save_file"
        ) from None


def _checkpoint_file(path: Path) -> Path:
    """The weights file behind ``path``: itself, or a ``save_pretrained`` folder's
    ``model.safetensors``."""
    if path.is_dir():
        weights = path / SAFETENSORS_NAME
        if not weights.is_file():
            raise CheckpointError(
                f"{path}: folder without {SAFETENSORS_NAME} (point model_arguments.ckpt_path "
                "at a MIL-Lab save_pretrained folder, a .safetensors file or a .pt state dict)"
            )
        return weights
    if not path.is_file():
        raise CheckpointError(
            f"{path}: checkpoint not found (set model_arguments.ckpt_path to your "
            "s_<fold>_checkpoint.pt, model.safetensors or save_pretrained folder)"
        )
    return path


def load_checkpoint_state(
    path: Path, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Read a state dict without executing code: torch files with ``weights_only=True``,
    ``.safetensors`` files and MIL-Lab ``save_pretrained`` folders (``config.json`` +
    ``model.safetensors``) with the ``safetensors`` package.

    Unwraps a top-level ``state_dict`` / ``model_state_dict`` / ``model`` / ``state_dict_ema`` /
    ``model_ema`` entry, as MIL-Lab's loader does.
    """
    path = _checkpoint_file(Path(path))
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(
            f"{path}: 0 bytes; re-copy it (an interrupted copy or download leaves an empty file)"
        )
    if path.suffix.lower() == ".safetensors":
        obj: Any = _read_safetensors(path, device)
    else:
        try:
            with warnings.catch_warnings():
                # torch warns about the pickle protocol of a plain pickle before refusing it;
                # our one-line error below says the same thing with the fix
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(path, map_location=device, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
            raise CheckpointError(f"{path}: {_unreadable_reason(err, size)}") from None
    for wrapper in ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors (save model.state_dict())")
    if not obj:
        raise CheckpointError(f"{path}: the state dict is empty (save model.state_dict())")
    return dict(obj)


def detect_layout(state: Mapping[str, torch.Tensor]) -> str | None:
    """Which registered model a checkpoint's keys look like, if recognisable."""
    norm = normalise_mil_lab_state_dict(state)
    return next((spec.name for spec in all_model_specs() if spec.looks_like(norm)), None)


def _mil_lab_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    """Class count from a MIL-Lab head, or None."""
    mil_lab = normalise_mil_lab_state_dict(state)
    for key in _MIL_LAB_HEADS:
        head = mil_lab.get(key)
        if head is not None and head.dim() >= 2:
            return int(head.shape[0])
    return None


def checkpoint_n_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    """Class count of a checkpoint, read from its classifier head; None when no head is known.

    Asks each registered model's reader in turn (CLAM single- and multi-branch with DataParallel
    ``module.`` or ``.module``, then MIL-Lab layouts), so flag-only runs need no ``--n-classes``.

    >>> import torch
    >>> checkpoint_n_classes({"module.classifiers.weight": torch.zeros(3, 256)})
    3
    >>> checkpoint_n_classes({"model.classifier.weight": torch.zeros(4, 512)})
    4
    >>> checkpoint_n_classes({"attention_net.0.weight": torch.zeros(8, 8)}) is None
    True
    """
    readers: list[Callable[[Mapping[str, torch.Tensor]], int | None]] = []
    for spec in all_model_specs():
        reader = spec.count_classes or _mil_lab_classes
        if reader not in readers:
            readers.append(reader)
    return next((n for n in (read(state) for read in readers) if n is not None), None)


def _guess_cause(state: Mapping[str, torch.Tensor], model: nn.Module, choice: ModelChoice) -> str:
    """Likely cause of a failed strict load of a MIL-Lab-layout model (wrong model, width,
    classes)."""
    kind = detect_layout(state)
    if kind is not None and kind != choice.name:
        label = get_model_spec(kind).checkpoint_label
        if label is not None:
            return f"this is a {label} checkpoint; set model_type: {kind}"
        return f"checkpoint looks like {kind}, not {choice.name}; set model_type: {kind}"
    spec = get_model_spec(choice.name)
    first = state.get(spec.input_key)
    if first is not None and first.dim() == 2 and first.shape[1] != choice.in_dim:
        source = f"encoder {choice.encoder!r}" if choice.encoder else "model_arguments.embed_dim"
        return f"checkpoint expects {first.shape[1]}-d features, {source} gives {choice.in_dim}"
    head = state.get("model.classifier.weight")
    n_classes = getattr(model, "n_classes", None)
    if head is None and not any(k.startswith("model.classifier") for k in state):
        return (
            "checkpoint has no classifier head (e.g. FEATHER pc108-24k pretrained weights); "
            "fine-tune a head and save model.state_dict()"
        )
    if head is not None and n_classes is not None and head.shape[0] != n_classes:
        return (
            f"checkpoint has {head.shape[0]} classes, config n_classes is {n_classes} "
            "(set exp_arguments.n_classes to match)"
        )
    if spec.layout != "mil-lab":
        return (
            f"{choice.name} uses clam-heat's own key layout (see clam_heat.models."
            f"{type(getattr(model, 'model', model)).__name__}); checkpoints from other "
            "implementations need converting"
        )
    return "check model_type, embed_dim and n_classes"


def _short(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def state_dict_mismatch(
    own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], *, own_label: str = "model "
) -> str | None:
    """What stops a strict load of ``state`` into a module whose state dict is ``own``, or None.

    One short clause list (missing keys, unexpected keys, the first shape mismatch), shared by
    checkpoint and encoder-weight loading so both report mismatches the same way.

    >>> a = {"w": torch.zeros(2), "x": torch.zeros(1)}
    >>> b = {"w": torch.zeros(3), "y": torch.zeros(1)}
    >>> state_dict_mismatch(a, b)
    'missing x; unexpected y; shape mismatch w (3,) vs model (2,)'
    """
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    parts = []
    if missing:
        parts.append(f"missing {_short(missing)}")
    if unexpected:
        parts.append(f"unexpected {_short(unexpected)}")
    if wrong_shape:
        k = wrong_shape[0]
        parts.append(
            f"shape mismatch {k} {tuple(state[k].shape)} vs {own_label}{tuple(own[k].shape)}"
        )
    return "; ".join(parts) or None


def _build(spec: ModelSpec, choice: ModelChoice, n_classes: int, **hparams: Any) -> nn.Module:
    model = spec.builder(in_dim=choice.in_dim, n_classes=n_classes, **hparams)
    if not isinstance(getattr(model, "model_type", None), str):
        model.model_type = spec.name  # how inference finds this model's reduction
    return model


def build_model(
    model_type: str,
    *,
    n_classes: int,
    embed_dim: int,
    model_size: str | None = "small",
    gate: bool = True,
    **hparams: Any,
) -> nn.Module:
    """Instantiate a model without weights (CLAM's ``initiate_model`` minus the checkpoint).

    ``model_size`` and ``gate`` reach the models that take them from the config (CLAM; MIL-Lab
    ``clam`` takes ``gate``, ``width`` and ``hidden``); other models take their class's keyword
    arguments as ``hparams`` (e.g. ``hidden_dim`` for ABMIL).
    """
    choice = parse_model_type(model_type, embed_dim=embed_dim)
    spec = get_model_spec(choice.name)
    config = {"model_size": model_size, "gate": gate}
    options = {k: config[k] for k in spec.config_keys}
    return _build(spec, choice, n_classes, **{**options, **hparams})


def load_model(
    ckpt_path: Path,
    model_type: str,
    *,
    n_classes: int,
    embed_dim: int,
    model_size: str | None = "small",
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Build the configured model, load the checkpoint strictly, move it to ``device``, eval().

    A mismatch raises :class:`CheckpointError` listing missing/unexpected keys and the likely
    cause (wrong model_type, model_size, embed_dim or n_classes).
    """
    ckpt_path = Path(ckpt_path)
    if isinstance(device, str):
        device = resolve_device(device)
    choice = parse_model_type(model_type, embed_dim=embed_dim)
    spec = get_model_spec(choice.name)
    raw = load_checkpoint_state(ckpt_path, device)
    if spec.prepare_state is not None:
        state = spec.prepare_state(raw)
    else:
        state = normalise_mil_lab_state_dict(raw, spec.key_prefix)
    guess = spec.guess_cause or _guess_cause
    options = {k: v for k, v in {"model_size": model_size}.items() if k in spec.config_keys}
    hparams = {**options, **(spec.infer_hparams(state) if spec.infer_hparams else {})}
    try:
        model = _build(spec, choice, n_classes, **hparams)
    except (ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{ckpt_path}: cannot build {model_type} with sizes read from the checkpoint "
            f"{hparams} ({err}); likely cause: {guess(state, nn.Module(), choice)}"
        ) from None
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise CheckpointError(
            f"{ckpt_path}: does not fit {model_type} ({problem}); likely cause: "
            f"{guess(state, model, choice)}"
        )
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
