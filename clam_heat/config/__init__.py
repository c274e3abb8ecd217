"""Load and check CLAM heatmap YAML configs (``create_heatmaps.py`` layout), unchanged.

A config has CLAM's seven blocks (``exp_arguments``, ``data_arguments``,
``patching_arguments``, ``encoder_arguments``, ``model_arguments``, ``heatmap_arguments``,
``sample_arguments``) with CLAM's key names; every key defaults to the value in CLAM's template,
so a CLAM config loads as it is. One optional block of our own, ``runner_arguments``, holds
clam-heat settings that CLAM has no key for.

Why a schema: CLAM reads the YAML into untyped namespaces, so a typo is ignored and a wrong value
surfaces as a crash deep in the slide loop. Here every block is a pydantic model with
``extra="forbid"`` and bounded fields, and *all* problems of a file are reported together in one
:class:`~clam_heat.errors.ConfigError`, each line naming file, YAML line, key path, value and rule:

    config.yaml:12 heatmap_arguments.alpah: unknown key (did you mean 'alpha'?)
    config.yaml:13 heatmap_arguments.alpha = 1.5: must be <= 1

Path resolution (values are stored on the model as absolute :class:`pathlib.Path`):

- an absolute path (``~`` expanded) is kept;
- a relative path resolves against the config file's folder if it exists there, otherwise
  against the current working directory (CLAM is CWD-relative, so CLAM configs run from the CLAM
  repo root keep working, and configs that ship next to their data also work). Output folders
  that do not exist yet therefore resolve against the CWD, like CLAM;
- a bare process-list name (no path separator, e.g. ``heatmap_demo_dataset.csv``) is searched in
  ``process_lists/`` and ``heatmaps/process_lists/`` under the config folder, then in CLAM's
  layout next to it (``<config folder>/../process_lists/``), then under the CWD, then in the
  config folder itself; if it is nowhere it resolves to ``<cwd>/process_lists/<name>`` (the
  process-list builder creates it there);
- a bare config name given to :func:`load_config` (e.g. ``clam_template.yaml``) is searched in
  ``.``, ``configs/`` and ``heatmaps/configs/`` under the CWD (see :func:`find_config`).

Validation checks values, not existence: a stage checks that a file exists when it needs it.

Overrides: CLAM's two CLI overrides (``save_exp_code``, ``overlap``) and any number of generic
``BLOCK.KEY=VALUE`` settings (the value is parsed as YAML) are validated like YAML values; their
errors name the override instead of a file line.

>>> cfg = config_from_dict({"heatmap_arguments": {"alpha": 0.5}})
>>> cfg.heatmap_arguments.alpha, cfg.patching_arguments.patch_size
(0.5, 256)
>>> config_from_dict({"heatmap_arguments": {"alpha": 1.5}})
Traceback (most recent call last):
...
clam_heat.errors.ConfigError: <dict> heatmap_arguments.alpha = 1.5: must be <= 1
"""

from __future__ import annotations

from .fields import CONFIG_SEARCH_DIRS, PROCESS_LIST_DIRS, SAVE_EXTS
from .loading import config_from_dict, find_config, load_config
from .schema import (
    BLOCK_NAMES,
    BLOCKS,
    CLAM_BLOCK_NAMES,
    DataArguments,
    EncoderArguments,
    ExpArguments,
    HeatmapArguments,
    HeatmapConfig,
    ModelArguments,
    PatchingArguments,
    RunnerArguments,
    SampleArguments,
    SampleSpec,
)

__all__ = [
    "BLOCKS",
    "CONFIG_SEARCH_DIRS",
    "PROCESS_LIST_DIRS",
    "SAVE_EXTS",
    "BLOCK_NAMES",
    "CLAM_BLOCK_NAMES",
    "DataArguments",
    "EncoderArguments",
    "ExpArguments",
    "HeatmapArguments",
    "HeatmapConfig",
    "ModelArguments",
    "PatchingArguments",
    "RunnerArguments",
    "SampleArguments",
    "SampleSpec",
    "config_from_dict",
    "find_config",
    "load_config",
]
