"""DTFD-MIL (Zhang et al. 2022, double-tier feature distillation) with MIL-Lab's keys and
forward, made deterministic.

The bag is cut into pseudo-bags; tier 1 scores each pseudo-bag's patches and distils a few of
its instances; tier 2 pools the distilled instances and classifies the slide. MIL-Lab returns
tier 2's attention over those instances, which do not map to patches, so the model declares no
attention and is drawn by the gradient and occlusion methods (docs/explanations.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layers import (
    GatedAttention,
    MilLabNet,
    MilLabParams,
    count_indices,
    register_mil_lab,
    shape_of,
)

_DISTILL = ("MaxMinS", "MaxS", "AFS")


class _LinearHead(nn.Module):
    """MIL-Lab's ``Classifier_1fc``: one Linear under the name ``fc``."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class _Residual(nn.Module):
    """``x + relu(block.2(relu(block.0(x))))``, both Linear layers bias-free."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Linear(dim, dim, bias=False),
            nn.ReLU(),
            nn.Linear(dim, dim, bias=False),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class _DimReduction(nn.Module):
    """``patch_embed``: ``fc1.0`` (Linear, ReLU) then ``resBlocks.<i>`` residual blocks."""

    def __init__(self, in_dim: int, dim: int, n_residuals: int) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.resBlocks = nn.Sequential(*(_Residual(dim) for _ in range(n_residuals)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resBlocks(self.fc1(x))


class _AttentionClassifier(nn.Module):
    """Tier 2 (``attCls``): gated attention ``global_attn`` and head ``classifier.fc``."""

    def __init__(self, dim: int, attention_dim: int, n_classes: int) -> None:
        super().__init__()
        self.global_attn = GatedAttention(dim, attention_dim, False, 1)
        self.classifier = _LinearHead(dim, n_classes)


class DFTD(MilLabNet):
    """DTFD-MIL as MIL-Lab builds it (``dftd.base``), with MIL-Lab's keys and forward.

    Keys: ``classifier.fc`` and ``attention.attention_{a.0,b.0,c}`` (tier 1),
    ``attCls.global_attn.attention_{a.0,b.0,c}`` and ``attCls.classifier.fc`` (tier 2),
    ``patch_embed.fc1.0`` and ``patch_embed.resBlocks.<i>.block.{0,2}`` (embedding).

    Forward: embed every patch; cut the bag into ``num_group`` pseudo-bags of consecutive
    patches (sizes as ``numpy.array_split``); in each, tier 1's gated-attention logits (no
    softmax, as in MIL-Lab) weight the embeddings, each weighted embedding is scored by the
    tier-1 head's weights (a class activation), and the patches are ranked by the softmax
    probability of the last class. ``distill`` picks what each pseudo-bag passes on, with
    ``k = total_instance // num_group``: ``MaxMinS`` the k top and k bottom patches, ``MaxS``
    the k top, ``AFS`` the pseudo-bag's attention-weighted sum. Tier 2 weights those instances
    by its gated-attention logits (again no softmax), sums them and classifies the sum.
    MIL-Lab's base config (4 // 8 = 0) has ``k = 0``, where its slice of the bottom k keeps the
    whole ranking: every patch passes, and the logits are tier 2 over all patches.

    **Determinism.** MIL-Lab shuffles the patches with Python's unseeded ``random.shuffle``
    before cutting them, at inference too. clam-heat does not shuffle: the pseudo-bags are
    consecutive runs of the bag's own order (the features file's), so the same slide always
    gets the same logits and maps, and the gradient and occlusion methods see one fixed
    function. For the base config the two agree whatever the shuffle: every patch reaches
    tier 2 and its pooling is a sum, so the order only changes rounding (the test fixture
    records MIL-Lab's logits under two shuffles). For configs that distil (``k > 0``, or
    ``AFS``) MIL-Lab's own output changes from run to run; clam-heat's equals MIL-Lab's under
    the identity shuffle. ``distill``, ``num_group`` and ``total_instance`` are not in the
    checkpoint: the base values are used.

    The per-patch score returned next to the logits is tier 2's attention logit of each patch's
    embedding: a placeholder for the infer stage, never drawn as attention
    (``has_attention=False``).
    """

    @dataclass(frozen=True)
    class Params(MilLabParams):
        """Attention width, residual blocks and the pseudo-bag settings (MIL-Lab's base)."""

        attention_dim: int = 128
        num_residuals: int = 4
        distill: str = "MaxMinS"
        num_group: int = 8
        total_instance: int = 4

    def build(self, in_dim: int, n_classes: int, hp: Params) -> None:
        if hp.distill not in _DISTILL:
            raise ValueError(f"distill must be one of {', '.join(_DISTILL)}, got {hp.distill!r}")
        if hp.num_group < 1:
            raise ValueError(f"num_group must be at least 1, got {hp.num_group}")
        width = hp.hidden_dim
        self.classifier = _LinearHead(width, n_classes)
        self.attention = GatedAttention(width, hp.attention_dim, True, 1)
        self.attCls = _AttentionClassifier(width, hp.attention_dim, n_classes)
        self.patch_embed = _DimReduction(in_dim, width, hp.num_residuals)

    def _distil(self, part: torch.Tensor) -> torch.Tensor:
        """One pseudo-bag's embeddings (n, E) -> the instances it passes to tier 2."""
        weighted = part * self.attention(part)
        if self.hparams.distill == "AFS":
            return weighted.sum(dim=0, keepdim=True)
        activation = weighted @ self.classifier.fc.weight.T  # (n, C), no bias (MIL-Lab's CAM)
        ranking = torch.argsort(torch.softmax(activation, dim=1)[:, -1], descending=True)
        k = self.hparams.total_instance // self.hparams.num_group
        top = ranking[:k]
        if self.hparams.distill == "MaxS":
            return part[top]
        bottom = ranking if k == 0 else ranking[-k:]  # MIL-Lab's [-0:] slice keeps them all
        return part[torch.cat([top, bottom])]

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.patch_embed(h)
        groups = torch.arange(x.shape[0], device=x.device).tensor_split(self.hparams.num_group)
        instances = torch.cat([self._distil(x[idx]) for idx in groups])
        tier2 = self.attCls
        pooled = (instances * tier2.global_attn(instances)).sum(dim=0)
        return tier2.classifier(pooled), tier2.global_attn(x)[:, 0]

    @staticmethod
    def infer_hparams(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return {
            "hidden_dim": shape_of(state, "model.patch_embed.fc1.0.weight", 0),
            "attention_dim": shape_of(state, "model.attCls.global_attn.attention_a.0.weight", 0),
            "num_residuals": count_indices(
                state, r"model\.patch_embed\.resBlocks\.(\d+)\.block\.0\.weight"
            ),
        }


def _count_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    """Classes of a DTFD checkpoint: rows of its tier-2 head ``model.classifier.fc`` (keys as
    saved, with or without DataParallel's ``module.``)."""
    from .checkpoint import normalise_mil_lab_state_dict

    head = normalise_mil_lab_state_dict(state).get("model.classifier.fc.weight")
    return int(head.shape[0]) if head is not None and head.dim() == 2 else None


register_mil_lab(
    "dftd",
    DFTD,
    signature=("model.attCls.",),
    input_key="model.patch_embed.fc1.0.weight",
    has_attention=False,
    count_classes=_count_classes,
)
