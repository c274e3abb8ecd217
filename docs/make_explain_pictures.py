"""Picture of issue 22 from the demo: ``python docs/make_explain_pictures.py``.

Writes docs/img/explain_attention_vs_contribution.png (attention next to the signed
contribution map of one demo slide, and the cohort's faithfulness plot) from a fresh 5-slide
demo in a temp folder.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import numpy as np
from picture_tools import labelled, read_at_height

from clam_heat.config import load_config
from clam_heat.demo import make_demo_project
from clam_heat.process_list import build_process_list
from clam_heat.rows import build_contexts, method_heatmap_path, production_heatmap_path
from clam_heat.runner import run_pipeline

OUT = Path(__file__).resolve().parent / "img"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "demo"
        make_demo_project(folder, n_slides=5, size="tiny")
        cfg = load_config(
            folder / "config.yaml",
            overrides=[
                "heatmap_arguments.method=[attention, contribution, integrated_gradients]",
                "heatmap_arguments.vis_level=0",
            ],
        )
        assert run_pipeline(cfg).ok
        df, _ = build_process_list(cfg, write=False)
        ctx = build_contexts(cfg, df)[0]
        panels = [
            labelled(
                read_at_height(production_heatmap_path(ctx), 300),
                f"{ctx.slide_id}: attention (jet)",
            ),
            labelled(
                read_at_height(method_heatmap_path(ctx, "contribution"), 300),
                "contribution (RdBu_r, 0 = white)",
            ),
        ]
        gap = np.full((panels[0].shape[0], 8, 3), 255, np.uint8)
        row = np.hstack([panels[0], gap, panels[1]])
        plot = cfg.results_csv_path.with_name(f"{cfg.results_csv_path.stem}_faithfulness.png")
        faith = read_at_height(plot, height=int(row.shape[1] * 360 / 900))
        pad = np.full((faith.shape[0], max(0, row.shape[1] - faith.shape[1]), 3), 255, np.uint8)
        picture = np.vstack([row, np.hstack([faith, pad])[:, : row.shape[1]]])
        OUT.mkdir(exist_ok=True)
        out = OUT / "explain_attention_vs_contribution.png"
        cv2.imwrite(str(out), picture, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        print(out)


if __name__ == "__main__":
    main()
