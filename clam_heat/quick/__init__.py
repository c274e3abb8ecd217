"""The quick path: turn four folders/files given as flags into a normal :class:`HeatmapConfig`.

``clam-heat quick --ckpt CKPT --h5-dir FEATURES --slide-dir SLIDES --out OUT`` needs no YAML;
MIL-Lab's ``generate_heatmaps.py`` flags (``--checkpoint --h5_dir --slide_dir --output_dir
--slide_ext --limit --csv --cmap --alpha --vis_level --model_name --num_classes --no_segment``)
are accepted too, and its outputs (``OUT/<slide_id>_heatmap.png``, ``OUT/heatmap_results.csv``)
are written beside CLAM's layout (:mod:`.outputs`).
Everything else starts at CLAM's template values (the schema defaults of :mod:`clam_heat.config`)
and what can be read from the inputs is read rather than asked for:

- ``embed_dim``: the width of ``features`` in the first feature H5;
- ``n_classes``: the classifier head of the checkpoint;
- ``slide_ext``: the one extension shared by the slides whose stem matches an H5 stem;
- the slides: the H5 stems that have a slide file (unmatched H5s and slides are warnings);
- ``label_dict``: the labels of ``--labels`` (``slide_id,label``), else one name per class index
  (rows then have no ``label`` column, which CLAM files under ``Unspecified``).

Why a config and not a separate code path: the result is written to ``OUT/config.yaml`` (and the
slide list to ``OUT/process_list.csv``) before anything runs, so the run is the ordinary
``run`` pipeline with its ledger, a rerun of the same command resumes, and the user can switch to
``clam-heat run OUT/config.yaml`` and edit YAML whenever flags stop being enough.

Quick-path choices that differ from the template, because only features are given:
``heatmap_arguments.calc_heatmap`` is false (the fine pass needs encoder weights) and
``save_exp_code`` is ``quick``. Any key can still be set with ``--set BLOCK.KEY=VALUE``.
Input problems raise :class:`~clam_heat.errors.ConfigError` (exit code 2) naming the flag, the
file and the fix.
"""

from .build import QUICK_HEADER, QuickOptions, QuickPlan, build_quick_config, prepare_quick
from .inputs import (
    checkpoint_classes,
    feature_width,
    label_dict_for,
    match_slides,
    read_labels,
    read_slide_table,
    select_slides,
)
from .outputs import MIL_LAB_CSV, MilLabOutputs, mil_lab_heatmap_path, write_mil_lab_outputs

__all__ = [
    "MIL_LAB_CSV",
    "QUICK_HEADER",
    "MilLabOutputs",
    "QuickOptions",
    "QuickPlan",
    "build_quick_config",
    "checkpoint_classes",
    "feature_width",
    "label_dict_for",
    "match_slides",
    "mil_lab_heatmap_path",
    "prepare_quick",
    "read_labels",
    "read_slide_table",
    "select_slides",
    "write_mil_lab_outputs",
]
