"""The driver's experiment-tracker hook (``runner_arguments.tracker``).

:class:`RunTracking` wraps one ``clam-heat run`` in a :mod:`clam_heat.trackers` run: on entry it
logs the resolved config; :meth:`RunTracking.on_row` logs each finished row's result columns
(CLAM's ``bag_size``, ``Pred_c``, ``p_c`` and the attention statistics), seconds and production
heatmap thumbnail (a failed row as its status and error); on a clean exit it logs the results
CSV and the resolved config as artifacts. It lives in the driver only: workers return outcomes,
so no tracker object crosses a process boundary. A tracker never fails the run after it started.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .config import HeatmapConfig
from .process_list.results import result_columns
from .rows import RowContext, production_heatmap_path, resolved_config_path
from .stages.row import RowOutcome
from .trackers import Tracker, make_tracker

__all__ = ["RunTracking"]


class RunTracking:
    """Context manager: ``with RunTracking(cfg, contexts, shard) as track: track.on_row(o)``."""

    def __init__(
        self,
        cfg: HeatmapConfig,
        contexts: list[RowContext],
        *,
        results_csv: Path,
        shard: tuple[int, int] | None = None,
    ) -> None:
        exp, runner = cfg.exp_arguments, cfg.runner_arguments
        self.cfg = cfg
        self.results_csv = Path(results_csv)
        self.by_id = {ctx.slide_id: ctx for ctx in contexts}
        run_name = f"{exp.save_exp_code}-{time.strftime('%Y%m%d-%H%M%S')}"
        if shard is not None:
            run_name += f"-shard-{shard[0]}-of-{shard[1]}"
        # built before any work: a missing extra or a refused store stops the run with one line
        self.tracker: Tracker = make_tracker(
            runner.tracker,
            run_name=run_name,
            project=exp.save_exp_code,
            directory=Path(exp.raw_save_dir) / exp.save_exp_code,
            uri=runner.tracker_uri,
        )

    def __enter__(self) -> RunTracking:
        self.tracker.__enter__()
        self.tracker.log_config(self.cfg.to_yaml_dict())
        return self

    def on_row(self, outcome: RowOutcome) -> None:
        """Log one recorded row."""
        if outcome.status != "done":
            self.tracker.log_slide(
                outcome.slide_id, {"status": outcome.status, "error": outcome.error}, None
            )
            return
        metrics: dict[str, Any] = {"status": "done", "seconds": round(outcome.seconds, 3)}
        if outcome.result:
            metrics.update(result_columns(outcome.result, self.cfg.exp_arguments.n_classes))
        ctx = self.by_id.get(outcome.slide_id)
        shot = production_heatmap_path(ctx) if ctx is not None else None
        self.tracker.log_slide(outcome.slide_id, metrics, shot if shot and shot.is_file() else None)

    def __exit__(self, et: Any, e: BaseException | None, tb: Any) -> None:
        if et is None:
            if self.results_csv.is_file():
                self.tracker.log_artifact(self.results_csv)
            config = resolved_config_path(self.cfg)
            if config.is_file():
                self.tracker.log_artifact(config, "config.yaml")
        self.tracker.__exit__(et, e, tb)
