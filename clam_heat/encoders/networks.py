"""The built-in encoder networks, with timm's state-dict key names (checked against timm).

``ResNet50Trunk`` is CLAM's ``resnet50_trunc``, ``VisionTransformer`` UNI's ViT-L/16,
``TinyCNN`` a seeded random test/demo network; ``_ConchImageTower`` and ``_TimmTrunk`` wrap
networks built by CONCH's package and by timm. Inputs are (B, 3, H, W) float32 normalised
images; outputs (B, D) features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import FeedForward
from .specs import EncoderError


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
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))
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
