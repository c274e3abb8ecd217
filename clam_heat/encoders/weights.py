"""Finding and reading encoder weights without a network: CLAM's environment variables, the
Hugging Face cache, ``.safetensors`` (read even without the ``safetensors`` package) and torch
state dicts (``weights_only=True``), loaded strictly with a one-line message on a mismatch.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .specs import _SPECS, _WEIGHT_FILES, _WEIGHTS_KEY, EncoderError, _Spec


def hf_cache_root() -> Path:
    """The Hugging Face hub cache folder, honouring ``HF_HUB_CACHE``, ``HF_HOME``, XDG."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _hf_snapshot_file(repo: str) -> tuple[Path | None, str]:
    """The cached weight file of ``repo`` (``refs/main`` snapshot first) and the glob looked at."""
    folder = hf_cache_root() / ("models--" + repo.replace("/", "--"))
    pattern = f"{folder}/snapshots/*/{{{','.join(_WEIGHT_FILES)}}}"
    snapshots: list[Path] = []
    ref = folder / "refs" / "main"
    if ref.is_file():
        snapshots.append(folder / "snapshots" / ref.read_text().strip())
    if (folder / "snapshots").is_dir():
        others = sorted(
            (p for p in (folder / "snapshots").iterdir() if p.is_dir()),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        snapshots += [p for p in others if p not in snapshots]
    for snapshot in snapshots:
        for name in _WEIGHT_FILES:
            if (snapshot / name).is_file():
                return snapshot / name, pattern
    return None, pattern


def _find_weights(name: str, spec: _Spec) -> tuple[Path | None, list[str]]:
    """Locate weights without a network: CLAM's env variable, then the Hugging Face cache."""
    looked: list[str] = [f"{_WEIGHTS_KEY} (not set)"]
    if spec.env_var:
        value = os.environ.get(spec.env_var)
        if value and Path(value).expanduser().is_file():
            return Path(value).expanduser(), looked
        looked.append(f"${spec.env_var} ({value or 'not set'})")
    if spec.hf_repo:
        found, pattern = _hf_snapshot_file(spec.hf_repo)
        if found is not None:
            return found, looked
        looked.append(pattern)
    return None, looked


def find_encoder_weights(model_name: str, weights: str | Path | None = None) -> Path | None:
    """The weights file :func:`build_encoder` would load, without building anything.

    Lets the runner fingerprint the encoder cheaply. ``None``: no file (``tiny_cnn`` without
    ``weights``, a package-managed encoder, or nothing found).
    """
    if weights is not None:
        return Path(weights).expanduser()
    spec = _SPECS.get(model_name)
    if spec is None or model_name in ("tiny_cnn", "conch_v1_5"):
        return None
    return _find_weights(model_name, spec)[0]


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Minimal reader of the safetensors layout (u64 header length, JSON header, raw bytes).

    Used only when the ``safetensors`` package is absent; it never executes code.
    """
    with open(path, "rb") as handle:
        (n_header,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(n_header))
        data = bytearray(handle.read())
    out: dict[str, torch.Tensor] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        flat = torch.frombuffer(
            data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin
        )
        out[key] = flat.reshape(info["shape"]).clone()
    return out


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``, on CPU).

    Unwraps ``{"state_dict": ...}``-style containers and a DataParallel ``module.`` prefix.
    Any failure is an :class:`EncoderError` naming the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise EncoderError(f"{path}: encoder weights file not found (fix {_WEIGHTS_KEY})")
    try:
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                obj: Any = _read_safetensors(path)
            else:
                obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # permission denied, I/O error: the caller words the fix for the OS error
    except Exception as err:  # noqa: BLE001 - every unreadable file gets the same one-line error
        raise EncoderError(f"{path}: encoder weights {_unreadable(path, err)}") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EncoderError(f"{path}: not a state dict of tensors")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _unreadable(path: Path, err: BaseException) -> str:
    """Why a weights file could not be read, with the fix (a pickle is named as one)."""
    from ..models.checkpoint import _unreadable_reason

    if path.suffix == ".safetensors":
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"cannot be read as safetensors ({first}); re-copy it or re-save it"
    return _unreadable_reason(err, path.stat().st_size)


def _adapt_state(name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the parts of a full timm checkpoint that CLAM's truncated/headless encoder lacks.

    A ``resnet50_trunc`` state dict of CLAM's wrapper module (every key under ``model.``, as the
    timm backend's module also has) is unwrapped to timm's names first.
    """
    if name == "resnet50_trunc":
        if state and all(k.startswith("model.") for k in state):
            state = {k.removeprefix("model."): v for k, v in state.items()}
        drop = ("layer4.", "fc.")
    elif name == "uni_v1":
        drop = ("head.", "fc_norm.")
    else:
        drop = ()
    return {k: v for k, v in state.items() if not k.startswith(drop)}


def _load_strict(
    module: nn.Module, state: Mapping[str, torch.Tensor], name: str, path: Path
) -> None:
    """``load_state_dict(strict=True)`` with a one-line message on any key or shape mismatch."""
    from ..models.checkpoint import state_dict_mismatch

    problem = state_dict_mismatch(module.state_dict(), state, own_label="")
    if problem:
        raise EncoderError(
            f"{path}: weights do not fit encoder {name!r} ({problem}); "
            f"check encoder_arguments.model_name and {_WEIGHTS_KEY}"
        )
    floats = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(floats, strict=True, assign=True)
