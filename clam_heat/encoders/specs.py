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
