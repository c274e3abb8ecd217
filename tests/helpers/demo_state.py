"""What several test files read back from a run of the demo project: its row contexts and the
records of its done stages (to tell a rerun from a skip), plus the overrides that switch the
demo to the built-in ``tiny_cnn`` patch encoder (the encoder path without downloads).

Importable by name: ``tests/conftest.py`` puts ``tests/helpers`` on ``sys.path``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: The demo's encoder switched to the seeded built-in CNN (64 px inputs, 64-d like the demo bags).
TINY_ENCODER = [
    "encoder_arguments.model_name=tiny_cnn",
    "encoder_arguments.target_img_size=64",
    "exp_arguments.batch_size=64",
]


def row_contexts(cfg: Any) -> list[Any]:
    """The run's row contexts, from its process list as the runner would build it."""
    from clam_heat.process_list import build_process_list
    from clam_heat.rows import build_contexts

    df, _ = build_process_list(cfg, write=False)
    return build_contexts(cfg, df)


def done_stages(cfg: Any) -> dict[tuple[str, str], str]:
    """(slide id, stage) -> that done stage's whole ledger record as JSON text: a rerun changes
    it (fingerprint, finish time, output identities), a skipped stage leaves it byte for byte."""
    root = Path(cfg.exp_arguments.raw_save_dir) / cfg.exp_arguments.save_exp_code
    return {
        (path.name.split(".")[0], stage): json.dumps(record, sort_keys=True)
        for path in root.rglob("*.ledger.json")
        for stage, record in json.loads(path.read_text())["stages"].items()
        if record.get("state") == "done"
    }
