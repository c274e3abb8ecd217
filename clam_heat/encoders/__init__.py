"""Patch encoders and the slide -> features -> attention path of CLAM's heatmap script.

CLAM's ``create_heatmaps.py`` re-reads pixels from the slide and encodes them twice
(docs/rules/heatmaps.md#encoder-pass): the non-overlapping grid gives the bag (``<id>.h5``), the
overlapping grid gives per-patch attention for the fine heatmap
(``<id>_<overlap>_roi_<use_roi>.h5``). The package holds both halves, one concern per module:

* :mod:`.specs`: the encoder table (widths, normalisation, weight locations) and
  :class:`EncoderError`;
* :mod:`.networks`: the built-in networks with timm's state-dict key names (verified against
  timm's own outputs, ``tests/data/timm``);
* :mod:`.weights`: finding weights (``runner_arguments.encoder_weights``, CLAM's environment
  variables, the Hugging Face cache; never downloaded) and reading them strictly;
* :mod:`.build`: :func:`build_encoder` (timm when it imports, else the built-in networks);
* :mod:`.dataset`: :class:`PatchDataset` and :func:`encode_patches`;
* :mod:`.overlap`: :func:`attention_logits` and :func:`overlap_scores`, CLAM's overlapping pass.

CLAM's HDF5 layouts (:func:`write_features_h5`, :func:`write_scores_h5`) live in
:mod:`clam_heat.h5io` and are re-exported here. Coordinates are level-0 (x, y) top-left corners
(``coords_l0``), as in every CLAM/TRIDENT file.
"""

from __future__ import annotations

from ..h5io import write_features_h5, write_scores_h5
from .build import ENCODER_BACKENDS, Encoder, build_encoder, encoder_backend
from .dataset import PatchDataset, encode_patches
from .networks import ResNet50Trunk, TinyCNN, VisionTransformer, resample_abs_pos_embed
from .overlap import attention_logits, overlap_scores
from .specs import (
    ENCODER_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    RANDOM_INIT_SEED,
    EncoderError,
)
from .weights import find_encoder_weights, hf_cache_root, load_weights_file

__all__ = [
    "ENCODER_BACKENDS",
    "ENCODER_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "RANDOM_INIT_SEED",
    "Encoder",
    "EncoderError",
    "PatchDataset",
    "ResNet50Trunk",
    "TinyCNN",
    "VisionTransformer",
    "attention_logits",
    "build_encoder",
    "encode_patches",
    "encoder_backend",
    "find_encoder_weights",
    "hf_cache_root",
    "load_weights_file",
    "overlap_scores",
    "resample_abs_pos_embed",
    "write_features_h5",
    "write_scores_h5",
]
