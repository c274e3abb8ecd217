"""Looking at a run: ``view`` (the cohort page and live maps) and ``render`` (a region's map)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ClamHeatError
from .app import ConfigArg, SaveExpOpt, SetOpt, app
from .output import fail


@app.command()
def view(
    config: Annotated[
        str | None,
        typer.Argument(help="YAML config of a run (omit with --slide FILE --heatmap IMAGE)."),
    ] = None,
    save_exp_code: SaveExpOpt = None,
    set_: SetOpt = None,
    slide: Annotated[
        str | None,
        typer.Option(
            "--slide", help="Open this slide_id first; with --heatmap, the slide file to view."
        ),
    ] = None,
    heatmap: Annotated[
        Path | None,
        typer.Option(
            "--heatmap", help="A heatmap image (PNG, JPEG, TIFF, pyramid) to view beside --slide."
        ),
    ] = None,
    cmap: Annotated[
        str | None,
        typer.Option(
            "--cmap", help="With --heatmap: its colormap, when the image does not record it."
        ),
    ] = None,
    compare: Annotated[
        str | None,
        typer.Option("--compare", help="A second run's config: show A | B | A - B panes."),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (0.0.0.0 to share on a network).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, help="Port; 0 picks a free one.")] = 8765,
    open_browser: Annotated[
        bool, typer.Option("--open", help="Open the page in the default web browser.")
    ] = False,
) -> None:
    """Serve the run's slides and heatmaps side by side, panning and zooming together; or one
    slide beside one heatmap image (--slide FILE --heatmap IMAGE); or two runs (--compare)."""
    from urllib.parse import quote

    from ..viewer import open_viewer

    try:
        server, slide, entries = open_viewer(
            config,
            slide=slide,
            heatmap=heatmap,
            cmap=cmap,
            compare=compare,
            host=host,
            port=port,
            save_exp_code=save_exp_code,
            sets=set_,
        )
    except ClamHeatError as err:
        fail(err)
    url = server.url + (f"view/{quote(slide)}" if slide else "")
    drawn = sum(bool(e.maps) or e.image is not None for e in entries)
    typer.echo(f"viewer: {url} ({len(entries)} slides, {drawn} with heatmaps; Ctrl-C to stop)")
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


@app.command()
def render(
    config: ConfigArg,
    slide: Annotated[str, typer.Option("--slide", help="The row's slide_id.")],
    out: Annotated[Path, typer.Option("--out", help="Image to write (.png, .jpg, .tiff).")],
    region: Annotated[
        str | None, typer.Option("--region", help="X,Y,W,H in level-0 pixels (default: all).")
    ] = None,
    level: Annotated[int, typer.Option("--level", help="Pyramid level; -1: vis_level.")] = -1,
    map_name: Annotated[str | None, typer.Option("--map", help="Map (default attention).")] = None,
    cmap: Annotated[str | None, typer.Option("--cmap", help="Matplotlib colormap.")] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", help="Heatmap opacity.")] = None,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="Hide scores below (0-1 of the scale).")
    ] = None,
    overlay: Annotated[
        bool, typer.Option("--overlay/--no-overlay", help="Blend over the slide (or white).")
    ] = True,
    legend: Annotated[bool, typer.Option("--legend", help="Add a colour bar below.")] = False,
) -> None:
    """Draw one region of a row's heatmap at any level from its scores (figures, ROI maps)."""
    from ..config import find_config, load_config
    from ..viewer.maps import check_region, render_region

    picked = {"cmap": cmap, "alpha": alpha, "threshold": threshold}
    try:
        path, meta = render_region(
            load_config(find_config(config)),
            slide,
            region=check_region(region) if region else None,
            level=level,
            out=out,
            map_name=map_name,
            overrides={k: v for k, v in picked.items() if v is not None},
            overlay=overlay,
            legend=legend,
        )
    except ClamHeatError as err:
        fail(err)
    typer.echo(f"{path}: {meta['map']} ({meta['scale']}, {meta['cmap']})")
