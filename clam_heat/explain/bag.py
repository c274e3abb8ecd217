"""One bag seen through a model: its logits as a differentiable function of the features, and
its logits with patches left out (what occlusion and the faithfulness curves ask).

Every method works on the precomputed features and the checkpoint only. Leaving patches out is
exact for every model (the model is rerun on the kept patches); for a model with a linear head
(:attr:`~clam_heat.models.registry.ModelSpec.linear_head`) it is computed in closed form from
one pass: with softmax pooling, the logit of class c without a set S of patches is
``b_c + sum_k (sum_{i not in S} e^{r_ki} s_kci) / (sum_{i not in S} e^{r_ki})``, with ``r`` the
attention logits and ``s_kci = W_c,k . h_i``, so thousands of subsets cost one matmul.
An empty bag (every patch left out) is scored as one all-zero patch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models.inference import _reduce, _spec_of
from ..models.registry import ModelSpec

__all__ = ["Attribution", "Bag", "ExplainOptions"]


@dataclass(frozen=True)
class ExplainOptions:
    """Method settings (``heatmap_arguments``): integrated-gradients steps and baseline,
    occlusion group side (patches) for bags above ``occlusion_exact_limit`` patches, and how
    many leave-out subsets one closed-form or batched pass scores."""

    ig_steps: int = 32
    ig_baseline: str = "zeros"
    occlusion_group: int = 4
    occlusion_exact_limit: int = 2048
    batch: int = 256


@dataclass
class Attribution:
    """One map: ``scores`` (N,) float32 for class ``target``, with provenance ``attrs``."""

    scores: np.ndarray
    target: int
    attrs: dict[str, Any] = field(default_factory=dict)


class Bag:
    """A model and one bag ``features`` (N, D) (float tensor on the model's device and dtype).

    ``coords`` (N, 2) level-0 coordinates and ``patch_size`` are only needed by occlusion's
    spatial groups.
    """

    def __init__(
        self,
        model: nn.Module,
        features: torch.Tensor,
        *,
        coords: np.ndarray | None = None,
        patch_size: int | None = None,
    ) -> None:
        self.model = model
        self.features = features
        self.coords = coords
        self.patch_size = patch_size
        self.spec: ModelSpec | None = _spec_of(model)
        self._closed: tuple[torch.Tensor, ...] | None = None

    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(C,) bag logits of ``h`` (N, D); differentiable."""
        return _reduce(self.model, h, None)[0]

    @torch.no_grad()
    def full_logits(self) -> torch.Tensor:
        return self.logits(self.features)

    # ------------------------------------------------------------------ patches left out

    @torch.no_grad()
    def masked_logits(self, keep: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of the bag restricted to each row of ``keep`` (B, N) (nonzero = kept)."""
        keep = keep.reshape(-1, self.n)
        if self.spec is not None and self.spec.linear_head is not None:
            return self._closed_form(keep)
        rows = []
        for row in keep:
            kept = self.features[row != 0]
            rows.append(self.logits(kept) if len(kept) else self._empty())
        return torch.stack(rows)

    def _empty(self) -> torch.Tensor:
        return self.logits(torch.zeros_like(self.features[:1]))

    def _closed_form(self, keep: torch.Tensor) -> torch.Tensor:
        if self._closed is None:
            head = self.spec.linear_head  # type: ignore[union-attr]
            raw, embedded, w, b = head(self.model, self.features)
            k = raw.shape[0]
            raw = raw.double()
            expo = torch.exp(raw - raw.max(dim=1, keepdim=True).values)  # (K, N)
            per_head = w.double().reshape(w.shape[0], k, -1)  # (C, K, E)
            s = torch.einsum("cke,ne->knc", per_head, embedded.double())  # (K, N, C)
            self._closed = (expo, expo.unsqueeze(-1) * s, b.double(), self._empty().double())
        expo, weighted, bias, empty = self._closed
        mask = keep.double()
        z = mask @ expo.T  # (B, K)
        num = torch.einsum("bn,knc->bkc", mask, weighted)  # (B, K, C)
        out = bias + (num / z.clamp_min(1e-300).unsqueeze(-1)).sum(dim=1)
        out[(mask.sum(dim=1) == 0)] = empty
        return out.to(self.features.dtype)
