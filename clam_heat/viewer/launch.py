"""``clam-heat view``'s three modes, wired: entries, the app and its server."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ProcessListError
from .app import ViewerApp
from .entries import ViewerEntry, compare_entries, pair_entry, viewer_entries
from .server import ViewerServer

if TYPE_CHECKING:
    from ..config import HeatmapConfig

__all__ = ["open_viewer", "run_app"]


def run_app(cfg: HeatmapConfig, entries: list[ViewerEntry], config: str) -> ViewerApp:
    """The app over a run: its production style, caches under its production root, notes in
    ``<results>/<list>_review.csv``."""
    from ..rows import cohort_scores_path, output_roots
    from .maps import production_style
    from .review import review_path

    return ViewerApp(
        entries,
        title=cfg.exp_arguments.save_exp_code,
        base_style=production_style(cfg, 0),
        cache_dir=output_roots(cfg)[1] / ".viewer",
        review=review_path(Path(cfg.results_csv_path), cfg.process_list_path),
        cohort_file=cohort_scores_path(cfg),
        run_hint=f"clam-heat run {config}",
    )


def open_viewer(
    config: str | None,
    *,
    slide: str | None,
    heatmap: Path | None,
    cmap: str | None,
    compare: str | None,
    host: str,
    port: int,
    save_exp_code: str | None = None,
    sets: list[str] | None = None,
) -> tuple[ViewerServer, str | None, list[ViewerEntry]]:
    """A run (``config``), a pair (``slide`` file + ``heatmap`` image, no config) or two runs
    (``config`` + ``compare``) -> (server, slide id to open first, entries). ``config`` is
    loaded as ``run`` loads it, with ``save_exp_code`` and the ``--set`` overrides ``sets``."""
    if heatmap is not None or config is None:
        if heatmap is None or slide is None or config is not None:
            raise ProcessListError(
                "view: pass a run's CONFIG, or --slide SLIDE_FILE --heatmap IMAGE (not both)"
            )
        entries = [pair_entry(Path(slide), heatmap, cmap)]
        app = ViewerApp(entries, title=heatmap.name, run_hint="clam-heat quick")
        return ViewerServer(app, host=host, port=port), entries[0].slide_id, entries
    from ..config import find_config, load_config

    cfg = load_config(find_config(config), overrides=sets or [], save_exp_code=save_exp_code)
    entries = viewer_entries(cfg)
    if slide is not None and slide not in {e.slide_id for e in entries}:
        raise ProcessListError(
            f"--slide {slide!r} is not a row (process == 1) of {cfg.process_list_path}"
        )
    if compare is not None:
        entries = compare_entries(entries, find_config(config), find_config(compare))
    app = run_app(cfg, entries, config)
    return ViewerServer(app, host=host, port=port), slide, entries
