"""A large bag on an attention-pooling model (CLAM, ABMIL) is scored chunk by chunk: attention
logits per chunk, the softmax over all of them, the pooled bag summed per chunk. The result must
equal the model's own plain forward over the whole bag (the oracle), to float rounding
(a one-row matmul takes another BLAS kernel: ~1e-5 apart)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clam_heat.models import build_model, run_attention
from clam_heat.models.inference import PooledAttention, _pooling_parts


def _model(model_type: str, gate: bool) -> torch.nn.Module:
    torch.manual_seed(3)
    model = build_model(model_type, n_classes=3, embed_dim=16, gate=gate).eval()
    for param in model.parameters():  # spread the weights: patches get distinct attention
        torch.nn.init.normal_(param, std=0.5)
    return model


def _plain(model: torch.nn.Module, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, attention) of the model's own forward over the whole bag."""
    h = torch.from_numpy(features)
    with torch.inference_mode():
        out = model(h)
    if len(out) == 2:  # MIL-Lab wrapper: (logits (C,), attention (N,))
        return out[0].numpy(), out[1].numpy()
    logits, _, y_hat, a_raw, _ = out  # CLAM: A_raw row of Y_hat
    row = int(y_hat.item()) if a_raw.shape[0] > 1 else 0
    return logits[0].numpy(), a_raw[row].numpy()


@pytest.mark.parametrize(
    ("model_type", "gate"),
    [("clam_sb", True), ("clam_sb", False), ("clam_mb", True), ("abmil", True)],
)
@pytest.mark.parametrize("chunk", [1, 5, 36])
def test_chunked_scores_equal_the_plain_forward(model_type: str, gate: bool, chunk: int) -> None:
    """Catches: a softmax taken per chunk, a pooled sum that drops or repeats a chunk (the last,
    short one included: 37 patches), or CLAM_MB's branch picked before all logits are in."""
    model = _model(model_type, gate)
    assert _pooling_parts(model) is not None
    features = np.random.default_rng(7).normal(size=(37, 16)).astype(np.float32)
    logits, attention = _plain(model, features)
    out = run_attention(model, features, chunk=chunk)
    np.testing.assert_allclose(out.logits, logits, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(out.attention, attention, rtol=1e-4, atol=2e-5)
    assert out.pred == int(np.argmax(logits))
    assert len(np.unique(out.attention)) > 30  # the attention is not trivially constant


def test_chunks_never_hold_more_than_chunk_patches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: a 'chunked' path that embeds the whole bag at once (memory grows with N)."""
    model = _model("clam_sb", True)
    parts = _pooling_parts(model)
    assert isinstance(parts, PooledAttention)
    sizes: list[int] = []
    real = type(parts).embed

    def embed(self, h):
        sizes.append(int(h.shape[0]))
        return real(self, h)

    monkeypatch.setattr(type(parts), "embed", embed)
    features = np.random.default_rng(1).normal(size=(103, 16)).astype(np.float32)
    run_attention(model, features, chunk=10)
    assert max(sizes) == 10 and sum(sizes) == 2 * 103  # logits pass + pooling pass
    sizes.clear()
    run_attention(model, features)  # a bag below the default chunk takes the plain forward
    assert sizes == [103]
