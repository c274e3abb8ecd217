"""What each CLAM encoder is: output width, normalisation, where its weights usually live.

One table (:data:`_SPECS`) that :mod:`.weights` and :mod:`.build` read; no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ClamHeatError

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


@dataclass(frozen=True)
class _Spec:
    dim: int
    hf_repo: str | None = None  # Hugging Face cache folder models--<org>--<name>
    env_var: str | None = None  # CLAM's environment variable for a local file
    hint: str = ""  # how to get the weights
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def _gated(repo: str, then: str = ", download pytorch_model.bin") -> str:
    """The hint for a gated Hugging Face model."""
    return f"request access to {repo} on Hugging Face{then}"


_SPECS: dict[str, _Spec] = {
    "resnet50_trunc": _Spec(
        1024,
        hf_repo="timm/resnet50.tv_in1k",
        hint="run `huggingface-cli download timm/resnet50.tv_in1k` once on a machine with internet",
    ),
    "uni_v1": _Spec(
        1024, hf_repo="MahmoodLab/UNI", env_var="UNI_CKPT_PATH", hint=_gated("MahmoodLab/UNI")
    ),
    "conch_v1": _Spec(
        512,
        hf_repo="MahmoodLab/CONCH",
        env_var="CONCH_CKPT_PATH",
        hint=_gated("MahmoodLab/CONCH"),
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
    ),
    "conch_v1_5": _Spec(
        768,
        hf_repo="MahmoodLab/TITAN",
        hint=_gated("MahmoodLab/TITAN", " and download it into the cache"),
    ),
    "tiny_cnn": _Spec(64),
}


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
