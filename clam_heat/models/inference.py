"""One-pass bag inference and the overlap pass's per-patch attention, for every registered model.

Both go through the model's own reduction (:attr:`~.registry.ModelSpec.attention`): CLAM's
``A_raw`` row of the predicted (or asked) class, DSMIL's column of A, each MIL-Lab network's
documented score. A model is matched to its spec by its ``model_type`` (set on every model
:func:`~.checkpoint.build_model` or :func:`~.checkpoint.load_model` makes); any other module
is read through the :class:`AttentionModel` protocol.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from ..devices import resolve_device
from ..errors import CheckpointError, FeatureError
from .registry import _REGISTRY, BUILTIN_MODELS, ModelSpec, get_model_spec

__all__ = [
    "INFERENCE_THREADS",
    "AttentionModel",
    "AttentionOutput",
    "CHUNK_PATCHES",
    "PooledAttention",
    "attention_logits",
    "needs_whole_bag",
    "run_attention",
]


#: torch intra-op threads of every attention forward. A CPU matmul's float sums depend on how
#: many threads split it (up to ~5e-7 apart between 16 and 1 threads), and a serial run, local
#: workers and Dask workers each get a different count; one fixed count makes the blockmap and
#: GeoJSON bytes the same whatever runs the row. One thread costs little: the attention head is
#: a few small matmuls per patch, next to a heatmap render that dominates the row.
INFERENCE_THREADS = 1


@contextlib.contextmanager
def fixed_threads(threads: int = INFERENCE_THREADS) -> Iterator[None]:
    """Run the block with torch's intra-op thread count at ``threads``, then restore it."""
    before = torch.get_num_threads()
    if before == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@runtime_checkable
class AttentionModel(Protocol):
    """What :func:`run_attention` needs from a model without its own reduction.

    ``forward(h)``: ``h`` (N, D) float32 -> ``(logits (C,), attention (N,))`` where attention is
    one score per patch (higher = more important), for the class the model predicts when its
    attention is per class. ``in_dim`` is D, checked against the features before the forward.
    """

    in_dim: int
    n_classes: int

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class AttentionOutput:
    """One bag's inference result.

    ``attention``: (N,) float32 per-patch score of the branch used for heatmaps (CLAM: raw
    pre-softmax; CLAM_MB: the predicted class's branch; other models: as their class documents).
    ``probs``: (C,) float32 class probabilities. ``top_ids``: (C,) int64 class indices sorted by
    probability, descending (CLAM's ``Pred_c`` order). ``logits``: (C,) float32.
    ``pred``: ``top_ids[0]``.
    """

    attention: np.ndarray
    probs: np.ndarray
    top_ids: np.ndarray
    logits: np.ndarray

    @property
    def pred(self) -> int:
        return int(self.top_ids[0])


#: Patches scored at a time by :func:`run_attention` on an attention-pooling model
#: (:class:`PooledAttention`): a larger bag goes chunk by chunk, so the embedded patches of a
#: 1,000,000-patch bag are never in memory at once. Bags up to this size take the plain forward.
CHUNK_PATCHES = 32_768


@runtime_checkable
class PooledAttention(Protocol):
    """An attention-pooling model in parts (CLAM, ABMIL): a patch's embedding and attention
    logits depend on that patch alone, and the bag is ``softmax(A) @ embedded``; so logits can
    be computed chunk-wise, the softmax taken over all, and the pooling summed chunk-wise."""

    def embed(self, h: torch.Tensor) -> torch.Tensor: ...

    def attention_raw(self, embedded: torch.Tensor) -> torch.Tensor: ...

    def pooled_logits(self, pooled: torch.Tensor) -> torch.Tensor: ...

    def pick_attention(
        self, raw: torch.Tensor, logits: torch.Tensor, branch: int | None
    ) -> torch.Tensor: ...


def _pooling_parts(model: nn.Module) -> PooledAttention | None:
    """The model (or the network a MIL-Lab wrapper holds) as :class:`PooledAttention`."""
    for candidate in (model, getattr(model, "model", None)):
        if isinstance(candidate, PooledAttention):
            return candidate
    return None


def _reduce_chunked(
    parts: PooledAttention, h: torch.Tensor, branch: int | None, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (C,), attention (N,)) of the whole bag, ``chunk`` patches at a time: attention
    logits chunk-wise, the softmax over all of them, the pooled bag summed chunk-wise."""
    n = int(h.shape[0])
    starts = range(0, n, chunk)
    raw = torch.cat([parts.attention_raw(parts.embed(h[i : i + chunk])) for i in starts], dim=1)
    weights = torch.softmax(raw, dim=1)
    pooled = None
    for i in starts:
        part = weights[:, i : i + chunk] @ parts.embed(h[i : i + chunk])
        pooled = part if pooled is None else pooled + part
    logits = parts.pooled_logits(pooled)
    return logits.reshape(-1), parts.pick_attention(raw, logits, branch).reshape(-1)


def _spec_of(model: nn.Module) -> ModelSpec | None:
    name = getattr(model, "model_type", None)
    if isinstance(name, str) and (name in _REGISTRY or name in BUILTIN_MODELS):
        return get_model_spec(name)
    return None


def _reduce(
    model: nn.Module, h: torch.Tensor, branch: int | None, chunk: int | None = CHUNK_PATCHES
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (C,), attention (N,)) through the model's reduction, or the protocol; a bag of
    more than ``chunk`` patches on an attention-pooling model is scored chunk by chunk, unless
    gradients are recorded: the chunked pass embeds each chunk twice (for the attention, then
    for the pooling), and autograd would keep both copies, more than the plain pass holds."""
    parts = _pooling_parts(model)
    chunked = chunk is not None and h.shape[0] > chunk and not torch.is_grad_enabled()
    if parts is not None and chunked:
        return _reduce_chunked(parts, h, branch, chunk)
    spec = _spec_of(model)
    if spec is not None and spec.attention is not None:
        logits, attention = spec.attention(model, h, branch)
    else:
        logits, attention = model(h)
    return logits.reshape(-1), attention.reshape(-1)


def needs_whole_bag(model: nn.Module) -> bool:
    """Whether a patch's attention depends on the other patches of the bag, so the bag must be
    scored whole (TransMIL, DSMIL, ILRA, RRT, Transformer, unregistered models); False for CLAM
    and ABMIL, whose bags may be scored in batches."""
    spec = _spec_of(model)
    return not (spec is not None and spec.per_patch)


def _input_width(model: nn.Module) -> int | None:
    for name in ("in_dim", "embed_dim"):
        value = getattr(model, name, None)
        if isinstance(value, int):
            return value
    return None


def _as_bag(
    model: nn.Module, features: np.ndarray | torch.Tensor, max_bag_size: int | None, device: object
) -> torch.Tensor:
    """Check a bag (shape, width, size guard) and return it on the model's device and dtype."""
    if features.ndim != 2:
        raise FeatureError(f"features must be 2-D (N, D), got shape {tuple(features.shape)}")
    n = int(features.shape[0])
    width = _input_width(model)
    if width is not None and features.shape[1] != width:
        raise FeatureError(
            f"feature width {features.shape[1]} does not match model_arguments.embed_dim "
            f"{width} (features come from a different encoder than the checkpoint)"
        )
    limit = max_bag_size if max_bag_size is not None else getattr(model, "max_bag_size", None)
    if limit is not None and n > limit:
        name = getattr(model, "name", type(model).__name__)
        raise FeatureError(
            f"bag has {n} patches, above the {limit}-patch limit for {name} (its attention "
            "cost grows with N^2); patch at a lower magnification or with larger patches"
        )
    param = next(iter(model.parameters()), None)
    if param is not None:
        target, dtype = param.device, param.dtype
    else:
        target = resolve_device(device) if isinstance(device, str) else device
        dtype = torch.float32
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    return features.to(device=target, dtype=dtype)


def _checked_scores(model: nn.Module, attention: torch.Tensor, n: int) -> np.ndarray:
    """(N,) float32 numpy scores; wrong counts and NaN/Inf are a :class:`CheckpointError`."""
    if attention.numel() != n:
        raise CheckpointError(
            f"{type(model).__name__} returned {attention.numel()} attention scores for a bag "
            f"of {n} patches (a registered model must return attention of shape (N,))"
        )
    scores = attention.float().cpu().numpy().astype(np.float32)
    if not np.isfinite(scores).all():
        raise CheckpointError(
            "the model produced NaN/Inf attention (corrupt checkpoint weights or features "
            "far outside the training range)"
        )
    return scores


def run_attention(
    model: nn.Module,
    features: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    max_bag_size: int | None = None,
    chunk: int | None = CHUNK_PATCHES,
) -> AttentionOutput:
    """One forward pass over a bag (CLAM runs it twice) under ``inference_mode``, on
    :data:`INFERENCE_THREADS` CPU threads (the same floats whatever executor runs it).

    ``features``: (N, D) float32 with D equal to the model's input width, else
    :class:`FeatureError` naming both. ``max_bag_size`` overrides the model's own guard (set
    for models whose cost grows with N²); a larger bag is a :class:`FeatureError`. The
    attention is the predicted class's, through the model's own reduction. An attention-pooling
    model (:class:`PooledAttention`) scores a bag of more than ``chunk`` patches chunk by chunk
    (the same result within float rounding, memory bounded by ``chunk``); None: never.
    """
    if features.ndim == 2 and features.shape[0] == 0:
        raise FeatureError("empty bag (0 patches): nothing to score")
    with torch.inference_mode(), fixed_threads():
        h = _as_bag(model, features, max_bag_size, device)
        logits, attention = _reduce(model, h, None, chunk)
        probs = torch.softmax(logits.float(), dim=0)
        attention_np = _checked_scores(model, attention, int(h.shape[0]))
        top_ids = torch.argsort(probs, descending=True, stable=True)
        return AttentionOutput(
            attention=attention_np,
            probs=probs.float().cpu().numpy().astype(np.float32),
            top_ids=top_ids.cpu().numpy().astype(np.int64),
            logits=logits.float().cpu().numpy().astype(np.float32),
        )


def attention_logits(
    model: nn.Module, features: np.ndarray | torch.Tensor, *, branch: int | None
) -> np.ndarray:
    """Raw per-patch attention (N,) float32 of ``features`` (N, D) scored as one bag, through
    the model's own reduction (CLAM's ``attention_only`` logits, no softmax), for the overlap
    pass (CLAM's ``calc_heatmap``).

    ``branch``: the class whose map is drawn (the slide's predicted class, as CLAM draws
    ``A[Y_hat]``); required in ``0..C-1`` for models with one map per class (CLAM_MB, DSMIL),
    ignored by single-map models. Batches: a CLAM or ABMIL patch's logit depends on that patch
    alone, so any split of a bag into batches gives the same scores; for the other models
    (:func:`needs_whole_bag`) ``features`` must be the whole bag, since each batch would
    otherwise be scored as a bag of its own. The model's bag-size guard applies.
    """
    spec = _spec_of(model)
    if spec is not None and spec.per_class:
        n_branches = int(getattr(model, "n_classes", 0))
        if branch is None or not 0 <= branch < n_branches:
            raise CheckpointError(
                f"model has {n_branches} attention branches; branch must be the predicted "
                f"class in 0..{n_branches - 1}, got {branch}"
            )
    if features.ndim == 2 and features.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    with torch.inference_mode(), fixed_threads():
        h = _as_bag(model, features, None, "cpu")
        _, attention = _reduce(model, h, branch)
        return _checked_scores(model, attention, int(h.shape[0]))
