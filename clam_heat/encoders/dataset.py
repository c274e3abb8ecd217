"""Patch reading and encoding: level-0 coordinates -> an (N, D) feature matrix.

:class:`PatchDataset` reads patches (each DataLoader worker opens its own slide handle);
:func:`encode_patches` runs them through an :class:`~.build.Encoder` batch by batch.
Coordinates are level-0 (x, y) top-left corners (``coords_l0``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import FeatureError
from ..h5io import as_coords as _as_coords
from ..slide import Slide, open_slide
from .build import Encoder, _normalize
from .specs import IMAGENET_MEAN, IMAGENET_STD, EncoderError


def _resize(image: np.ndarray, size: int, resample: int) -> np.ndarray:
    """Square resize with PIL, the library CLAM's torchvision transforms use on PIL images."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), resample=resample))


class PatchDataset(Dataset):
    """Patches of one slide at level-0 ``coords_l0`` (N, 2) int64, for a DataLoader.

    Item i is patch i as a (3, S, S) tensor: uint8 RGB when ``normalize`` is False (the encoder
    normalises whole batches on its device, which moves 4x fewer bytes between processes), else
    float32 ``(x/255 - mean)/std`` (CLAM's ToTensor + Normalize). S = ``target_img_size`` if > 0,
    else ``patch_size``.

    Geometry: with ``custom_downsample`` cd == 1 the patch is ``patch_size`` px read at
    ``patch_level`` (CLAM). With cd > 1 the patch covers ``patch_size * downsample(patch_level) *
    cd`` level-0 px; it is read at the best level for that downsample and resized to
    ``patch_size`` (PIL bicubic, as CLAM). CLAM instead reads ``int(patch_size * ds * cd)`` px AT
    ``patch_level``, which covers ds times too much tissue when patch_level > 0
    (docs/rules/heatmaps.md#custom-downsample-level); at patch_level 0 the two agree. The
    resize to ``target_img_size`` is PIL bilinear, as torchvision's ``Resize`` does on PIL
    images.

    The slide is opened lazily in each process that reads (never shared across DataLoader
    workers); pickling drops the handle, so the dataset works with the spawn start method.
    """

    def __init__(
        self,
        slide_path: str | Path,
        coords_l0: np.ndarray,
        *,
        patch_level: int,
        patch_size: int,
        custom_downsample: float = 1,
        target_img_size: int = 224,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        normalize: bool = True,
    ) -> None:
        if patch_size < 1:
            raise FeatureError(f"patch_size must be >= 1, got {patch_size}")
        if custom_downsample < 1:
            raise FeatureError(f"custom_downsample must be >= 1, got {custom_downsample}")
        self.slide_path = Path(slide_path)
        self.coords_l0 = _as_coords(coords_l0)
        self.patch_level = int(patch_level)
        self.patch_size = int(patch_size)
        self.custom_downsample = float(custom_downsample)
        self.target_img_size = int(target_img_size)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.normalize = normalize
        self._slide: Slide | None = None
        self._pid: int | None = None
        with open_slide(self.slide_path) as slide:
            slide.check_level(self.patch_level)
            self.read_level, self.read_size = self._geometry(slide)

    def _geometry(self, slide: Slide) -> tuple[int, tuple[int, int]]:
        """(level to read, (w, h) level px to read) for one patch."""
        if self.custom_downsample == 1:
            return self.patch_level, (self.patch_size, self.patch_size)
        dx, dy = slide.level_downsamples[self.patch_level]
        l0_w = self.patch_size * dx * self.custom_downsample
        l0_h = self.patch_size * dy * self.custom_downsample
        level = slide.best_level_for_downsample(dx * self.custom_downsample)
        bx, by = slide.level_downsamples[level]
        return level, (max(1, round(l0_w / bx)), max(1, round(l0_h / by)))

    @property
    def out_size(self) -> int:
        """Side of the returned patches."""
        return self.target_img_size if self.target_img_size > 0 else self.patch_size

    def __len__(self) -> int:
        return int(self.coords_l0.shape[0])

    def _handle(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():
            self._slide = open_slide(self.slide_path)
            self._pid = os.getpid()
        return self._slide

    def image(self, index: int) -> np.ndarray:
        """Patch ``index`` as an (S, S, 3) uint8 RGB array, before normalisation."""
        from PIL import Image

        x, y = self.coords_l0[index]
        pixels = self._handle().read_region((int(x), int(y)), self.read_level, self.read_size)
        if self.read_size != (self.patch_size, self.patch_size):
            pixels = _resize(pixels, self.patch_size, Image.Resampling.BICUBIC)
        if self.target_img_size > 0 and self.target_img_size != self.patch_size:
            pixels = _resize(pixels, self.target_img_size, Image.Resampling.BILINEAR)
        return pixels

    def __getitem__(self, index: int) -> torch.Tensor:
        pixels = np.require(self.image(index), dtype=np.uint8, requirements=["C", "W"])
        tensor = torch.from_numpy(pixels).permute(2, 0, 1)
        if self.normalize:
            return _normalize(tensor.unsqueeze(0), self.mean, self.std)[0]
        return tensor.contiguous()

    def close(self) -> None:
        """Close this process's slide handle (reopened on the next read)."""
        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide, self._pid = None, None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_slide"], state["_pid"] = None, None
        return state


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    if amp and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


def encode_patches(
    slide_path: str | Path,
    coords_l0: np.ndarray,
    *,
    encoder: Encoder,
    patch_level: int,
    patch_size: int,
    custom_downsample: float = 1,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    amp: bool = False,
    mp_context: str | None = None,
    progress: Callable[[int], None] | None = None,
    head: Callable[[torch.Tensor], np.ndarray] | None = None,
) -> np.ndarray:
    """Encode the patches at ``coords_l0`` (N, 2) level-0 int64; returns (N, D) float32 features.

    Row i belongs to ``coords_l0[i]``. Batches run under ``torch.inference_mode`` (autocast on
    CUDA when ``amp``). ``num_workers`` > 0 reads patches in DataLoader worker processes, each with
    its own slide handle; results do not depend on the worker count. ``device`` None means the
    encoder's device. ``progress`` is called with the number of patches after each batch.

    ``head`` maps each batch's (B, D) float32 features (on the encoder's device) to (B,) values,
    and the result is then (N,) float32: CLAM's overlapping pass scores attention this way
    (:func:`~.overlap.overlap_scores`), so all features are never held at once.
    """
    coords = _as_coords(coords_l0)
    n = coords.shape[0]
    out = np.empty((n, encoder.dim) if head is None else (n,), dtype=np.float32)
    torch_device = encoder.device if device is None else torch.device(device)
    if torch_device != encoder.device:
        raise EncoderError(
            f"encoder is on {encoder.device} but device={str(torch_device)!r} was requested "
            "(build the encoder with the same device)"
        )
    if batch_size < 1 or num_workers < 0:
        raise EncoderError(
            f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}"
        )
    dataset = PatchDataset(
        slide_path,
        coords,
        patch_level=patch_level,
        patch_size=patch_size,
        custom_downsample=custom_downsample,
        target_img_size=encoder.target_img_size,
        mean=encoder.mean,
        std=encoder.std,
        normalize=False,
    )
    if len(dataset) == 0:
        return out
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch_device.type == "cuda",
        multiprocessing_context=mp_context if num_workers > 0 else None,
    )
    channels_last = bool(getattr(encoder.module, "prefers_channels_last", False))
    batches = iter(loader)
    start = 0
    try:
        for images in batches:
            with torch.inference_mode(), _autocast(torch_device, amp):
                x = encoder.normalize(images.to(torch_device, non_blocking=True))
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                feats = encoder.module(x).float()
            if feats.ndim != 2 or feats.shape[1] != encoder.dim:
                raise EncoderError(
                    f"encoder {encoder.name!r} returned shape {tuple(feats.shape)}, expected "
                    f"(B, {encoder.dim})"
                )
            rows = int(feats.shape[0])
            out[start : start + rows] = feats.cpu().numpy() if head is None else head(feats)
            start += rows
            if progress is not None:
                progress(rows)
    finally:
        del batches, loader
        dataset.close()
    return out
