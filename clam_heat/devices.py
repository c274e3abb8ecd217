"""One rule for turning ``runner_arguments.device`` into a torch device (models and encoders)."""

from __future__ import annotations

import torch

from .errors import CheckpointError

__all__ = ["resolve_device"]


def resolve_device(
    device: str | torch.device, *, error: type[Exception] = CheckpointError
) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; a CUDA device on a CPU-only host raises
    ``error`` (the caller's error family: checkpoint or encoder loading).

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise error(
            f"runner_arguments.device is {str(device)!r} but no CUDA device is available "
            "(use device: auto or cpu)"
        )
    return resolved
