"""A complete CLAM-style demo project: slides, features, checkpoint, process list, preset and
config, regenerated only when its parameters change.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .checkpoint import _training_bags, train_demo_checkpoint
from .features import DemoBag, _read_bag, _read_features, make_demo_features
from .output import write_text
from .shapes import DemoSlide, _pyramid_dims
from .slides import make_demo_slide

#: Level-0 (width, height) of each named demo size.
DEMO_SIZES: dict[str, tuple[int, int]] = {
    "tiny": (4096, 3072),
    "small": (12000, 9000),
    "large": (40000, 30000),
}


#: Bumped whenever generated content changes, so cached demo projects are regenerated.
DEMO_FORMAT_VERSION = 2


_LABEL_NAMES = ("normal", "tumour")


_PROJECT_MPP = 0.5


@dataclass(frozen=True)
class DemoProject:
    """A complete demo folder ready for ``clam-heat run <folder>/config.yaml``."""

    folder: Path
    config_path: Path
    slide_ids: tuple[str, ...]
    labels: tuple[str, ...]
    slide_paths: tuple[Path, ...]
    feature_paths: tuple[Path, ...]
    checkpoint_path: Path
    process_list_path: Path
    slides: tuple[DemoSlide, ...]
    bags: tuple[DemoBag, ...]


#: Segmentation preset for the demo slides: CLAM's bwh_biopsy values (small a_t/a_h, since a
#: tiny demo slide holds only ~50 "512x512 level-0 patches" of area; create_heatmaps' built-in
#: a_t of 50 would filter out every contour).
_DEMO_PRESET = (
    "seg_level,sthresh,mthresh,close,use_otsu,a_t,a_h,max_n_holes,vis_level,line_thickness,"
    "white_thresh,black_thresh,use_padding,contour_fn,keep_ids,exclude_ids\n"
    "-1,15,11,2,FALSE,1,1,2,-1,50,5,50,TRUE,four_pt,none,none\n"
)


def _demo_config(feature_dim: int) -> dict[str, object]:
    """CLAM's seven heatmap-config blocks (template values, demo paths) plus runner_arguments."""
    return {
        "exp_arguments": {
            "n_classes": 2,
            "save_exp_code": "demo",
            "raw_save_dir": "heatmaps/heatmap_raw_results",
            "production_save_dir": "heatmaps/heatmap_production_results",
            "batch_size": 256,
        },
        "data_arguments": {
            "data_dir": "slides",
            "data_dir_key": "source",
            "process_list": "demo.csv",
            "preset": "presets/demo.csv",
            "slide_ext": ".tiff",
            "label_dict": {name: i for i, name in enumerate(_LABEL_NAMES)},
        },
        "patching_arguments": {
            "patch_size": 256,
            "overlap": 0,
            "patch_level": 0,
            "custom_downsample": 1,
        },
        "encoder_arguments": {"model_name": "resnet50_trunc", "target_img_size": 224},
        "model_arguments": {
            "ckpt_path": "ckpts/s_0_checkpoint.pt",
            "model_type": "clam_sb",
            "initiate_fn": "initiate_model",
            "model_size": "small",
            "drop_out": 0.0,
            "embed_dim": feature_dim,
        },
        "heatmap_arguments": {
            "vis_level": -1,
            "alpha": 0.4,
            "blank_canvas": False,
            "save_orig": True,
            "save_ext": "jpg",
            "use_ref_scores": True,
            "blur": False,
            "use_center_shift": True,
            "use_roi": False,
            "calc_heatmap": False,
            "binarize": False,
            "binary_thresh": -1,
            "custom_downsample": 1,
            "cmap": "jet",
        },
        "sample_arguments": {
            "samples": [
                {"name": "topk_high_attention", "sample": True, "seed": 1, "k": 15, "mode": "topk"}
            ]
        },
        "runner_arguments": {
            "features_dir": "features",
            "device": "auto",
            "results_dir": "heatmaps/results",
        },
    }


def _slide_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] % (2**31))


def make_demo_project(
    folder: str | Path,
    *,
    n_slides: int = 5,
    size: Literal["tiny", "small", "large"] = "tiny",
    seed: int = 0,
    feature_dim: int = 64,
) -> DemoProject:
    """Write (or reuse) a complete CLAM-style demo project under ``folder``.

    Layout: ``slides/demo_NNN.tiff``, ``features/demo_NNN.h5`` (TRIDENT), ``ckpts/
    s_0_checkpoint.pt`` (CLAM_SB trained on these bags), ``process_lists/demo.csv``
    (``slide_id,label``), ``config.yaml`` (all paths relative to the folder) and an empty
    ``heatmaps/`` for outputs. Odd-numbered slides are tumour-free (label ``normal``).
    ``demo_manifest.json`` records the parameters; it is written last, so a call with the same
    parameters reuses a complete project and anything else regenerates it.
    """
    import yaml

    if size not in DEMO_SIZES:
        raise ValueError(f"size must be one of {sorted(DEMO_SIZES)}, got {size!r}")
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    folder = Path(folder)
    width, height = DEMO_SIZES[size]
    ids = tuple(f"demo_{i:03d}" for i in range(n_slides))
    has_tumour = tuple(i % 2 == 0 for i in range(n_slides))
    labels = tuple(_LABEL_NAMES[int(t)] for t in has_tumour)
    slide_paths = tuple(folder / "slides" / f"{sid}.tiff" for sid in ids)
    feature_paths = tuple(folder / "features" / f"{sid}.h5" for sid in ids)
    ckpt = folder / "ckpts" / "s_0_checkpoint.pt"
    plist = folder / "process_lists" / "demo.csv"
    config_path = folder / "config.yaml"
    manifest_path = folder / "demo_manifest.json"
    manifest = {
        "format_version": DEMO_FORMAT_VERSION,
        "n_slides": n_slides,
        "size": size,
        "seed": seed,
        "feature_dim": feature_dim,
    }
    outputs = (
        *slide_paths,
        *feature_paths,
        ckpt,
        plist,
        config_path,
        folder / "presets" / "demo.csv",
    )

    reuse = False
    with contextlib.suppress(OSError, ValueError):
        reuse = json.loads(manifest_path.read_text()) == manifest and all(
            p.is_file() for p in outputs
        )
    if reuse:
        slides = tuple(
            DemoSlide(
                p,
                width,
                height,
                _PROJECT_MPP,
                _slide_seed(seed, i),
                has_tumour[i],
                _pyramid_dims(width, height),
            )
            for i, p in enumerate(slide_paths)
        )
        bags = tuple(_read_bag(s, p) for s, p in zip(slides, feature_paths, strict=True))
    else:
        manifest_path.unlink(missing_ok=True)
        for sub, ext in (("slides", ".tiff"), ("features", ".h5")):
            for stale in (folder / sub).glob(f"demo_*{ext}"):
                if stale.stem not in ids:
                    stale.unlink()
        slides = tuple(
            make_demo_slide(
                p,
                width=width,
                height=height,
                seed=_slide_seed(seed, i),
                mpp=_PROJECT_MPP,
                tumour=has_tumour[i],
            )
            for i, p in enumerate(slide_paths)
        )
        bags = tuple(
            make_demo_features(s, p, feature_dim=feature_dim, seed=_slide_seed(seed, i))
            for i, (s, p) in enumerate(zip(slides, feature_paths, strict=True))
        )
        train = _training_bags(
            [_read_features(b.path) for b in bags], [b.is_tumour for b in bags], has_tumour, seed
        )
        train_demo_checkpoint(train, ckpt, feature_dim=feature_dim, seed=seed)
        rows = "".join(f"{sid},{lab}\n" for sid, lab in zip(ids, labels, strict=True))
        write_text(plist, "slide_id,label\n" + rows)
        write_text(folder / "presets" / "demo.csv", _DEMO_PRESET)
        header = "# clam-heat demo config: CLAM create_heatmaps.py blocks, paths relative here\n"
        body = yaml.safe_dump(_demo_config(feature_dim), sort_keys=False)
        write_text(config_path, header + "---\n" + body)
        (folder / "heatmaps").mkdir(parents=True, exist_ok=True)
        write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    (folder / "heatmaps").mkdir(parents=True, exist_ok=True)
    return DemoProject(
        folder=folder,
        config_path=config_path,
        slide_ids=ids,
        labels=labels,
        slide_paths=slide_paths,
        feature_paths=feature_paths,
        checkpoint_path=ckpt,
        process_list_path=plist,
        slides=slides,
        bags=bags,
    )
