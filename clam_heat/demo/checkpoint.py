"""The demo's CLAM checkpoint: a gated CLAM_SB (small) trained briefly and reproducibly."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .output import output_path

#: Training steps per nominal second of ``train_demo_checkpoint(seconds=...)``.
STEPS_PER_SECOND = 100


#: Largest bag used per training step; larger bags are subsampled (seeded).
MAX_TRAIN_BAG = 512


def train_demo_checkpoint(
    bags: Sequence[tuple[np.ndarray, int]],
    path: str | Path,
    *,
    feature_dim: int = 64,
    n_classes: int = 2,
    seed: int = 0,
    seconds: float = 3.0,
    legacy_keys: bool = False,
) -> Path:
    """Train a gated CLAM_SB (small) briefly and save its ``state_dict`` to ``path``.

    Bag-level cross-entropy with Adam, one bag per step in a seeded shuffled order. ``seconds`` is
    a nominal budget turned into a fixed step count (:data:`STEPS_PER_SECOND`), so the weights
    are reproducible whatever the machine's speed. Bags above :data:`MAX_TRAIN_BAG` patches are
    subsampled per step. The global torch RNG state is left untouched. ``legacy_keys`` writes
    the layout of CLAM's own demo checkpoint (``attention_net.module.*`` plus an int64
    ``instance_loss_fn.labels``); both load with ``torch.load(..., weights_only=True)``.
    """
    import torch

    from ..models import ClamSB

    path = Path(path)
    if not bags:
        raise ValueError("bags is empty: pass at least one (features, label) pair")
    for i, (feats, label) in enumerate(bags):
        if feats.ndim != 2 or feats.shape[1] != feature_dim or len(feats) == 0:
            raise ValueError(f"bag {i}: features must be (N>0, {feature_dim}), got {feats.shape}")
        if not 0 <= int(label) < n_classes:
            raise ValueError(f"bag {i}: label {label} is not in 0..{n_classes - 1}")
    steps = max(1, round(seconds * STEPS_PER_SECOND))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7EA1]))
    tensors = [torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32)) for f, _ in bags]
    labels = [torch.tensor([int(lab)]) for _, lab in bags]

    threads = torch.get_num_threads()
    try:
        # Tiny matmuls: one thread is several times faster than two, and reproducible.
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ClamSB(gate=True, size_arg="small", n_classes=n_classes, embed_dim=feature_dim)
            optim = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=1e-5)
            loss_fn = torch.nn.CrossEntropyLoss()
            model.train()
            order: list[int] = []
            for _ in range(steps):
                if not order:
                    order = rng.permutation(len(bags)).tolist()
                i = order.pop()
                h = tensors[i]
                if len(h) > MAX_TRAIN_BAG:
                    pick = np.sort(rng.choice(len(h), MAX_TRAIN_BAG, replace=False))
                    h = h[torch.from_numpy(pick)]
                loss = loss_fn(model(h)[0], labels[i])
                optim.zero_grad()
                loss.backward()
                optim.step()
            model.eval()
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(threads)

    if legacy_keys:
        state = {
            (k.replace("attention_net.", "attention_net.module.", 1)): v for k, v in state.items()
        }
        state["instance_loss_fn.labels"] = torch.arange(2, dtype=torch.int64)
    # Saved through a file object, so the archive's inner folder is torch's fixed "archive" and
    # not the temp file's random name: the same weights give the same bytes on every run.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with output_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path


def _training_bags(
    features: Sequence[np.ndarray],
    is_tumour: Sequence[np.ndarray],
    has_tumour: Sequence[bool],
    seed: int,
    n_mixed: int = 40,
) -> list[tuple[np.ndarray, int]]:
    """Bags to train the demo checkpoint on, labelled 1 when they hold tumour patches.

    Each slide's own bag; for tumour slides, the same bag without its tumour patches (label 0);
    and ``n_mixed`` bags drawn from the pooled patches, alternately with and without a few tumour
    patches. Normal patches then occur in both classes, so only attention on tumour patches can
    separate them: the attention learns where tumour is, not which slide it saw.
    """
    bags: list[tuple[np.ndarray, int]] = []
    for feats, tumour, slide_has in zip(features, is_tumour, has_tumour, strict=True):
        if len(feats):
            bags.append((feats, int(slide_has and bool(tumour.any()))))
        if tumour.any() and (~tumour).any():
            bags.append((feats[~tumour], 0))
    pos = np.concatenate([f[t] for f, t in zip(features, is_tumour, strict=True)])
    neg = np.concatenate([f[~t] for f, t in zip(features, is_tumour, strict=True)])
    if len(pos) == 0 or len(neg) == 0:
        return bags
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xBA65]))
    for j in range(n_mixed):
        n = int(rng.integers(min(20, len(neg)), min(200, len(neg)) + 1))
        bag = neg[rng.choice(len(neg), n, replace=False)]
        if j % 2 == 0:
            k = int(rng.integers(1, min(len(pos), 40) + 1))
            bag = np.concatenate([bag, pos[rng.choice(len(pos), k, replace=False)]])
        bags.append((bag, int(j % 2 == 0)))
    return bags


#: The encoder a non-CLAM demo model is named after: its width is the demo features' width, so
#: the MIL-Lab name ``<model>.base.conch_v1.demo`` agrees with the H5 files.
MIL_LAB_DEMO_ENCODER = "conch_v1"


def mil_lab_demo_name(model: str) -> str:
    """The MIL-Lab name the demo of ``model`` is run with.

    >>> mil_lab_demo_name("abmil")
    'abmil.base.conch_v1.demo'
    """
    return f"{model}.base.{MIL_LAB_DEMO_ENCODER}.demo"


def train_mil_lab_checkpoint(
    bags: Sequence[tuple[np.ndarray, int]],
    path: str | Path,
    *,
    model: str,
    feature_dim: int,
    n_classes: int = 2,
    seed: int = 0,
    seconds: float = 3.0,
) -> Path:
    """Train any registered model (``abmil``, ``transmil``, ...) briefly and save its
    ``state_dict`` as MIL-Lab saves a trained model (``torch.save(model.state_dict())``: the
    ``model.``-prefixed keys its ``create_model(checkpoint_path=...)`` loads).

    Same recipe as :func:`train_demo_checkpoint` (seeded order, fixed step count, one thread,
    bags subsampled to :data:`MAX_TRAIN_BAG`); the bag's logits are the model's first output.
    """
    import torch

    from ..models import build_model

    path = Path(path)
    if not bags:
        raise ValueError("bags is empty: pass at least one (features, label) pair")
    steps = max(1, round(seconds * STEPS_PER_SECOND))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x3A11]))
    tensors = [torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32)) for f, _ in bags]
    labels = [torch.tensor([int(lab)]) for _, lab in bags]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = build_model(mil_lab_demo_name(model), n_classes=n_classes, embed_dim=feature_dim)
            optim = torch.optim.Adam(net.parameters(), lr=5e-4, weight_decay=1e-5)
            net.train()
            order: list[int] = []
            for _ in range(steps):
                if not order:
                    order = rng.permutation(len(bags)).tolist()
                i = order.pop()
                h = tensors[i]
                if len(h) > MAX_TRAIN_BAG:
                    h = h[torch.from_numpy(np.sort(rng.choice(len(h), MAX_TRAIN_BAG, False)))]
                logits = net(h)[0].reshape(1, n_classes)
                loss = torch.nn.functional.cross_entropy(logits, labels[i])
                optim.zero_grad()
                loss.backward()
                optim.step()
            net.eval()
            state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    finally:
        torch.set_num_threads(threads)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with output_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path
