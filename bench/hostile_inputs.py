"""Peak memory and time of hostile or broken inputs (docs/reliability.md): each case runs in a fresh
subprocess and reports its ``VmHWM`` (peak RSS) and wall time, so the numbers are the case's own.

    python bench/hostile_inputs.py            # all cases, one JSON line each
    python bench/hostile_inputs.py --patches 200000 --width 1024   # another bag size

Cases:

- ``header_10M``: an 8 KB H5 whose ``features`` declares 10,000,000 x 64 float32 rows beside 59
  coords, through :func:`clam_heat.features.load_bag` (refused by ``max_patches``).
- ``header_10M_within_max``: the same with ``max_patches`` 20,000,000 (refused by the count
  check, still before any read).
- ``bag_1M`` / ``bag_1M_unchunked``: a consistent bag of ``--patches`` x ``--width`` features
  through ``load_bag`` and :func:`clam_heat.models.run_attention` on a CLAM_SB (small), chunked
  (the default) and with ``chunk=None`` (the plain forward, for comparison).
- ``yaml_alias_bomb``: a 7-line YAML alias bomb through :func:`clam_heat.config.load_config`.
- ``baseline``: the imports alone (what every case pays before its work).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = (
    "baseline",
    "header_10M",
    "header_10M_within_max",
    "bag_1M",
    "bag_1M_unchunked",
    "yaml_alias_bomb",
)


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _write_header(path: Path, rows: int) -> None:
    import h5py
    import numpy as np

    with h5py.File(path, "w") as h5:
        h5.create_dataset("features", shape=(rows, 64), dtype="f4", chunks=(1024, 64))
        h5["coords"] = np.arange(59 * 2, dtype=np.int64).reshape(59, 2) * 256
        h5["coords"].attrs["patch_size_level0"] = 256


def _write_bag(path: Path, rows: int, width: int) -> None:
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as h5:
        features = h5.create_dataset("features", shape=(rows, width), dtype="f4")
        for start in range(0, rows, 65536):
            stop = min(rows, start + 65536)
            features[start:stop] = rng.normal(size=(stop - start, width)).astype(np.float32)
        side = int(np.ceil(np.sqrt(rows)))
        i = np.arange(rows)
        h5["coords"] = np.stack([(i % side) * 256, (i // side) * 256], axis=1).astype(np.int64)
        h5["coords"].attrs["patch_size_level0"] = 256


def _bomb(path: Path) -> None:
    names, prev, lines = "abcdefg", "", []
    for name in names:
        item = f"*{prev}" if prev else "lol"
        lines.append(f"{name}: &{name} [{', '.join([item] * 9)}]")
        prev = name
    path.write_text("\n".join(lines) + "\n")


def run_case(case: str, folder: Path, patches: int, width: int) -> dict[str, object]:
    """Prepare (untimed), then time the case in this process; returns its numbers."""
    from clam_heat.config import load_config
    from clam_heat.errors import ClamHeatError
    from clam_heat.features import load_bag
    from clam_heat.models import build_model, run_attention

    outcome = "ok"
    h5 = folder / "bag.h5"
    if case.startswith("header"):
        _write_header(h5, 10_000_000)
    elif case.startswith("bag"):
        _write_bag(h5, patches, width)
    elif case == "yaml_alias_bomb":
        _bomb(folder / "config.yaml")
    before = _peak_mb()
    start = time.perf_counter()
    try:
        if case == "header_10M":
            load_bag(h5, patch_size_level0_override=256)
        elif case == "header_10M_within_max":
            load_bag(h5, patch_size_level0_override=256, max_patches=20_000_000)
        elif case.startswith("bag"):
            bag = load_bag(h5)
            model = build_model("clam_sb", n_classes=2, embed_dim=width).eval()
            chunk = None if case.endswith("unchunked") else 32_768
            run_attention(model, bag.features, chunk=chunk)
        elif case == "yaml_alias_bomb":
            load_config(folder / "config.yaml")
    except ClamHeatError as err:
        outcome = "refused: " + str(err).splitlines()[0][-90:]
    seconds = time.perf_counter() - start
    return {
        "case": case,
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(_peak_mb(), 1),
        "peak_before_mb": round(before, 1),
        "outcome": outcome,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES, help="run one case in this process")
    parser.add_argument("--patches", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()
    if args.case:
        with tempfile.TemporaryDirectory() as folder:
            result = run_case(args.case, Path(folder), args.patches, args.width)
        print(json.dumps(result))
        return
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case]
        cmd += ["--patches", str(args.patches), "--width", str(args.width)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        print(done.stdout.strip() or json.dumps({"case": case, "error": done.stderr[-300:]}))


if __name__ == "__main__":
    main()
