"""``clam-heat quick``: a run without YAML, taking MIL-Lab generate_heatmaps.py's flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ClamHeatError, counted
from .app import QuietOpt, RetryFailedOpt, SetOpt, WorkersOpt, app
from .output import fail
from .progress import run_with_progress


@app.command()
def quick(
    ckpt: Annotated[
        Path,
        typer.Option(
            "--ckpt",
            "--checkpoint",
            help="Trained model: CLAM s_<fold>_checkpoint.pt, model.safetensors or a MIL-Lab "
            "save_pretrained folder.",
        ),
    ],
    h5_dir: Annotated[
        Path,
        typer.Option("--h5-dir", "--h5_dir", help="Feature files <slide_id>.h5 (TRIDENT or CLAM)."),
    ],
    slide_dir: Annotated[
        Path, typer.Option("--slide-dir", "--slide_dir", help="Folder of the slides.")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "--output_dir",
            "--output-dir",
            help="Output folder (config.yaml, process list, heatmaps, heatmap_results.csv).",
        ),
    ],
    model_type: Annotated[
        str,
        typer.Option(
            "--model-type",
            "--model_type",
            "--model_name",
            "--model-name",
            help="clam_sb, clam_mb, abmil, a MIL-Lab name (abmil.base.uni_v2.pc108-24k), ...",
        ),
    ] = "clam_sb",
    model_size: Annotated[str, typer.Option("--model-size", help="small or big.")] = "small",
    n_classes: Annotated[
        int | None,
        typer.Option(
            "--n-classes",
            "--num_classes",
            "--num-classes",
            min=2,
            help="Classes (default: read from the checkpoint).",
        ),
    ] = None,
    embed_dim: Annotated[
        int | None,
        typer.Option(
            "--embed-dim", "--embed_dim", min=1, help="Feature width (default: read from the H5s)."
        ),
    ] = None,
    slide_ext: Annotated[
        str | None,
        typer.Option(
            "--slide-ext",
            "--slide_ext",
            help="Slide extension (default: the one the slides share).",
        ),
    ] = None,
    labels: Annotated[
        Path | None, typer.Option("--labels", help="CSV slide_id,label (default: no labels).")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="Only the first N slides, in sorted order."),
    ] = None,
    csv: Annotated[
        Path | None,
        typer.Option(
            "--csv",
            help="Only the slide ids in this CSV's slide_id column (its label column, "
            "if any, sets labels).",
        ),
    ] = None,
    cmap: Annotated[str, typer.Option("--cmap", help="Matplotlib colormap.")] = "jet",
    alpha: Annotated[
        float,
        typer.Option("--alpha", min=0.0, max=1.0, help="Heatmap weight over the slide."),
    ] = 0.5,
    vis_level: Annotated[
        int,
        typer.Option(
            "--vis-level", "--vis_level", min=-1, help="Slide level of the image; -1: auto."
        ),
    ] = -1,
    segment: Annotated[
        bool,
        typer.Option(
            "--segment/--no-segment",
            " /--no_segment",
            help="Mask the heatmap to detected tissue (off, as MIL-Lab's script).",
        ),
    ] = False,
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            help="Attribution method(s): attention, contribution, gradient_x_input, "
            "integrated_gradients, occlusion, instance; repeat or comma-separate.",
        ),
    ] = None,
    workers: WorkersOpt = None,
    set_: SetOpt = None,
    retry_failed: RetryFailedOpt = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Write config.yaml and the list; print what would run."),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Run without YAML: infer the config from the files, save it as OUT/config.yaml, run it.

    Takes MIL-Lab generate_heatmaps.py's flags too, and writes its outputs
    (OUT/<slide_id>_heatmap.png, OUT/heatmap_results.csv) beside CLAM's layout.
    """
    from ..quick import QuickOptions

    options = QuickOptions(
        ckpt=ckpt,
        h5_dir=h5_dir,
        slide_dir=slide_dir,
        out=out,
        model_type=model_type,
        model_size=model_size,
        n_classes=n_classes,
        embed_dim=embed_dim,
        slide_ext=slide_ext,
        labels=labels,
        workers=workers or 1,
        sets=set_ or [],
        limit=limit,
        csv=csv,
        cmap=cmap,
        alpha=alpha,
        vis_level=vis_level,
        segment=segment,
        method=[m.strip() for value in method or [] for m in value.split(",") if m.strip()],
    )
    plan, pool = _quick_plan(options)
    summary = _quick_run(plan, pool, retry_failed=retry_failed, dry_run=dry_run, quiet=quiet)
    if not dry_run:
        _quick_mil_lab_outputs(plan)
    if not summary.ok:
        raise typer.Exit(1)


def _quick_plan(options: Any) -> tuple[Any, Any]:
    """Step 1: config and process list written (nothing when refused), warnings shown."""
    from ..executors import make_executor
    from ..quick import prepare_quick

    try:
        plan = prepare_quick(options)
        pool = make_executor(workers=plan.config.runner_arguments.workers)
    except ClamHeatError as err:
        fail(err)
    for line in plan.warnings:
        typer.echo(f"warning: {line}", err=True)
    typer.echo(f"config: {plan.config_path} (same run: clam-heat run {plan.config_path})")
    return plan, pool


def _quick_run(plan: Any, pool: Any, *, retry_failed: bool, dry_run: bool, quiet: bool) -> Any:
    """Step 2: the ordinary run of that config."""
    import functools

    from ..runner import run_pipeline

    runner = functools.partial(run_pipeline, executor=pool)
    return run_with_progress(
        plan.config, retry_failed=retry_failed, dry_run=dry_run, quiet=quiet, runner=runner
    )


def _quick_mil_lab_outputs(plan: Any) -> None:
    """Step 3: MIL-Lab's files (OUT/<id>_heatmap.png, OUT/heatmap_results.csv)."""
    from ..quick import write_mil_lab_outputs

    try:
        written = write_mil_lab_outputs(plan.config, plan.config_path.parent, plan.slide_ids)
    except ClamHeatError as err:
        fail(err)
    typer.echo(f"MIL-Lab results: {written.csv_path} ({counted(written.rows, 'slide')})")
