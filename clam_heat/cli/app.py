"""The ``clam-heat`` Typer app and what its commands share: option types, loading a config
with the command line's overrides, and the run log.

Commands live in the modules beside this one, one per group; :mod:`clam_heat.cli` imports them
so that each registers itself on :data:`app`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # plain help: rich's boxed table cuts option names (--model_name ...) at 80 columns
    rich_markup_mode=None,
    help="Resumable, CLAM-compatible attention heatmaps for MIL models on whole-slide images.",
)


ConfigArg = Annotated[
    str, typer.Argument(help="YAML config (path, or a name found in configs/ or heatmaps/configs/)")
]
SaveExpOpt = Annotated[
    str | None,
    typer.Option(
        "--save_exp_code", "--save-exp-code", help="Override exp_arguments.save_exp_code."
    ),
]

OverlapOpt = Annotated[
    float | None,
    typer.Option("--overlap", help="Override patching_arguments.overlap."),
]

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any key: --set heatmap_arguments.alpha=0.5 (repeatable)."),
]

QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]

RetryFailedOpt = Annotated[bool, typer.Option("--retry-failed", help="Rerun rows marked failed.")]

WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", min=1, help="Local worker processes (default: the config's, or 1)."),
]

# Where `run` sends its rows (clam_heat.executors).
ExecutorOpt = Annotated[
    str | None, typer.Option("--executor", help="local (default), dask or serial.")
]

SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduler", help="Dask scheduler address, e.g. tcp://HOST:8786 (implies dask)."
    ),
]

SchedulerFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--scheduler-file", help="Dask scheduler JSON file on shared storage (implies dask)."
    ),
]

ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard", help="Run shard i of n (i/n, from 0) into <list>.shard-i-of-n.csv; see `merge`."
    ),
]


def load_cli_config(
    config: str, save_exp_code: str | None, overlap: float | None, sets: list[str] | None
) -> Any:
    from ..config import find_config, load_config

    return load_config(
        find_config(config), overrides=sets or [], save_exp_code=save_exp_code, overlap=overlap
    )


def setup_logging(log_file: Path | None, quiet: bool, level: str = "INFO") -> None:
    root = logging.getLogger("clam_heat")
    root.setLevel(getattr(logging, level, logging.INFO))
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.propagate = False
