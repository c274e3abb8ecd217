"""Cost of the attribution methods (docs/explanations.md): CPU seconds of each method for each
model as a ratio to that model's attention pass, measured in the same run, and peak RSS of one
method on a large bag (each in a fresh process).

    python bench/explain.py                       # 15,000 x 1,024, clam_sb and abmil
    python bench/explain.py --models clam_sb abmil transmil --patches 15000
    python bench/explain.py --rss --patches 100000 # peak RSS per method, one process each

Goals (CLAM_SB and ABMIL, 2-core machine): contribution <= 1.5x, gradient_x_input <= 4x,
integrated_gradients (32 steps) <= 100x, faithfulness (20 steps, 3 random orders) <= 60x,
peak RSS <= 2 GB at 100,000 patches. Not a test: numbers go in docs/explanations.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from clam_heat.explain import Bag, ExplainOptions, explain_bag
from clam_heat.explain.faithfulness import faithfulness_curves
from clam_heat.explain.registry import methods_for
from clam_heat.models import build_model, get_model_spec, run_attention
from clam_heat.models.inference import fixed_threads

METHODS = ("contribution", "gradient_x_input", "integrated_gradients", "occlusion", "instance")


def _bag(n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(n)))
    coords = np.stack(np.divmod(np.arange(n), side), axis=1)[:, ::-1] * 256
    return rng.standard_normal((n, dim), dtype=np.float32), coords  # no float64 copy


def _model(name: str, dim: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, n_classes=2, embed_dim=dim).eval()


def _cpu(fn: object) -> float:
    start = time.process_time()
    fn()  # type: ignore[operator]
    return time.process_time() - start


def ratios(name: str, n: int, dim: int) -> dict[str, float]:
    """CPU seconds of the attention pass and each method's ratio to it."""
    model = _model(name, dim)
    x, coords = _bag(n, dim)
    base = _cpu(lambda: run_attention(model, x))
    out: dict[str, float] = {"attention_cpu_s": round(base, 3)}
    options = ExplainOptions()
    applicable = [m for m in METHODS if m in methods_for(get_model_spec(name))]
    for method in applicable:
        seconds = _cpu(
            lambda m=method: explain_bag(
                model, x, [m], targets=[1], options=options, coords=coords, patch_size=256
            )
        )
        out[method] = round(seconds / base, 2)
    maps = {"attention": run_attention(model, x).attention}

    def faith() -> None:
        with fixed_threads():
            bag = Bag(model, torch.from_numpy(x))
            faithfulness_curves(bag, maps, 1, steps=20, n_random=3, seed=0)

    out["faithfulness"] = round(_cpu(faith) / base, 2)
    return out


def one_rss(name: str, method: str, n: int, dim: int) -> float:
    """Peak RSS (MB) of a fresh process computing one method on an n-patch bag."""
    model = _model(name, dim)
    x, coords = _bag(n, dim)
    if method == "faithfulness":
        maps = {"attention": run_attention(model, x).attention}
        with fixed_threads():
            faithfulness_curves(Bag(model, torch.from_numpy(x)), maps, 1, steps=20, n_random=3)
    elif method == "attention":
        run_attention(model, x)
    else:  # memory does not grow with the steps (one step per forward): 2 steps suffice
        options = ExplainOptions(ig_steps=2)
        explain_bag(model, x, [method], targets=[1], options=options, coords=coords, patch_size=256)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["clam_sb", "abmil"])
    parser.add_argument("--patches", type=int, default=15_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--rss", action="store_true", help="peak RSS per method instead")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps({"rss_mb": round(one_rss(*args.one, args.patches, args.dim), 1)}))
        return
    for name in args.models:
        if not args.rss:
            print(
                json.dumps(
                    {"model": name, "patches": args.patches, **ratios(name, args.patches, args.dim)}
                )
            )
            continue
        for method in (
            "attention",
            *[m for m in METHODS if m in methods_for(get_model_spec(name))],
            "faithfulness",
        ):
            cmd = [
                sys.executable,
                __file__,
                "--one",
                name,
                method,
                "--patches",
                str(args.patches),
                "--dim",
                str(args.dim),
            ]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            print(
                json.dumps(
                    {"model": name, "method": method, "patches": args.patches, **json.loads(line)}
                )
            )


if __name__ == "__main__":
    main()
