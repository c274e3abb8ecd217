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

from ..models.registry import ENCODER_DIM_MAPPING
from .checkpoint import (
    MIL_LAB_DEMO_ENCODER,
    _training_bags,
    mil_lab_demo_name,
    train_demo_checkpoint,
    train_mil_lab_checkpoint,
)
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


@dataclass(frozen=True)
class _Layout:
    """Where each file of a demo project goes, and what a reusable project must hold."""

    folder: Path
    ids: tuple[str, ...]
    has_tumour: tuple[bool, ...]
    labels: tuple[str, ...]
    slide_paths: tuple[Path, ...]
    feature_paths: tuple[Path, ...]
    ckpt: Path
    plist: Path
    config_path: Path
    manifest_path: Path
    preset_path: Path

    @property
    def outputs(self) -> tuple[Path, ...]:
        return (
            *self.slide_paths,
            *self.feature_paths,
            self.ckpt,
            self.plist,
            self.config_path,
            self.preset_path,
        )


def _layout(folder: Path, n_slides: int, model: str) -> _Layout:
    ids = tuple(f"demo_{i:03d}" for i in range(n_slides))
    has_tumour = tuple(i % 2 == 0 for i in range(n_slides))
    ckpt_name = "s_0_checkpoint.pt" if model == "clam_sb" else f"{model}_demo.pt"
    return _Layout(
        folder=folder,
        ids=ids,
        has_tumour=has_tumour,
        labels=tuple(_LABEL_NAMES[int(t)] for t in has_tumour),
        slide_paths=tuple(folder / "slides" / f"{sid}.tiff" for sid in ids),
        feature_paths=tuple(folder / "features" / f"{sid}.h5" for sid in ids),
        ckpt=folder / "ckpts" / ckpt_name,
        plist=folder / "process_lists" / "demo.csv",
        config_path=folder / "config.yaml",
        manifest_path=folder / "demo_manifest.json",
        preset_path=folder / "presets" / "demo.csv",
    )


def _reusable(layout: _Layout, manifest: dict[str, object]) -> bool:
    """A complete project made with the same parameters is there (its manifest is last)."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads(layout.manifest_path.read_text()) == manifest and all(
            p.is_file() for p in layout.outputs
        )
    return False


def _existing_slides(layout: _Layout, size: str, seed: int) -> tuple[DemoSlide, ...]:
    width, height = DEMO_SIZES[size]
    return tuple(
        DemoSlide(
            p,
            width,
            height,
            _PROJECT_MPP,
            _slide_seed(seed, i),
            layout.has_tumour[i],
            _pyramid_dims(width, height),
        )
        for i, p in enumerate(layout.slide_paths)
    )


def _new_slides_and_bags(
    layout: _Layout, size: str, seed: int, feature_dim: int
) -> tuple[tuple[DemoSlide, ...], tuple[DemoBag, ...]]:
    """Drop slides/features of ids no longer in the project, then render slides and features."""
    width, height = DEMO_SIZES[size]
    for sub, ext in (("slides", ".tiff"), ("features", ".h5")):
        for stale in (layout.folder / sub).glob(f"demo_*{ext}"):
            if stale.stem not in layout.ids:
                stale.unlink()
    slides = tuple(
        make_demo_slide(
            p,
            width=width,
            height=height,
            seed=_slide_seed(seed, i),
            mpp=_PROJECT_MPP,
            tumour=layout.has_tumour[i],
        )
        for i, p in enumerate(layout.slide_paths)
    )
    bags = tuple(
        make_demo_features(s, p, feature_dim=feature_dim, seed=_slide_seed(seed, i))
        for i, (s, p) in enumerate(zip(slides, layout.feature_paths, strict=True))
    )
    return slides, bags


def _train(
    layout: _Layout, bags: tuple[DemoBag, ...], model: str, seed: int, feature_dim: int
) -> None:
    """The checkpoint: CLAM's layout for clam_sb, MIL-Lab's for any other registered model."""
    train = _training_bags(
        [_read_features(b.path) for b in bags], [b.is_tumour for b in bags], layout.has_tumour, seed
    )
    if model == "clam_sb":
        train_demo_checkpoint(train, layout.ckpt, feature_dim=feature_dim, seed=seed)
    else:
        train_mil_lab_checkpoint(
            train, layout.ckpt, model=model, feature_dim=feature_dim, seed=seed
        )


def _write_lists_and_config(layout: _Layout, model: str, feature_dim: int) -> None:
    import yaml

    rows = "".join(f"{sid},{lab}\n" for sid, lab in zip(layout.ids, layout.labels, strict=True))
    write_text(layout.plist, "slide_id,label\n" + rows)
    write_text(layout.preset_path, _DEMO_PRESET)
    config = _demo_config(feature_dim)
    if model != "clam_sb":
        model_args = config["model_arguments"]
        assert isinstance(model_args, dict)
        model_args["ckpt_path"] = f"ckpts/{layout.ckpt.name}"
        model_args["model_type"] = mil_lab_demo_name(model)
        method = _drawable_method(model)
        if method is not None:
            heatmap_args = config["heatmap_arguments"]
            assert isinstance(heatmap_args, dict)
            heatmap_args["method"] = method
    header = "# clam-heat demo config: CLAM create_heatmaps.py blocks, paths relative here\n"
    write_text(layout.config_path, header + "---\n" + yaml.safe_dump(config, sort_keys=False))


def _drawable_method(model: str) -> str | None:
    """The method the demo draws ``model`` with when it has no attention map (``instance``
    where patches are scored alone, else integrated gradients); None keeps ``attention``."""
    from ..explain.registry import methods_for
    from ..models import get_model_spec

    spec = get_model_spec(model)
    if spec.has_attention:
        return None
    return "instance" if "instance" in methods_for(spec) else "integrated_gradients"


def _check_model(model: str) -> None:
    from ..errors import ConfigError
    from ..models import registered_models

    known = registered_models()
    if model not in known:
        raise ConfigError(f"--model {model!r}: must be a registered model ({', '.join(known)})")


def make_demo_project(
    folder: str | Path,
    *,
    n_slides: int = 5,
    size: Literal["tiny", "small", "large"] = "tiny",
    seed: int = 0,
    feature_dim: int | None = None,
    model: str = "clam_sb",
) -> DemoProject:
    """Write (or reuse) a complete CLAM-style demo project under ``folder``.

    Layout: ``slides/demo_NNN.tiff``, ``features/demo_NNN.h5`` (TRIDENT), ``ckpts/
    s_0_checkpoint.pt`` (CLAM_SB trained on these bags), ``process_lists/demo.csv``
    (``slide_id,label``), ``config.yaml`` (all paths relative to the folder) and an empty
    ``heatmaps/`` for outputs. Odd-numbered slides are tumour-free (label ``normal``).
    ``demo_manifest.json`` records the parameters; it is written last, so a call with the same
    parameters reuses a complete project and anything else regenerates it.

    ``model`` other than ``clam_sb`` (any registered model, e.g. ``abmil``) trains that model
    instead and saves it as MIL-Lab does, to ``ckpts/<model>_demo.pt``; the features are then
    512 wide (conch_v1's width) and the config names it ``<model>.base.conch_v1.demo``.
    ``feature_dim`` defaults to 64 for CLAM_SB.
    """
    if size not in DEMO_SIZES:
        raise ValueError(f"size must be one of {sorted(DEMO_SIZES)}, got {size!r}")
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    _check_model(model)
    if feature_dim is None:
        feature_dim = 64 if model == "clam_sb" else ENCODER_DIM_MAPPING[MIL_LAB_DEMO_ENCODER]
    layout = _layout(Path(folder), n_slides, model)
    manifest: dict[str, object] = {
        "format_version": DEMO_FORMAT_VERSION,
        "n_slides": n_slides,
        "size": size,
        "seed": seed,
        "feature_dim": feature_dim,
    }
    if model != "clam_sb":  # a CLAM demo's manifest stays as it was (reused as is)
        manifest["model"] = model
    if _reusable(layout, manifest):
        slides = _existing_slides(layout, size, seed)
        bags = tuple(_read_bag(s, p) for s, p in zip(slides, layout.feature_paths, strict=True))
    else:
        layout.manifest_path.unlink(missing_ok=True)
        slides, bags = _new_slides_and_bags(layout, size, seed, feature_dim)
        _train(layout, bags, model, seed, feature_dim)
        _write_lists_and_config(layout, model, feature_dim)
        (layout.folder / "heatmaps").mkdir(parents=True, exist_ok=True)
        write_text(layout.manifest_path, json.dumps(manifest, indent=2) + "\n")
    (layout.folder / "heatmaps").mkdir(parents=True, exist_ok=True)
    return DemoProject(
        folder=layout.folder,
        config_path=layout.config_path,
        slide_ids=layout.ids,
        labels=layout.labels,
        slide_paths=layout.slide_paths,
        feature_paths=layout.feature_paths,
        checkpoint_path=layout.ckpt,
        process_list_path=layout.plist,
        slides=slides,
        bags=bags,
    )
