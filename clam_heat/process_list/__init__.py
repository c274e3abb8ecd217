"""The process list: one CSV row per slide, CLAM's columns plus our status columns.

CLAM's ``create_heatmaps.py`` builds this table from a folder listing or a user CSV, fills the
segmentation/filter/vis/patch defaults from a preset (docs/rules/heatmaps.md#presets) and lets any
row override them (docs/rules/heatmaps.md#per-row-overrides). clam-heat keeps that file format, so a
CLAM list works here and ours works in CLAM, and adds the bookkeeping CLAM lacks: ``status``
(tbp/running/done/failed/skipped, CLAM's 'tbp' kept), ``stage`` (last completed stage), ``error``
(one line), ``updated_at`` (ISO timestamp) and ``missing`` (the slide file is gone).

Building is idempotent: a rerun merges with the list already on disk, so no status, user column
or hand edit is lost, new slides are appended and vanished slides are flagged rather than
dropped. Rendering is deterministic and writes are atomic, so an unchanged list stays
byte-identical and a crash never leaves a half-written CSV.

Rooms: :mod:`.columns` (CLAM's columns, presets, per-row overrides, casting, result columns),
:mod:`.build` (build / read / merge the list), :mod:`.csvfile` (reading, the atomic writer),
:mod:`.record` (the one writer's recorder), :mod:`.shards` (``--shard i/n`` and ``merge``).
"""

from __future__ import annotations

from .build import (
    build_process_list,
    build_process_list_from,
    read_process_list,
    slide_path_for_row,
)
from .columns import (
    CLAM_COLUMNS,
    FILTER_KEYS,
    PATCH_KEYS,
    PRESET_KEYS,
    PRESETS_DIR,
    SEG_KEYS,
    STATUS_COLUMNS,
    STATUSES,
    VIS_KEYS,
    builtin_defaults,
    failed_rows,
    initialize_columns,
    load_preset,
    normalize_slide_id,
    row_params,
    status_summary,
)
from .csvfile import write_csv_atomic
from .record import Recorder, update_row
from .results import (
    ATTENTION_COLUMNS,
    PREDICTION_COLUMN,
    RUN_COLUMNS,
    is_result_column,
    is_run_column,
    result_columns,
)
from .shards import (
    MergeReport,
    find_shards,
    merge_process_list,
    merge_shards,
    parse_shard,
    select_shard,
    shard_frame,
    shard_of,
    shard_path,
)

__all__ = [
    "ATTENTION_COLUMNS",
    "CLAM_COLUMNS",
    "FILTER_KEYS",
    "PATCH_KEYS",
    "PREDICTION_COLUMN",
    "PRESETS_DIR",
    "PRESET_KEYS",
    "RUN_COLUMNS",
    "SEG_KEYS",
    "STATUSES",
    "STATUS_COLUMNS",
    "VIS_KEYS",
    "MergeReport",
    "Recorder",
    "build_process_list",
    "build_process_list_from",
    "builtin_defaults",
    "failed_rows",
    "find_shards",
    "initialize_columns",
    "is_result_column",
    "is_run_column",
    "load_preset",
    "merge_process_list",
    "merge_shards",
    "normalize_slide_id",
    "parse_shard",
    "read_process_list",
    "result_columns",
    "row_params",
    "select_shard",
    "shard_frame",
    "shard_of",
    "shard_path",
    "slide_path_for_row",
    "status_summary",
    "update_row",
    "write_csv_atomic",
]
