"""Patch encoders and the slide -> features -> attention path of CLAM's heatmap script.

CLAM's ``create_heatmaps.py`` re-reads pixels from the slide and encodes them twice (spec §8):
the non-overlapping grid gives the bag (``<id>.h5``), the overlapping grid gives per-patch
attention for the fine heatmap (``<id>_<overlap>_roi_<use_roi>.h5``). This module holds both
halves:

* :func:`build_encoder` builds CLAM's encoders. ``resnet50_trunc`` and ``uni_v1`` come from
  ``timm.create_model`` exactly as CLAM calls it when ``timm`` imports (a user with a working
  torchvision), otherwise from the built-in plain-torch networks below, which use **timm's
  state-dict key names** and are verified against timm's own outputs (``tests/data/timm``).
  timm is not a hard dependency because it needs torchvision, whose wheels are tied to one torch
  build (a CPU torch cannot import the CUDA torchvision wheel). Either way the weights a user
  already has (timm's ``resnet50.tv_in1k``, UNI's ``pytorch_model.bin``) load strictly, and they
  are never downloaded: they come from ``runner_arguments.encoder_weights``, CLAM's environment
  variables or the Hugging Face cache.
* :class:`PatchDataset` reads patches (each DataLoader worker opens its own slide handle) and
  :func:`encode_patches` turns level-0 coordinates into an (N, D) feature matrix.
* :func:`attention_logits` and :func:`overlap_scores` give CLAM's raw per-patch attention
  (``attention_only=True``), optionally as percentiles of the blockmap's scores
  (``use_ref_scores``), scored batch by batch so the overlapping pass never holds all features.
* :func:`write_features_h5` / :func:`write_scores_h5` write CLAM's HDF5 layouts atomically.

Coordinates are level-0 (x, y) top-left corners (``coords_l0``), as in every CLAM/TRIDENT file.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import CheckpointError, ClamHeatError, FeatureError
from .slide import Slide, open_slide

log = logging.getLogger(__name__)

__all__ = [
    "ENCODER_BACKENDS",
    "ENCODER_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "Encoder",
    "EncoderError",
    "PatchDataset",
    "ResNet50Trunk",
    "TinyCNN",
    "VisionTransformer",
    "attention_logits",
    "build_encoder",
    "encoder_backend",
    "encode_patches",
    "find_encoder_weights",
    "hf_cache_root",
    "load_weights_file",
    "overlap_h5_name",
    "overlap_scores",
    "resample_abs_pos_embed",
    "write_features_h5",
    "write_scores_h5",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: CLAM's ``get_encoder`` names plus ``tiny_cnn``, a seeded random test/demo encoder.
ENCODER_NAMES: tuple[str, ...] = ("resnet50_trunc", "uni_v1", "conch_v1", "conch_v1_5", "tiny_cnn")

#: Seed of every randomly initialised encoder, so random features are reproducible.
RANDOM_INIT_SEED = 0

_WEIGHTS_KEY = "runner_arguments.encoder_weights"


class EncoderError(ClamHeatError):
    """An encoder cannot be built: unknown name, missing package, missing or mismatched weights."""


# ---------------------------------------------------------------------------------------------
# Networks (timm state-dict layouts)
# ---------------------------------------------------------------------------------------------


class _Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), timm/torchvision key names."""

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = width * 4
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + shortcut)


class ResNet50Trunk(nn.Module):
    """ResNet v1.5 cut after its third stage + global average pool: CLAM's ``resnet50_trunc``.

    CLAM builds timm ``resnet50.tv_in1k`` with ``features_only=True, out_indices=(3,)`` (the
    ``layer3`` map, 1024 channels at stride 16) and applies ``AdaptiveAvgPool2d(1)``. The defaults
    are that network; ``layers``/``channels`` (blocks and bottleneck widths per kept stage) give
    smaller ones of the same design, which is how it is checked against timm cheaply. The stem is
    timm's plain one (7x7 conv, 64 channels, 3x3 max-pool). Keys: ``conv1``, ``bn1``,
    ``layer<s>.<i>.{conv,bn}{1,2,3}`` and ``layer<s>.0.downsample.{0,1}``. Random init follows
    timm (Kaiming fan-out convs, last BN of each block zeroed). Input (B, 3, H, W) float32
    normalised; output (B, ``4 * channels[-1]``).
    """

    #: Convolutions run ~1.7x faster on CPU in NHWC layout (state-dict keys are unaffected).
    prefers_channels_last = True

    def __init__(
        self,
        *,
        layers: tuple[int, ...] = (3, 4, 6),
        channels: tuple[int, ...] = (64, 128, 256),
    ) -> None:
        super().__init__()
        if not layers or len(layers) != len(channels) or min(layers) < 1 or min(channels) < 1:
            raise ValueError(
                f"layers and channels must be equally long and positive, got {layers}, {channels}"
            )
        self.dim = channels[-1] * 4
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.stages: list[str] = []
        in_ch = 64
        for index, (blocks, width) in enumerate(zip(layers, channels, strict=True)):
            stride = 1 if index == 0 else 2
            stage = []
            for b in range(blocks):
                stage.append(_Bottleneck(in_ch, width, stride if b == 0 else 1))
                in_ch = width * 4
            self.stages.append(f"layer{index + 1}")
            setattr(self, self.stages[-1], nn.Sequential(*stage))
        self.pool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, _Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last kept stage's map (B, 4 * channels[-1], H/16, W/16 for three stages)."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for name in self.stages:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.forward_features(x)), 1)


def resample_abs_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int], n_prefix: int = 1
) -> torch.Tensor:
    """Resize a ViT's absolute position embeddings to another patch grid (timm's rule).

    ``pos_embed`` (1, n_prefix + gh*gw, C): prefix tokens (the class token) are kept, the grid part
    is resized with bicubic, antialiased interpolation in float32. A square grid of the same size
    is returned unchanged, as timm does.

    >>> pe = torch.ones(1, 1 + 4, 3)
    >>> resample_abs_pos_embed(pe, (3, 3), (2, 2)).shape
    torch.Size([1, 10, 3])
    >>> bool(torch.allclose(resample_abs_pos_embed(pe, (3, 3), (2, 2)), torch.ones(1, 10, 3)))
    True
    """
    n_new = new_grid[0] * new_grid[1] + n_prefix
    if n_new == pos_embed.shape[1] and new_grid[0] == new_grid[1]:
        return pos_embed
    prefix, grid = pos_embed[:, :n_prefix], pos_embed[:, n_prefix:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, init_values: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads)
        self.ls1 = _LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = _LayerScale(dim, init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """Pre-norm ViT with layer scale and a class token; timm ``VisionTransformer`` key names.

    Matches timm's ``vit_large_patch16_224`` created with ``init_values=1e-5, num_classes=0,
    dynamic_img_size=True`` (UNI's recipe): keys ``cls_token``, ``pos_embed``,
    ``patch_embed.proj``, ``blocks.<i>.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,
    ls2.gamma}`` and ``norm``; no head. Any input size works: position embeddings are resampled
    to the patch grid. Input (B, 3, H, W) float32 normalised; output (B, embed_dim), the
    final-norm class token.
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        init_values: float = 1e-5,
    ) -> None:
        super().__init__()
        self.dim = embed_dim
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.patch_embed = _PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        self.blocks = nn.Sequential(
            *(_Block(embed_dim, num_heads, mlp_ratio, init_values) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x)
        grid = (int(x.shape[2]), int(x.shape[3]))
        x = x.flatten(2).transpose(1, 2)
        pos = resample_abs_pos_embed(self.pos_embed, grid, self.grid, n_prefix=1)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        x = self.norm(self.blocks(x))
        return x[:, 0]


class TinyCNN(nn.Module):
    """A small random conv net (test/demo encoder, NOT a pathology model): 3 strided convs + pool.

    Seeded random init, so its features are reproducible; output (B, dim) float32.
    """

    prefers_channels_last = True

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.dim = dim
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, dim, 3, stride=2, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _ConchImageTower(nn.Module):
    """CONCH v1 image features as CLAM takes them: ``encode_image(proj_contrast=False,
    normalize=False)`` (512-d)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x, proj_contrast=False, normalize=False)


class _TimmTrunk(nn.Module):
    """CLAM's wrapper around a timm ``features_only`` CNN: the single feature map, average-pooled.

    ``model`` returns a one-element list (``out_indices=(3,)``); the output is (B, C). Weights
    are loaded into ``model`` (timm's key names), so its keys here carry a ``model.`` prefix, as
    in CLAM's module.
    """

    prefers_channels_last = True

    def __init__(self, model: nn.Module, dim: int) -> None:
        super().__init__()
        self.model = model
        self.dim = dim
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, list | tuple):
            if len(out) != 1:
                raise EncoderError(f"timm feature model returned {len(out)} maps, expected 1")
            out = out[0]
        return torch.flatten(self.pool(out), 1)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hf_repo: str | None  # Hugging Face cache folder models--<org>--<name>
    env_var: str | None  # CLAM's environment variable for a local file
    hint: str  # how to get the weights


_SPECS: dict[str, _Spec] = {
    "resnet50_trunc": _Spec(
        dim=1024,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        hf_repo="timm/resnet50.tv_in1k",
        env_var=None,
        hint="run `huggingface-cli download timm/resnet50.tv_in1k` once on a machine with internet",
    ),
    "uni_v1": _Spec(
        dim=1024,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        hf_repo="MahmoodLab/UNI",
        env_var="UNI_CKPT_PATH",
        hint="request access to MahmoodLab/UNI on Hugging Face, download pytorch_model.bin",
    ),
    "conch_v1": _Spec(
        dim=512,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        hf_repo="MahmoodLab/CONCH",
        env_var="CONCH_CKPT_PATH",
        hint="request access to MahmoodLab/CONCH on Hugging Face, download pytorch_model.bin",
    ),
    "conch_v1_5": _Spec(
        dim=768,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        hf_repo="MahmoodLab/TITAN",
        env_var=None,
        hint="request access to MahmoodLab/TITAN on Hugging Face and download it into the cache",
    ),
    "tiny_cnn": _Spec(
        dim=64, mean=IMAGENET_MEAN, std=IMAGENET_STD, hf_repo=None, env_var=None, hint=""
    ),
}

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


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
    except Exception as err:  # noqa: BLE001 - every unreadable file gets the same one-line error
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise EncoderError(
            f"{path}: cannot be read as encoder weights ({first}); provide a .safetensors file or "
            "a torch state dict saved with torch.save(model.state_dict(), path)"
        ) from None
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
    from .models import state_dict_mismatch

    problem = state_dict_mismatch(module.state_dict(), state, own_label="")
    if problem:
        raise EncoderError(
            f"{path}: weights do not fit encoder {name!r} ({problem}); "
            f"check encoder_arguments.model_name and {_WEIGHTS_KEY}"
        )
    floats = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(floats, strict=True, assign=True)


# ---------------------------------------------------------------------------------------------
# build_encoder
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoder:
    """A ready patch encoder: ``module`` is in eval mode, frozen and on its device.

    ``module`` maps (B, 3, H, W) float32 images normalised with ``mean``/``std`` to (B, ``dim``)
    features. ``target_img_size`` > 0: patches are resized to that square size first (CLAM's
    ``Resize``). ``weights`` says where the weights came from (a path, ``"random"`` or
    ``"seeded-random"``) and ``backend`` which implementation built it (:func:`encoder_backend`),
    both for fingerprints.
    """

    module: nn.Module
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    target_img_size: int
    name: str
    weights: str = "random"
    backend: str = "builtin"

    @property
    def device(self) -> torch.device:
        first = next(self.module.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 RGB -> float32 ``(x / 255 - mean) / std`` (ToTensor + Normalize)."""
        return _normalize(images, self.mean, self.std)

    def fingerprint(self) -> dict[str, Any]:
        """What determines the features (for the runner's ledger)."""
        return {
            "name": self.name,
            "dim": self.dim,
            "target_img_size": self.target_img_size,
            "weights": self.weights,
            "backend": self.backend,
        }


def _normalize(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return (images.to(torch.float32) / 255.0 - m) / s


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(
            f"encoder device {str(device)!r} requested but no CUDA device is available "
            "(set runner_arguments.device to auto or cpu)"
        )
    return device


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with a fixed torch seed without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


#: ``build_encoder(backend=...)``: ``auto`` = timm when it imports, else ``builtin``.
ENCODER_BACKENDS: tuple[str, ...] = ("auto", "timm", "builtin")

#: Encoders that CLAM builds with timm (the others never use timm).
_TIMM_ENCODERS = ("resnet50_trunc", "uni_v1")


@functools.lru_cache(maxsize=1)
def _import_timm() -> tuple[Any | None, str]:
    """(the ``timm`` module, "") or (None, why it does not import), tried once per process.

    Any exception counts, not only ImportError: a torchvision wheel built for another torch
    fails inside ``import timm`` with a RuntimeError ("operator torchvision::nms does not exist").
    """
    try:
        import timm
    except Exception as err:  # noqa: BLE001 - any failure means "use the built-in networks"
        first = (str(err).strip().splitlines() or [""])[0]
        return None, f"{type(err).__name__}: {first}" if first else type(err).__name__
    return timm, ""


def encoder_backend(model_name: str, backend: str = "auto") -> str:
    """Which implementation :func:`build_encoder` uses for ``model_name``, for fingerprints.

    ``"timm==<version>"`` when timm builds it, ``"builtin"`` for our timm-layout networks (and
    ``tiny_cnn``), ``"package"`` for the CONCH encoders (their own packages). Raises
    :class:`EncoderError` when ``backend`` is ``"timm"`` and timm does not import.
    """
    if backend not in ENCODER_BACKENDS:
        raise EncoderError(
            f"encoder backend must be one of {', '.join(ENCODER_BACKENDS)}, got {backend!r}"
        )
    if model_name in ("conch_v1", "conch_v1_5"):
        return "package"
    if model_name not in _TIMM_ENCODERS or backend == "builtin":
        return "builtin"
    timm, why = _import_timm()
    if timm is None:
        if backend == "timm":
            raise EncoderError(
                f"encoder {model_name!r}: backend 'timm' requested but timm does not import "
                f"({why}); install timm with a torchvision that matches your torch, or use "
                "backend 'auto'"
            )
        return "builtin"
    return f"timm=={timm.__version__}"


def _timm_network(name: str) -> nn.Module:
    """CLAM's ``timm.create_model`` call for ``name`` (never pretrained: weights load later)."""
    timm, _ = _import_timm()
    if name == "resnet50_trunc":
        return timm.create_model(
            "resnet50.tv_in1k",
            features_only=True,
            out_indices=(3,),
            pretrained=False,
            num_classes=0,
        )
    return timm.create_model(
        "vit_large_patch16_224", init_values=1e-5, num_classes=0, dynamic_img_size=True
    )


def _builtin_network(name: str, dim: int) -> nn.Module:
    if name == "resnet50_trunc":
        return ResNet50Trunk()
    if name == "uni_v1":
        return VisionTransformer()
    return TinyCNN(dim)


def _build_conch(name: str, weights: Path | None, device: torch.device) -> tuple[nn.Module, str]:
    spec = _SPECS[name]
    if name == "conch_v1":
        try:
            from conch.open_clip_custom import create_model_from_pretrained
        except ImportError:
            raise EncoderError(
                "encoder 'conch_v1' needs the CONCH package: pip install "
                "git+https://github.com/Mahmoodlab/CONCH.git (then set "
                f"{_WEIGHTS_KEY} or CONCH_CKPT_PATH to its pytorch_model.bin)"
            ) from None
        path = Path(weights).expanduser() if weights is not None else _find_weights(name, spec)[0]
        if path is None or not path.is_file():
            looked = _find_weights(name, spec)[1] if weights is None else [str(weights)]
            raise EncoderError(
                f"encoder 'conch_v1': no weights found (looked at {', '.join(looked)}); "
                f"{spec.hint} and set {_WEIGHTS_KEY} to it"
            )
        model, _ = create_model_from_pretrained("conch_ViT-B-16", checkpoint_path=str(path))
        return _ConchImageTower(model).to(device), str(path)
    try:
        from transformers import AutoModel
    except ImportError:
        raise EncoderError(
            "encoder 'conch_v1_5' needs Hugging Face transformers: pip install transformers "
            "(and the gated MahmoodLab/TITAN weights in the Hugging Face cache)"
        ) from None
    source = str(weights) if weights is not None else "MahmoodLab/TITAN"
    try:
        titan = AutoModel.from_pretrained(source, trust_remote_code=True, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any hub/cache failure gets one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise EncoderError(
            f"encoder 'conch_v1_5': cannot load {source} from the local cache ({first}); "
            f"{spec.hint} or set {_WEIGHTS_KEY} to its folder"
        ) from None
    module, _ = titan.return_conch()
    return module.to(device), source


def build_encoder(
    model_name: str,
    *,
    target_img_size: int = 224,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    allow_random: bool = False,
    dim: int | None = None,
    backend: Literal["auto", "timm", "builtin"] = "auto",
) -> Encoder:
    """Build one of CLAM's patch encoders (``encoder_arguments.model_name``) without downloading.

    Weights: ``weights`` (``runner_arguments.encoder_weights``) if given, else CLAM's environment
    variable (``UNI_CKPT_PATH``, ``CONCH_CKPT_PATH``), else the Hugging Face cache
    (``models--timm--resnet50.tv_in1k``, ``models--MahmoodLab--UNI``). If none is found the call
    fails with :class:`EncoderError` naming every place looked at, unless ``allow_random`` (tests,
    benchmarks). ``tiny_cnn`` is a seeded random test encoder whose width is ``dim`` (default 64).
    For the other encoders ``dim``, if given, is the width the MIL model expects
    (``model_arguments.embed_dim``) and a mismatch is refused here rather than as a matmul error.

    ``backend`` (``resnet50_trunc``, ``uni_v1``): ``auto`` builds with ``timm.create_model`` as
    CLAM does when timm imports, else with the built-in timm-layout network; ``timm`` or
    ``builtin`` force one. Weights load the same way (strictly) either way; the choice is logged
    and recorded in ``Encoder.backend`` and its fingerprint.
    """
    if model_name not in _SPECS:
        close = difflib.get_close_matches(str(model_name), ENCODER_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise EncoderError(
            f"encoder_arguments.model_name {model_name!r} is not a known encoder{hint}; "
            f"choose one of {', '.join(ENCODER_NAMES)}"
        )
    spec = _SPECS[model_name]
    out_dim = spec.dim
    if model_name == "tiny_cnn":
        out_dim = 64 if dim is None else int(dim)
        if out_dim < 1:
            raise EncoderError(f"tiny_cnn width must be >= 1, got {dim}")
    elif dim is not None and dim != spec.dim:
        raise EncoderError(
            f"encoder {model_name!r} produces {spec.dim}-d features but "
            f"model_arguments.embed_dim is {dim}; use the encoder the checkpoint was trained on"
        )
    if model_name == "conch_v1_5" and target_img_size != 448:
        raise EncoderError(
            "encoder 'conch_v1_5' needs encoder_arguments.target_img_size 448, "
            f"got {target_img_size}"
        )
    used = encoder_backend(model_name, backend)
    if model_name in _TIMM_ENCODERS:
        why = _import_timm()[1] if backend == "auto" and used == "builtin" else ""
        log.info(
            "encoder %s: %s%s",
            model_name,
            "timm.create_model (" + used + ")" if used != "builtin" else "built-in network",
            f" (timm unavailable: {why})" if why else "",
        )
    torch_device = _resolve_device(device)

    if model_name in ("conch_v1", "conch_v1_5"):
        module, source = _build_conch(
            model_name, None if weights is None else Path(weights), torch_device
        )
    else:
        path: Path | None = Path(weights).expanduser() if weights is not None else None
        looked: list[str] = []
        if path is None and model_name != "tiny_cnn":
            path, looked = _find_weights(model_name, spec)
        if path is None and model_name != "tiny_cnn" and not allow_random:
            raise EncoderError(
                f"encoder {model_name!r}: no weights found (looked at {'; '.join(looked)}); "
                f"{spec.hint} and set {_WEIGHTS_KEY} to the weights file (no downloads are made)"
            )
        state = None if path is None else _adapt_state(model_name, load_weights_file(path))
        # Weights to load: build on "meta" (no random init of ViT-L's 300M values) and assign
        # them. Random: seeded init on the CPU, the same values whatever the target device.
        meta = state is not None or torch_device.type == "meta"
        with _seeded(RANDOM_INIT_SEED), torch.device("meta" if meta else "cpu"):
            if used == "builtin":
                module = _builtin_network(model_name, out_dim)
            else:
                module = _timm_network(model_name)
        source = "seeded-random" if model_name == "tiny_cnn" else "random"
        if state is not None and path is not None:
            _load_strict(module, state, model_name, path)
            source = str(path)
        if used != "builtin" and model_name == "resnet50_trunc":
            module = _TimmTrunk(module, out_dim)
        module = module.to(torch_device)
    module.eval().requires_grad_(False)
    if getattr(module, "prefers_channels_last", False):
        module = module.to(memory_format=torch.channels_last)
    return Encoder(
        module=module,
        dim=out_dim,
        mean=spec.mean,
        std=spec.std,
        target_img_size=int(target_img_size),
        name=model_name,
        weights=source,
        backend=used,
    )


# ---------------------------------------------------------------------------------------------
# Patch reading
# ---------------------------------------------------------------------------------------------


def _as_coords(coords_l0: np.ndarray) -> np.ndarray:
    coords = np.asarray(coords_l0)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise FeatureError(f"coords must have shape (N, 2) (level-0 x, y), got {coords.shape}")
    if (
        coords.size
        and not np.issubdtype(coords.dtype, np.integer)
        and not (np.all(np.isfinite(coords)) and np.all(coords == np.round(coords)))
    ):
        raise FeatureError("coords must be whole level-0 pixel positions")
    return np.ascontiguousarray(coords, dtype=np.int64)


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
    ``patch_level``, which covers ds times too much tissue when patch_level > 0 (spec §10.15);
    at patch_level 0 the two agree. The resize to ``target_img_size`` is PIL bilinear, as
    torchvision's ``Resize`` does on PIL images.

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


# ---------------------------------------------------------------------------------------------
# Encoding and attention
# ---------------------------------------------------------------------------------------------


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    if amp and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


def _feature_batches(
    slide_path: str | Path,
    coords_l0: np.ndarray,
    *,
    encoder: Encoder,
    patch_level: int,
    patch_size: int,
    custom_downsample: float,
    batch_size: int,
    num_workers: int,
    device: str | torch.device | None,
    amp: bool,
    mp_context: str | None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first row, (B, D) float32 features on the encoder's device), in coords order."""
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
        coords_l0,
        patch_level=patch_level,
        patch_size=patch_size,
        custom_downsample=custom_downsample,
        target_img_size=encoder.target_img_size,
        mean=encoder.mean,
        std=encoder.std,
        normalize=False,
    )
    if len(dataset) == 0:
        return
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
            yield start, feats
            start += int(images.shape[0])
    finally:
        del batches, loader
        dataset.close()


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
) -> np.ndarray:
    """Encode the patches at ``coords_l0`` (N, 2) level-0 int64; returns (N, D) float32 features.

    Row i belongs to ``coords_l0[i]``. Batches run under ``torch.inference_mode`` (autocast on
    CUDA when ``amp``). ``num_workers`` > 0 reads patches in DataLoader worker processes, each with
    its own slide handle; results do not depend on the worker count. ``device`` None means the
    encoder's device. ``progress`` is called with the number of patches after each batch.
    """
    coords = _as_coords(coords_l0)
    out = np.empty((coords.shape[0], encoder.dim), dtype=np.float32)
    for start, feats in _feature_batches(
        slide_path,
        coords,
        encoder=encoder,
        patch_level=patch_level,
        patch_size=patch_size,
        custom_downsample=custom_downsample,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        amp=amp,
        mp_context=mp_context,
    ):
        out[start : start + feats.shape[0]] = feats.cpu().numpy()
        if progress is not None:
            progress(int(feats.shape[0]))
    return out


def attention_logits(
    model: nn.Module, features: np.ndarray | torch.Tensor, *, branch: int | None
) -> np.ndarray:
    """Raw per-patch attention (N,) float32 of a CLAM model, no softmax (``attention_only``).

    ``features`` (N, E). The model returns (K, N); K == 1 (CLAM_SB) gives row 0, K > 1 (CLAM_MB)
    needs ``branch`` (the predicted class, as CLAM draws ``A[Y_hat]``). A patch's logit does not
    depend on the other patches, so batches can be scored separately.
    """
    first = next(model.parameters(), None)
    model_device = first.device if first is not None else torch.device("cpu")
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    if features.ndim != 2:
        raise FeatureError(f"features must be 2-D (N, E), got shape {tuple(features.shape)}")
    embed_dim = getattr(model, "embed_dim", None)
    if embed_dim is not None and features.shape[1] != embed_dim:
        raise FeatureError(
            f"feature width {features.shape[1]} does not match model_arguments.embed_dim "
            f"{embed_dim} (the encoder differs from the one the checkpoint was trained on)"
        )
    with torch.inference_mode():
        h = features.to(model_device, dtype=torch.float32)
        try:
            raw = model(h, attention_only=True)
        except TypeError:
            raise CheckpointError(
                f"{type(model).__name__} has no per-patch attention (attention_only); "
                "overlap heatmaps need a CLAM model (model_type clam_sb or clam_mb)"
            ) from None
        raw = raw.reshape(-1, h.shape[0])
        if raw.shape[0] == 1:
            row = raw[0]
        elif branch is None or not 0 <= branch < raw.shape[0]:
            raise CheckpointError(
                f"model has {raw.shape[0]} attention branches; branch must be the predicted "
                f"class in 0..{raw.shape[0] - 1}, got {branch}"
            )
        else:
            row = raw[branch]
        return row.float().cpu().numpy().astype(np.float32)


def _percentile_of_scores(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """SciPy ``percentileofscore(reference, s, kind='rank')`` for every s, vectorised (float64).

    >>> _percentile_of_scores(np.array([0.5, 0.2, 1.0, 0.0]), np.array([0.1, 0.5, 0.5, 0.9]))
    array([ 62.5,  25. , 100. ,   0. ])
    """
    ref = np.sort(np.asarray(reference, dtype=np.float64).reshape(-1))
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    below = np.searchsorted(ref, s, side="left")
    at_or_below = np.searchsorted(ref, s, side="right")
    return (below + at_or_below + (at_or_below > below)) * 50.0 / ref.size


def _percentiles_vs_reference(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Use the heatmap module's implementation when it exists (one definition project-wide)."""
    try:
        from .heatmap import percentile_of_scores
    except ImportError:
        return _percentile_of_scores(scores, reference)
    return np.asarray(percentile_of_scores(scores, reference))


def overlap_scores(
    slide_path: str | Path,
    coords_l0: np.ndarray,
    *,
    encoder: Encoder,
    model: nn.Module,
    branch: int | None,
    reference_scores: np.ndarray | None,
    patch_level: int,
    patch_size: int,
    custom_downsample: float = 1,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    amp: bool = False,
    mp_context: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """CLAM's overlapping pass: encode + raw attention per patch; returns (N,) float32.

    Features are scored batch by batch and dropped, so memory stays O(batch). With
    ``reference_scores`` (the blockmap's raw attention, any shape) each score becomes its
    percentile (0..100) among them, CLAM's ``use_ref_scores``; without, the raw logits are kept.
    """
    if reference_scores is not None and np.asarray(reference_scores).size == 0:
        raise FeatureError("reference_scores is empty (the blockmap has no patches)")
    coords = _as_coords(coords_l0)
    scores = np.empty(coords.shape[0], dtype=np.float32)
    for start, feats in _feature_batches(
        slide_path,
        coords,
        encoder=encoder,
        patch_level=patch_level,
        patch_size=patch_size,
        custom_downsample=custom_downsample,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        amp=amp,
        mp_context=mp_context,
    ):
        scores[start : start + feats.shape[0]] = attention_logits(model, feats, branch=branch)
        if progress is not None:
            progress(int(feats.shape[0]))
    if reference_scores is not None:
        scores = _percentiles_vs_reference(scores, np.asarray(reference_scores)).astype(np.float32)
    return scores


# ---------------------------------------------------------------------------------------------
# HDF5 outputs
# ---------------------------------------------------------------------------------------------


def overlap_h5_name(slide_id: str, overlap: float | int | str, use_roi: bool) -> str:
    """CLAM's name of the overlapping-pass file: overlap as written in the YAML, roi True/False.

    >>> overlap_h5_name("C3L-01663-21", 0.5, False)
    'C3L-01663-21_0.5_roi_False.h5'
    >>> overlap_h5_name("s1", 0, 1)
    's1_0_roi_True.h5'
    """
    return f"{slide_id}_{overlap}_roi_{bool(use_roi)}.h5"


def _attr_value(value: Any) -> Any:
    if isinstance(value, str | int | float | bool | np.integer | np.floating | np.bool_):
        return value
    return json.dumps(value, default=str)


def _write_h5_atomic(
    path: Path,
    datasets: dict[str, np.ndarray],
    attrs: Mapping[str, Any] | None,
    coords_attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write datasets to a unique temp file in ``path``'s folder, then ``os.replace`` it in."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as h5:
            for key, data in datasets.items():
                h5.create_dataset(key, data=data)
            for key, value in (attrs or {}).items():
                h5.attrs[key] = _attr_value(value)
            for key, value in (coords_attrs or {}).items():
                h5["coords"].attrs[key] = _attr_value(value)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_rows(path: Path, values: np.ndarray, coords: np.ndarray, what: str) -> np.ndarray:
    coords = _as_coords(coords)
    if values.shape[0] != coords.shape[0]:
        raise FeatureError(
            f"{path}: {values.shape[0]} {what} rows but {coords.shape[0]} coords; they must match"
        )
    return coords


def write_features_h5(
    path: str | Path,
    features: np.ndarray,
    coords: np.ndarray,
    *,
    attrs: Mapping[str, Any] | None = None,
    coords_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """CLAM's raw ``<id>.h5``: ``features`` (N, D) float32 + ``coords`` (N, 2) int64, atomic.

    ``attrs`` (provenance such as the encoder fingerprint) go on the file root and
    ``coords_attrs`` on ``coords`` (e.g. ``patch_size_level0``, which the features reader
    understands); non-scalar values are stored as JSON text.
    """
    path = Path(path)
    feats = np.asarray(features)
    if feats.ndim != 2:
        raise FeatureError(f"{path}: features must be 2-D (N, D), got shape {feats.shape}")
    coords = _check_rows(path, feats, coords, "feature")
    datasets = {"features": feats.astype(np.float32), "coords": coords}
    _write_h5_atomic(path, datasets, attrs, coords_attrs)
    return path


def write_scores_h5(
    path: str | Path,
    scores: np.ndarray,
    coords: np.ndarray,
    *,
    attrs: Mapping[str, Any] | None = None,
    coords_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """CLAM's score file (``_blockmap.h5``, ``<id>_<overlap>_roi_<use_roi>.h5``), atomic.

    ``attention_scores`` (N, 1) float32 from ``scores`` (N,) or (N, 1); ``coords`` (N, 2) int64.
    ``attrs``/``coords_attrs`` as in :func:`write_features_h5`.
    """
    path = Path(path)
    values = np.asarray(scores, dtype=np.float32)
    if values.ndim > 2 or (values.ndim == 2 and values.shape[1] != 1) or values.ndim == 0:
        raise FeatureError(f"{path}: scores must have shape (N,) or (N, 1), got {values.shape}")
    values = values.reshape(-1, 1)
    coords = _check_rows(path, values, coords, "score")
    _write_h5_atomic(path, {"attention_scores": values, "coords": coords}, attrs, coords_attrs)
    return path
