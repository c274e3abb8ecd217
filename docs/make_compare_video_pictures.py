"""Make the pictures of docs/compare-video.md (`clam-heat compare` and `video`) from the demo.

    python docs/make_compare_video_pictures.py OUT_DIR

Writes OUT_DIR/compare_demo_000.jpg (A | B | A - B of the demo run against a copy whose
checkpoint has its attention branch negated) and OUT_DIR/video_frames.jpg (four frames of the
demo_000 fly-through: overview, overlay faded in, in flight, close-up).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from clam_heat.compare import compare_runs
from clam_heat.config import load_config
from clam_heat.demo import make_demo_project
from clam_heat.runner import run_pipeline
from clam_heat.video import make_flythrough

out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img")
if not out.is_dir():  # cv2.imwrite would fail silently at the end
    sys.exit(f"error: {out}: no such folder; create it first (mkdir -p {out})")
work = Path(tempfile.mkdtemp(prefix="clam_heat_pictures_"))
a = make_demo_project(work / "a").config_path
if (work / "b").exists():
    shutil.rmtree(work / "b")
shutil.copytree(work / "a", work / "b")
ckpt = work / "b" / "ckpts" / "s_0_checkpoint.pt"
state = torch.load(ckpt, weights_only=True)
for key in [k for k in state if ".attention_c." in k]:
    state[key] = -state[key]  # model B ranks every patch the other way round
torch.save(state, ckpt)
b = work / "b" / "config.yaml"
for config in (a, b):
    run_pipeline(load_config(config), stages=("infer",))
summary = compare_runs(a, b, work / "cmp")
picture = cv2.imread(str(work / "cmp" / "demo_000_compare.png"))
scale = min(1.0, 1100 / picture.shape[1])
picture = cv2.resize(picture, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
cv2.imwrite(str(out / "compare_demo_000.jpg"), picture, [cv2.IMWRITE_JPEG_QUALITY, 82])

info = make_flythrough(a, "demo_000", work / "fly.mp4", seconds=8, fps=10, size=(640, 360))
cap = cv2.VideoCapture(str(info.path))
frames = []
while True:
    ok, frame = cap.read()
    if not ok:
        break
    frames.append(frame)
first, last = info.holds[0]
picks = [0, first // 2, (first // 2 + first) // 2 + 1, (first + last) // 2]
tiles = [cv2.resize(frames[i], (480, 270), interpolation=cv2.INTER_AREA) for i in picks]
grid = np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:])])
cv2.imwrite(str(out / "video_frames.jpg"), grid, [cv2.IMWRITE_JPEG_QUALITY, 82])
shutil.rmtree(work)
print(out / "compare_demo_000.jpg", out / "video_frames.jpg", summary.means)
