"""Blocks shared by several architectures, and the MIL-Lab outer wrapper.

Gated / plain attention (CLAM, ABMIL), Nystrom attention and its pre-norm block (TransMIL,
RRT), TransMIL's PPEG position encoding, the GELU feed-forward (RRT; also the ViT MLP of the
encoders), MIL-Lab's ``patch_embed`` MLP, and helpers that read hidden sizes from a state
dict's tensor shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model

__all__ = [
    "EmbedParams",
    "FeedForward",
    "GatedAttention",
    "MilLabModel",
    "MilLabNet",
    "MilLabParams",
    "NystromAttention",
    "NystromBlock",
    "PPEG",
    "PlainAttention",
    "count_indices",
    "drop_none",
    "mlp_embed",
    "n_linear",
    "register_mil_lab",
    "shape_of",
]


class GatedAttention(nn.Module):
    """Gated attention (tanh branch x sigmoid branch -> K logits per patch)."""

    def __init__(self, in_dim: int, hidden: int, dropout: bool, n_out: int) -> None:
        super().__init__()
        a: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.Tanh()]
        b: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.Sigmoid()]
        if dropout:
            a.append(nn.Dropout(0.25))
            b.append(nn.Dropout(0.25))
        self.attention_a = nn.Sequential(*a)
        self.attention_b = nn.Sequential(*b)
        self.attention_c = nn.Linear(hidden, n_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention_c(self.attention_a(h) * self.attention_b(h))


class PlainAttention(nn.Module):
    """Un-gated attention: Linear, tanh, (dropout), Linear -> K logits per patch."""

    def __init__(self, in_dim: int, hidden: int, dropout: bool, n_out: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.Tanh()]
        if dropout:
            layers.append(nn.Dropout(0.25))
        layers.append(nn.Linear(hidden, n_out))
        self.module = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.module(h)


class FeedForward(nn.Module):
    """``fc2(gelu(fc1(x)))``: RRT's optional FFN and the ViT encoders' MLP (same keys)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _nystrom_pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Approximate Moore-Penrose pseudo-inverse of each (m, m) matrix in ``x`` (..., m, m) by
    Newton-Schulz iterations, matmuls only (the Nystromformer recipe MIL-Lab runs).

    The starting guess is ``x^T`` divided by (largest absolute row sum) x (largest absolute
    column sum) taken over the **whole** batch of matrices, not per matrix: that is what
    MIL-Lab's attention computes, and with 6 iterations the result depends on it.

    >>> a = torch.softmax(torch.randn(2, 5, 5, dtype=torch.float64), dim=-1)
    >>> eye = torch.eye(5, dtype=torch.float64).expand(2, 5, 5)
    >>> bool(torch.allclose(_nystrom_pinv(a, 30) @ a, eye, atol=1e-6))
    True
    """
    magnitude = x.abs()
    scale = magnitude.sum(dim=-1).max() * magnitude.sum(dim=-2).max()
    z = x.transpose(-1, -2) / scale
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Nystrom self-attention (Xiong et al. 2021) over one bag of tokens, as MIL-Lab's TransMIL
    and RRT use it (the ``nystrom_attention`` package's maths, written here from the paper).

    The sequence is zero-padded **at the front** to a multiple of ``landmarks``; landmarks are
    the means of consecutive groups of ``ceil(n / landmarks)`` tokens (queries pre-scaled by
    ``dim_head ** -0.5``); softmax(Q K_l^T) pinv(softmax(Q_l K_l^T)) softmax(Q_l K^T) V plus a
    depthwise (33, 1) convolution of V along the sequence; the padding rows are dropped at the
    end. Cost O(n * landmarks).

    Keys: ``to_qkv`` (3 * heads * dim_head, dim; no bias), ``to_out.0`` (dim, heads * dim_head),
    ``res_conv`` (heads, 1, 33, 1).
    """

    def __init__(
        self, dim: int, *, heads: int, dim_head: int, landmarks: int, pinv_iters: int = 6
    ) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.landmarks, self.pinv_iters = max(1, landmarks), pinv_iters
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))
        self.res_conv = nn.Conv2d(heads, heads, (33, 1), padding=(16, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (n, dim) -> (n, dim)."""
        n = x.shape[0]
        m = self.landmarks
        pad = -n % m
        if pad:
            x = torch.cat([x.new_zeros(pad, x.shape[1]), x])
        length = n + pad
        q, k, v = (
            self.to_qkv(x).reshape(length, 3, self.heads, self.dim_head).permute(1, 2, 0, 3)
        )  # each (heads, length, dim_head)
        q = q * self.dim_head**-0.5
        group = length // m
        q_marks = q.reshape(self.heads, m, group, self.dim_head).mean(dim=2)
        k_marks = k.reshape(self.heads, m, group, self.dim_head).mean(dim=2)
        kernel_1 = torch.softmax(q @ k_marks.transpose(-1, -2), dim=-1)  # (h, length, m)
        kernel_2 = torch.softmax(q_marks @ k_marks.transpose(-1, -2), dim=-1)  # (h, m, m)
        kernel_3 = torch.softmax(q_marks @ k.transpose(-1, -2), dim=-1)  # (h, m, length)
        out = (kernel_1 @ _nystrom_pinv(kernel_2, self.pinv_iters)) @ (kernel_3 @ v)
        out = out + self.res_conv(v[None])[0]
        out = out.permute(1, 0, 2).reshape(length, self.heads * self.dim_head)
        return self.to_out(out)[pad:]


def mlp_embed(in_dim: int, width: int, n_layers: int, dropout: float = 0.0) -> nn.Sequential:
    """MIL-Lab's ``patch_embed`` (``create_mlp`` ending in an activation): (Linear, ReLU,
    Dropout) x (n_layers - 1), then Linear, ReLU -- Linear weights at indices 0, 3, 6, ..."""
    layers: list[nn.Module] = []
    for _ in range(n_layers - 1):
        layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = width
    return nn.Sequential(*layers, nn.Linear(in_dim, width), nn.ReLU())


class PPEG(nn.Module):
    """TransMIL's position encoding: the tokens laid row by row on a side x side grid, plus
    depthwise 7x7, 5x5 and 3x3 convolutions of that grid (``proj``, ``proj1``, ``proj2``)."""

    def __init__(self, dim: int, kernel: int = 7, *, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=bias)
        self.proj1 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim, bias=bias)
        self.proj2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=bias)

    def forward(self, tokens: torch.Tensor, side: int) -> torch.Tensor:
        """``tokens`` (side², dim) -> (side², dim)."""
        grid = tokens.T.reshape(1, -1, side, side)
        grid = grid + self.proj(grid) + self.proj1(grid) + self.proj2(grid)
        return grid.flatten(2)[0].T


class NystromBlock(nn.Module):
    """Pre-norm residual Nystrom attention: ``x + attention(norm(x))`` (keys ``norm``,
    ``<attention_name>.*``)."""

    def __init__(self, dim: int, attention: NystromAttention, attention_name: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self._attention_name = attention_name
        self.add_module(attention_name, attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + getattr(self, self._attention_name)(self.norm(x))


@dataclass(frozen=True)
class MilLabParams:
    """What every MIL-Lab network is sized by: the token width ``hidden_dim``."""

    hidden_dim: int = 512


@dataclass(frozen=True)
class EmbedParams(MilLabParams):
    """A network whose ``patch_embed`` is MIL-Lab's MLP: also its depth ``num_fc_layers``."""

    num_fc_layers: int = 1


class MilLabNet(nn.Module):
    """A MIL-Lab network: ``Net(in_dim, n_classes, **hparams)``.

    Each network declares its hyper-parameters once, as its frozen dataclass ``Params``
    (extending :class:`MilLabParams` or :class:`EmbedParams`, so the shared ones are declared
    once too), and builds its layers in :meth:`build` from the checked record, kept as
    ``hparams``. An unknown hyper-parameter name is a TypeError, as from a keyword signature.
    """

    Params: ClassVar[type[MilLabParams]] = MilLabParams

    def __init__(self, in_dim: int, n_classes: int, **hparams: Any) -> None:
        super().__init__()
        self.hparams = self.Params(**hparams)
        self.build(in_dim, n_classes, self.hparams)

    def build(self, in_dim: int, n_classes: int, hp: Any) -> None:
        """Create the layers (in MIL-Lab's order, so seeded initialisation matches)."""
        raise NotImplementedError

    @staticmethod
    def infer_hparams(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """``Params`` fields read from a ``model.``-prefixed state dict's shapes; a None value
        (not in the checkpoint) keeps the default (:func:`register_mil_lab` drops it)."""
        raise NotImplementedError


class MilLabModel(nn.Module):
    """Outer module: the network sits in ``.model`` so every key starts with ``model.``.

    ``forward(h (N, D)) -> (logits (C,), attention (N,))`` (the :class:`AttentionModel`
    protocol). ``max_bag_size`` is the default bag-size guard used by ``run_attention``.
    """

    def __init__(
        self, net: nn.Module, *, name: str, in_dim: int, n_classes: int, max_bag_size: int | None
    ) -> None:
        super().__init__()
        self.model = net
        self.name = name
        self.in_dim = in_dim
        self.n_classes = n_classes
        self.max_bag_size = max_bag_size

    @property
    def model_type(self) -> str:
        """The registered name (how :mod:`.inference` finds this model's reduction)."""
        return self.name

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if h.dim() == 3 and h.shape[0] == 1:
            h = h[0]
        if h.dim() != 2:
            raise ValueError(f"expected features of shape (N, D), got {tuple(h.shape)}")
        return self.model(h)


def register_mil_lab(
    name: str,
    net_cls: type[MilLabNet],
    *,
    signature: tuple[str, ...],
    input_key: str = "model.patch_embed.0.weight",
    max_bag_size: int | None = None,
    **options: Any,
) -> None:
    """Register a MIL-Lab-layout network: built wrapped in :class:`MilLabModel` (keys start with
    ``model.``), hidden sizes read by the class's ``infer_hparams`` (its None values dropped)."""

    def build(*, in_dim: int, n_classes: int, **hparams: Any) -> nn.Module:
        net = net_cls(in_dim, n_classes, **hparams)
        return MilLabModel(
            net, name=name, in_dim=in_dim, n_classes=n_classes, max_bag_size=max_bag_size
        )

    build.__doc__ = f"Build {name} wrapped so its keys start with 'model.'."
    register_model(
        name,
        build,
        replace=False,
        infer_hparams=lambda state: drop_none(net_cls.infer_hparams(state)),
        max_bag_size=max_bag_size,
        layout="mil-lab",
        signature=signature,
        input_key=input_key,
        **options,
    )


def shape_of(state: Mapping[str, torch.Tensor], key: str, dim: int) -> int | None:
    """Size of dimension ``dim`` of ``state[key]`` (None when absent): a size read back."""
    tensor = state.get(key)
    return int(tensor.shape[dim]) if tensor is not None and tensor.dim() > dim else None


def count_indices(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    """How many distinct values the first group of ``pattern`` takes over the keys."""
    regex = re.compile(pattern)
    return len({m[1] for k in state if (m := regex.fullmatch(k))})


def drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` without its None entries (the hyper-parameters a checkpoint does not fix)."""
    return {k: v for k, v in values.items() if v is not None}


def n_linear(state: Mapping[str, torch.Tensor], prefix: str) -> int | None:
    """How many Linear layers a ``patch_embed``-style Sequential under ``prefix`` holds."""
    return count_indices(state, re.escape(prefix) + r"\.(\d+)\.weight") or None
