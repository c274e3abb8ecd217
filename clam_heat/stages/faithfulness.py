"""``faithfulness``: deletion and insertion curves of each asked method's map, against seeded
random orders (:mod:`clam_heat.explain.faithfulness`), for the predicted class.

Writes ``<raw>/<id>_faithfulness.json`` (the curves) and returns the areas as the results
columns ``faith_<method>_deletion``, ``faith_<method>_insertion``, ``faith_random_deletion``
and ``faith_random_insertion``. The random orders are seeded from the slide id, so serial,
local and Dask runs write the same bytes.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

from ..config import HeatmapConfig
from ..ledger import file_identity
from ..rows import RowContext, blockmap_h5_path, faithfulness_json_path, method_scores_h5_path
from .base import Stage, StageRun, base_fingerprint

__all__ = ["FaithfulnessStage", "slide_seed"]


def slide_seed(slide_id: str) -> int:
    """The random orders' seed of a slide (CRC-32 of its id: the same in every process)."""
    return zlib.crc32(slide_id.encode("utf-8"))


class FaithfulnessStage(Stage):
    name = "faithfulness"
    depends_on = ("infer", "explain")
    needs_model = True
    preload = ("clam_heat.explain", "clam_heat.features")

    def enabled(self, cfg: HeatmapConfig) -> bool:
        return cfg.heatmap_arguments.faithfulness_on()

    def fingerprint(self, ctx: RowContext) -> dict[str, Any]:
        from .infer import _features_path

        hm = ctx.cfg.heatmap_arguments
        return base_fingerprint(
            methods=hm.methods(),
            steps=hm.faithfulness_steps,
            random=hm.faithfulness_random,
            options=[hm.ig_steps, hm.ig_baseline, hm.occlusion_group, hm.classes],
            model=ctx.cfg.block("model_arguments"),
            checkpoint=file_identity(Path(ctx.cfg.model_arguments.ckpt_path)),
            features=file_identity(_features_path(ctx)),
        )

    def outputs(self, ctx: RowContext) -> dict[str, Path]:
        return {"curves": faithfulness_json_path(ctx)}

    def run(self, ctx: RowContext) -> StageRun:
        from ..atomic import atomic_path
        from ..explain import Bag, explain_bag
        from ..explain.faithfulness import faithfulness_curves
        from ..h5io import read_scores
        from ..models.inference import _as_bag, fixed_threads
        from .explain import explain_options
        from .infer import load_row_bag
        from .resources import model_for

        hm = ctx.cfg.heatmap_arguments
        bag = load_row_bag(ctx, None)
        model, _ = model_for(ctx.cfg)
        with fixed_threads():
            seen = Bag(model, _as_bag(model, bag.features, None, "cpu"))
            from ..explain.compute import predicted

            target = predicted(seen)
            maps = {}
            for method in hm.methods():
                path = (
                    blockmap_h5_path(ctx)
                    if method == "attention"
                    else method_scores_h5_path(ctx, method)
                )
                if hm.classes == "predicted" and path.is_file():
                    maps[method] = read_scores(path)[0]
                else:  # per-class maps were drawn: score the predicted class's map here
                    one = explain_bag(
                        model,
                        bag.features,
                        [method],
                        targets=[target],
                        options=explain_options(ctx.cfg),
                        coords=bag.coords_l0,
                        patch_size=int(bag.patch_size_l0),
                    )
                    maps[method] = one[(method, target)].scores
            curves = faithfulness_curves(
                seen,
                maps,
                target,
                steps=hm.faithfulness_steps,
                n_random=hm.faithfulness_random,
                seed=slide_seed(ctx.slide_id),
            )
        result: dict[str, Any] = {}
        body: dict[str, Any] = {"target": target, "steps": hm.faithfulness_steps, "curves": {}}
        for name, c in curves.items():
            result[f"faith_{name}_deletion"] = round(c.deletion_auc, 6)
            result[f"faith_{name}_insertion"] = round(c.insertion_auc, 6)
            body["curves"][name] = {
                "deletion": [round(float(v), 6) for v in c.deletion],
                "insertion": [round(float(v), 6) for v in c.insertion],
                "deletion_auc": round(c.deletion_auc, 6),
                "insertion_auc": round(c.insertion_auc, 6),
            }
        out = faithfulness_json_path(ctx)
        with atomic_path(out) as tmp:
            Path(tmp).write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
        return StageRun([out], result)
