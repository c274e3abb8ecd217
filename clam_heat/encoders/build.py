"""``build_encoder``: CLAM's patch encoders from timm or the built-in networks, never downloaded.

``resnet50_trunc`` and ``uni_v1`` come from ``timm.create_model`` exactly as CLAM calls it when
``timm`` imports (a user with a working torchvision), otherwise from the built-in networks of
:mod:`.networks`, which use timm's state-dict key names. timm is not a hard dependency because
it needs torchvision, whose wheels are tied to one torch build. Either way the weights a user
already has load strictly (:mod:`.weights`).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..devices import resolve_device
from .networks import ResNet50Trunk, TinyCNN, VisionTransformer, _ConchImageTower, _TimmTrunk
from .specs import _SPECS, _WEIGHTS_KEY, ENCODER_NAMES, RANDOM_INIT_SEED, EncoderError, _Spec
from .weights import _adapt_state, _find_weights, _load_strict, load_weights_file

log = logging.getLogger(__name__)


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


def _known_spec(model_name: str) -> _Spec:
    """The spec of ``model_name``, or an EncoderError with the closest known name."""
    if model_name not in _SPECS:
        close = difflib.get_close_matches(str(model_name), ENCODER_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise EncoderError(
            f"encoder_arguments.model_name {model_name!r} is not a known encoder{hint}; "
            f"choose one of {', '.join(ENCODER_NAMES)}"
        )
    return _SPECS[model_name]


def _output_width(model_name: str, spec: _Spec, dim: int | None) -> int:
    """The feature width: ``dim`` for ``tiny_cnn`` (default 64), else the encoder's own, which
    must equal ``dim`` (``model_arguments.embed_dim``) when given."""
    if model_name == "tiny_cnn":
        out_dim = 64 if dim is None else int(dim)
        if out_dim < 1:
            raise EncoderError(f"tiny_cnn width must be >= 1, got {dim}")
        return out_dim
    if dim is not None and dim != spec.dim:
        raise EncoderError(
            f"encoder {model_name!r} produces {spec.dim}-d features but "
            f"model_arguments.embed_dim is {dim}; use the encoder the checkpoint was trained on"
        )
    return spec.dim


def _log_backend(model_name: str, backend: str, used: str) -> None:
    """Say which implementation builds a timm encoder (and why not timm, when it does not)."""
    if model_name not in _TIMM_ENCODERS:
        return
    why = _import_timm()[1] if backend == "auto" and used == "builtin" else ""
    log.info(
        "encoder %s: %s%s",
        model_name,
        "timm.create_model (" + used + ")" if used != "builtin" else "built-in network",
        f" (timm unavailable: {why})" if why else "",
    )


def _build_local(
    model_name: str,
    spec: _Spec,
    weights: str | Path | None,
    used: str,
    out_dim: int,
    allow_random: bool,
    torch_device: torch.device,
) -> tuple[nn.Module, str]:
    """A timm or built-in encoder with its weights loaded strictly (or seeded-random), on
    ``torch_device``; returns (module, where the weights came from)."""
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
    return module.to(torch_device), source


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
    spec = _known_spec(model_name)
    out_dim = _output_width(model_name, spec, dim)
    if model_name == "conch_v1_5" and target_img_size != 448:
        raise EncoderError(
            "encoder 'conch_v1_5' needs encoder_arguments.target_img_size 448, "
            f"got {target_img_size}"
        )
    used = encoder_backend(model_name, backend)
    _log_backend(model_name, backend, used)
    torch_device = resolve_device(device, error=EncoderError)
    if model_name in ("conch_v1", "conch_v1_5"):
        module, source = _build_conch(
            model_name, None if weights is None else Path(weights), torch_device
        )
    else:
        module, source = _build_local(
            model_name, spec, weights, used, out_dim, allow_random, torch_device
        )
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
