"""A corpus of bad inputs, each run through the real command line (``clam_heat.cli.cli_main``,
what the ``clam-heat`` script runs) on a copy of a finished demo project.

Every case asserts the exit code (1: some rows failed, 2: bad input before any work), exactly one
line on stderr naming the file or key, no traceback and no third-party warning, and that nothing
partial is left behind (no temp names). Row-level cases also assert the bad row's status and error
and that the other five rows are done; pre-work cases assert that no row was touched.

Faults the test process cannot cause for real (permission denied as root, a full disk where
mounting a small tmpfs is not permitted) are injected at the OS call, never skipped.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from clam_heat.atomic import is_temp_name
from clam_heat.cli import cli_main

GOOD = [f"demo_{k:03d}" for k in range(5)]


@pytest.fixture(scope="module")
def finished(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo project after one full run (every later run of the good rows is a no-op)."""
    folder = tmp_path_factory.mktemp("finished") / "demo"
    shutil.copytree(demo_source, folder)
    assert cli_main(["run", str(folder / "config.yaml"), "-q"]) == 0
    return folder


@dataclass
class Case:
    """What a case expects: exit code, words of the one stderr line, the bad row's outcome."""

    code: int
    names: tuple[str, ...]
    args: list[str] = field(default_factory=list)
    row: tuple[str, str] | None = None  # (status, words of its error) of row "bad"
    command: str = "run"
    stderr_prefix: str = "error: "


def _add_row(project: Path, slide_id: str = "bad", label: str = "tumour") -> None:
    path = project / "process_lists" / "demo.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    row = dict.fromkeys(df.columns, "")
    row.update(slide_id=slide_id, label=label, process="1")
    pd.concat([df, pd.DataFrame([row])], ignore_index=True).to_csv(path, index=False)


def _bad_slide(project: Path, data: bytes | None = None, source: Path | None = None) -> Path:
    """Row "bad" whose slide is ``data`` or a copy of ``source`` (features: demo_000's)."""
    slide = project / "slides" / "bad.tiff"
    if source is not None:
        shutil.copy(source, slide)
    else:
        slide.write_bytes(data or b"")
    shutil.copy(project / "features" / "demo_000.h5", project / "features" / "bad.h5")
    _add_row(project)
    return slide


def _bad_h5(project: Path, edit: Callable[[dict], None] | None = None, raw: bytes | None = None):
    """Row "bad": demo_000's slide with an H5 rewritten after ``edit`` (or raw bytes)."""
    shutil.copy(project / "slides" / "demo_000.tiff", project / "slides" / "bad.tiff")
    target = project / "features" / "bad.h5"
    if raw is not None:
        target.write_bytes(raw)
    else:
        with h5py.File(project / "features" / "demo_000.h5") as src:
            data = {k: (src[k][:], dict(src[k].attrs)) for k in src}
        assert edit is not None
        edit(data)
        with h5py.File(target, "w") as dst:
            for key, (values, attrs) in data.items():
                dst[key] = values
                dst[key].attrs.update(attrs)
    _add_row(project)
    return target


def _features(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        values, attrs = data["features"]
        data["features"] = (fn(values.copy()), attrs)

    return edit


def _coords(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        values, attrs = data["coords"]
        data["coords"] = (fn(values.copy()), attrs)

    return edit


def _label(project: Path, label: str) -> None:
    shutil.copy(project / "slides" / "demo_000.tiff", project / "slides" / "bad.tiff")
    shutil.copy(project / "features" / "demo_000.h5", project / "features" / "bad.h5")
    _add_row(project, label=label)


def _set(key: str) -> list[str]:
    return ["--set", key]


def _ckpt(project: Path) -> Path:
    return project / "ckpts" / "s_0_checkpoint.pt"


def _inject(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int) -> None:
    """Make every file creation under ``folder`` fail with ``code`` (a fault the test process
    cannot cause for real, e.g. permission denied as root)."""
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        where = Path(kwargs.get("dir") or (args[2] if len(args) > 2 else "."))
        if where.resolve().is_relative_to(folder.resolve()):
            raise OSError(code, os.strerror(code), str(where))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


#: tmpfs mounts a case made (unmounted when the case ends).
_MOUNTS: list[Path] = []


def _mount_tmpfs(folder: Path, options: str) -> bool:
    """Mount a small tmpfs (as root where permitted); False where mounting is not permitted."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
    )
    return done.returncode == 0


def _white_tiff(path: Path) -> None:
    import tifffile

    white = np.full((1024, 1024, 3), 255, np.uint8)
    tifffile.imwrite(path, white, tile=(256, 256), photometric="rgb", compression="zlib")


# ----------------------------------------------------------------------------------- the cases
# Each builder edits the project copy (and may inject a fault) and returns what must happen.

CaseFn = Callable[[Path, pytest.MonkeyPatch], Case]


def unopenable_slide(p: Path, mp) -> Case:
    _bad_slide(p, source=p.parent.parent / "fx" / "unopenable.tiff")
    return Case(1, ("bad.tiff", "OpenSlide cannot open"), row=("failed", "bad.tiff"))


def unreadable_slide(p: Path, mp) -> Case:
    _bad_slide(p, source=p.parent.parent / "fx" / "unreadable.svs")
    return Case(1, ("bad.tiff",), row=("failed", "bad.tiff"))


def truncated_slide(p: Path, mp) -> Case:
    data = (p / "slides" / "demo_000.tiff").read_bytes()
    _bad_slide(p, data[: len(data) // 2])
    return Case(1, ("bad.tiff", f"{len(data) // 2} bytes", "re-copy it"), row=("failed", "cut"))


def header_only_slide(p: Path, mp) -> Case:
    data = (p / "slides" / "demo_000.tiff").read_bytes()
    _bad_slide(p, data[:300])
    return Case(1, ("bad.tiff", "300 bytes", "re-copy it"), row=("failed", "re-copy"))


def zero_byte_slide(p: Path, mp) -> Case:
    _bad_slide(p, b"")
    return Case(1, ("bad.tiff", "0 bytes", "re-copy it"), row=("failed", "0 bytes"))


def text_file_as_slide(p: Path, mp) -> Case:
    _bad_slide(p, b"not a slide at all\n")
    return Case(1, ("bad.tiff", "unsupported"), row=("failed", "unsupported"))


def broken_h5(p: Path, mp) -> Case:
    _bad_h5(p, raw=b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    return Case(1, ("bad.h5",), row=("failed", "bad.h5"))


def zero_byte_h5(p: Path, mp) -> Case:
    _bad_h5(p, raw=b"")
    return Case(1, ("bad.h5",), row=("failed", "bad.h5"))


def h5_without_features(p: Path, mp) -> Case:
    _bad_h5(p, lambda d: d.pop("features"))
    return Case(1, ("bad.h5", "features"), row=("failed", "features"))


def h5_without_coords(p: Path, mp) -> Case:
    _bad_h5(p, lambda d: d.pop("coords"))
    return Case(1, ("bad.h5", "coords"), row=("failed", "coords"))


def count_mismatch(p: Path, mp) -> Case:
    _bad_h5(p, _coords(lambda c: c[:-1]))
    return Case(1, ("bad.h5", "59", "58"), row=("failed", "bad.h5"))


def width_mismatch(p: Path, mp) -> Case:
    _bad_h5(p, _features(lambda f: np.zeros((len(f), 7), np.float32)))
    return Case(1, ("bad.h5", "7", "64"), row=("failed", "7"))


def nan_features(p: Path, mp) -> Case:
    _bad_h5(p, _features(lambda f: np.where(np.arange(len(f))[:, None] == 3, np.nan, f)))
    return Case(1, ("bad.h5", "NaN"), row=("failed", "NaN"))


def inf_features(p: Path, mp) -> Case:
    _bad_h5(p, _features(lambda f: np.where(np.arange(len(f))[:, None] == 0, np.inf, f)))
    return Case(1, ("bad.h5",), row=("failed", "bad.h5"))


def _declared_h5(project: Path, n_rows: int) -> Path:
    """Row "bad" whose H5 declares ``n_rows`` feature rows (never written: a few KB on disk)
    beside demo_000's 59 coords."""
    with h5py.File(project / "features" / "demo_000.h5") as src:
        coords = src["coords"][:]
        coord_attrs = dict(src["coords"].attrs)
        width = src["features"].shape[1]
    target = _bad_h5(project, raw=b"")
    with h5py.File(target, "w") as dst:
        dst.create_dataset("features", shape=(n_rows, width), dtype="f4", chunks=(1024, width))
        dst["coords"] = coords
        dst["coords"].attrs.update(coord_attrs)
    assert target.stat().st_size < 64_000
    return target


def header_of_ten_million_rows(p: Path, mp) -> Case:
    _declared_h5(p, 10_000_000)
    words = ("bad.h5", "declares 10000000 patches", "runner_arguments.max_patches (2000000)")
    return Case(1, words, row=("failed", "max_patches"))


def header_of_ten_million_rows_within_max_patches(p: Path, mp) -> Case:
    _declared_h5(p, 10_000_000)
    args = _set("runner_arguments.max_patches=20000000")
    return Case(1, ("bad.h5", "10000000 rows", "coords has 59"), args, row=("failed", "59"))


def dangling_soft_link_in_h5(p: Path, mp) -> Case:
    target = _bad_h5(p, lambda d: d.pop("coords"))
    with h5py.File(target, "a") as h5:
        h5["coords"] = h5py.SoftLink("/nowhere")
    return Case(1, ("bad.h5", "'coords'", "dangling"), row=("failed", "dangling"))


def missing_h5(p: Path, mp) -> Case:
    shutil.copy(p / "slides" / "demo_000.tiff", p / "slides" / "bad.tiff")
    _add_row(p)
    return Case(1, ("bad", "features_dir"), row=("failed", "features_dir"))


def coords_all_outside(p: Path, mp) -> Case:
    _bad_h5(p, _coords(lambda c: c + 100_000))
    return Case(
        1,
        ("bad.h5", "all 59 patch coordinates lie outside", "4096x3072", "likely cause"),
        row=("failed", "features of another slide"),
    )


def coords_at_another_level(p: Path, mp) -> Case:
    _bad_h5(p, _coords(lambda c: c * 4 + 4096 * 4))
    return Case(1, ("bad.h5", "outside", "another level"), row=("failed", "another level"))


def single_patch(p: Path, mp) -> Case:
    def one(d: dict) -> None:
        for key in ("features", "coords"):
            values, attrs = d[key]
            d[key] = (values[:1], attrs)

    _bad_h5(p, one)
    return Case(0, (), row=("done", ""))


def equal_scores(p: Path, mp) -> Case:
    _bad_h5(p, _features(lambda f: np.repeat(f[:1], len(f), axis=0)))
    return Case(0, (), row=("done", ""))


def duplicate_ids(p: Path, mp) -> Case:
    _add_row(p, "demo_001")
    return Case(2, ("demo.csv", "demo_001", "appears twice"))


def traversal_id(p: Path, mp) -> Case:
    _add_row(p, "..evil")
    return Case(2, ("demo.csv", "line 7", "'..evil'"))


def separator_id(p: Path, mp) -> Case:
    _add_row(p, "a/b")
    return Case(2, ("demo.csv", "line 7", "path separator"))


def traversal_label(p: Path, mp) -> Case:
    _label(p, "../../outside")
    return Case(2, ("demo.csv", "line 7", "label '../../outside'"))


def absolute_label(p: Path, mp) -> Case:
    _label(p, "/tmp/elsewhere")
    return Case(2, ("demo.csv", "line 7", "path separator"))


def dotdot_label(p: Path, mp) -> Case:
    _label(p, "..")
    return Case(2, ("demo.csv", "line 7", "label '..'"))


def backslash_label(p: Path, mp) -> Case:
    _label(p, "a\\b")
    return Case(2, ("demo.csv", "line 7", "path separator"))


def dangling_symlink_in_list(p: Path, mp) -> Case:
    (p / "slides" / "bad.tiff").symlink_to(p / "nowhere" / "bad.tiff")
    shutil.copy(p / "features" / "demo_000.h5", p / "features" / "bad.h5")
    _add_row(p)
    return Case(
        0, ("bad.tiff", "symbolic link", "does not exist"), row=("skipped", "symbolic link"),
        stderr_prefix="warning: ",
    )  # fmt: skip


def dangling_symlink_in_folder(p: Path, mp) -> Case:
    (p / "process_lists" / "demo.csv").unlink()  # no list: the rows come from the folder
    (p / "slides" / "extra.tiff").symlink_to(p / "nowhere.tiff")
    return Case(0, ("extra.tiff", "symbolic link"), stderr_prefix="warning: ")


def unreadable_entry_in_list(p: Path, mp) -> Case:
    slide = _bad_slide(p, source=p / "slides" / "demo_000.tiff")
    real_open = open

    def fault(file, *args, **kwargs):  # what a file without read permission does (not as root)
        if Path(str(file)) == slide:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    import clam_heat.process_list.build as build

    mp.setattr(build, "open", fault, raising=False)
    return Case(
        0, ("bad.tiff", "cannot be read", "permissions"), row=("skipped", "cannot be read"),
        stderr_prefix="warning: ",
    )  # fmt: skip


def all_white_slide(p: Path, mp) -> Case:
    _white_tiff(p / "slides" / "bad.tiff")
    shutil.copy(p / "features" / "demo_000.h5", p / "features" / "bad.h5")
    _add_row(p)
    return Case(1, ("bad.tiff", "no tissue found"), row=("failed", "no tissue found"))


def long_label(p: Path, mp) -> Case:
    _label(p, "t" * 300)
    return Case(2, ("demo.csv", "line 7", "300 bytes long", "plain name"))


def newline_in_slide_id(p: Path, mp) -> Case:
    _add_row(p, "bad\nid")
    return Case(2, ("demo.csv", "line 7", "'bad\\nid'", "control character"))


def newline_in_slide_file_name(p: Path, mp) -> Case:
    (p / "process_lists" / "demo.csv").unlink()  # no list: the ids come from the file names
    shutil.copy(p / "slides" / "demo_000.tiff", p / "slides" / "bad\nname.tiff")
    return Case(2, ("data_arguments.data_dir", "'bad\\nname'", "control character"))


def save_exp_code_outside_the_roots(p: Path, mp) -> Case:
    args = _set("exp_arguments.save_exp_code=../other")
    return Case(2, ("exp_arguments.save_exp_code", "path separator", "plain name"), args)


def absolute_save_exp_code(p: Path, mp) -> Case:
    text = (p / "config.yaml").read_text().replace("save_exp_code: demo", "save_exp_code: /tmp/x")
    (p / "config.yaml").write_text(text)
    return Case(2, ("config.yaml:5", "exp_arguments.save_exp_code", "'/tmp/x'", "separator"))


def dotdot_save_exp_code_flag(p: Path, mp) -> Case:
    return Case(2, ("--save_exp_code ..", "contains '..'"), args=["--save_exp_code", ".."])


def long_save_exp_code(p: Path, mp) -> Case:
    args = _set("exp_arguments.save_exp_code=" + "x" * 300)
    return Case(2, ("exp_arguments.save_exp_code", "300 bytes long"), args)


def sampler_name_outside_the_roots(p: Path, mp) -> Case:
    text = (p / "config.yaml").read_text().replace("topk_high_attention", "../../up")
    (p / "config.yaml").write_text(text)
    return Case(2, ("config.yaml", "samples[0].name", "path separator"))


def class_name_outside_the_roots(p: Path, mp) -> Case:
    text = (p / "config.yaml").read_text().replace("    tumour: 1", "    ../tumour: 1")
    (p / "config.yaml").write_text(text)
    return Case(2, ("config.yaml", "label_dict", "'../tumour'", "path separator"))


def bad_yaml(p: Path, mp) -> Case:
    (p / "config.yaml").write_text((p / "config.yaml").read_text() + "\n  : [unclosed\n")
    return Case(2, ("config.yaml",))


def _append_yaml(p: Path, text: str) -> int:
    """Append ``text`` to config.yaml; returns the line number of its first line."""
    old = (p / "config.yaml").read_text()
    (p / "config.yaml").write_text(old + text)
    return old.count("\n") + 1


#: Seven lines that expand to 9**7 (4.8 million) strings if constructed.
_ALIAS_BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}' if prev else 'lol'] * 9)}]\n"
    for prev, name in zip(["", "a", "b", "c", "d", "e", "f"], "abcdefg", strict=True)
)


def yaml_alias_bomb(p: Path, mp) -> Case:
    line = _append_yaml(p, _ALIAS_BOMB)
    return Case(2, (f"config.yaml:{line}:", "aliases expand to more than 10000 values"))


def yaml_recursive_alias(p: Path, mp) -> Case:
    line = _append_yaml(p, "loop: &loop\n  again: *loop\n")
    return Case(2, (f"config.yaml:{line}:", "recursive alias"))


def duplicate_yaml_key(p: Path, mp) -> Case:
    text = (p / "config.yaml").read_text()
    lines = text.splitlines()
    first = lines.index("  alpha: 0.4") + 1
    (p / "config.yaml").write_text(text.replace("  alpha: 0.4\n", "  alpha: 0.4\n  alpha: 0.9\n"))
    return Case(2, (f"config.yaml:{first} and :{first + 1} heatmap_arguments.alpha given twice",))


def duplicate_yaml_block(p: Path, mp) -> Case:
    first = (p / "config.yaml").read_text().splitlines().index("heatmap_arguments:") + 1
    line = _append_yaml(p, "heatmap_arguments:\n  calc_heatmap: true\n")
    return Case(2, (f"config.yaml:{first} and :{line} heatmap_arguments given twice", "block"))


def unknown_yaml_key(p: Path, mp) -> Case:
    text = (p / "config.yaml").read_text().replace("alpha:", "alpah:")
    (p / "config.yaml").write_text(text)
    return Case(2, ("config.yaml", "heatmap_arguments.alpah", "alpha"))


def set_without_value(p: Path, mp) -> Case:
    return Case(2, ("heatmap_arguments.alpha",), args=_set("heatmap_arguments.alpha"))


def set_unknown_key(p: Path, mp) -> Case:
    return Case(2, ("heatmap_arguments.alpah",), args=_set("heatmap_arguments.alpah=0.5"))


def set_out_of_range(p: Path, mp) -> Case:
    return Case(2, ("heatmap_arguments.alpha",), args=_set("heatmap_arguments.alpha=7"))


def missing_config(p: Path, mp) -> Case:
    (p / "config.yaml").unlink()
    return Case(2, ("config.yaml", "not found"))


def missing_slide_folder(p: Path, mp) -> Case:
    shutil.rmtree(p / "slides")
    (p / "process_lists" / "demo.csv").unlink()
    return Case(2, ("data_arguments.data_dir", "slides", "does not exist"))


def workers_zero(p: Path, mp) -> Case:
    return Case(2, ("--workers",), args=["--workers", "0"])


def more_workers_than_rows(p: Path, mp) -> Case:
    _label(p, "tumour")  # one pending row beside five done ones
    import clam_heat.executors.base as base

    mp.setattr(base, "available_cores", lambda: 1)
    words = ("--workers 64 lowered to 1", "(6 pending rows, 1 cores)")
    return Case(0, words, args=["--workers", "64"], stderr_prefix="warning: ", row=("done", ""))


def bad_shard(p: Path, mp) -> Case:
    return Case(2, ("--shard",), args=["--shard", "4/4"])


def missing_checkpoint(p: Path, mp) -> Case:
    _ckpt(p).unlink()
    return Case(2, ("model_arguments.ckpt_path", "s_0_checkpoint.pt", "not found"))


def empty_checkpoint(p: Path, mp) -> Case:
    _ckpt(p).write_bytes(b"")
    return Case(2, ("model_arguments.ckpt_path", "s_0_checkpoint.pt", "0 bytes", "re-copy"))


def truncated_checkpoint(p: Path, mp) -> Case:
    data = _ckpt(p).read_bytes()
    _ckpt(p).write_bytes(data[: len(data) // 3])
    return Case(2, ("s_0_checkpoint.pt", "cut short", "re-copy"))


def plain_pickle_checkpoint(p: Path, mp) -> Case:
    import pickle

    _ckpt(p).write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))
    return Case(2, ("s_0_checkpoint.pt", "pickled Python objects", "state_dict"))


def wrong_architecture_checkpoint(p: Path, mp) -> Case:
    from clam_heat.models import ABMIL

    torch.save(ABMIL(64, 2).state_dict(), _ckpt(p))
    return Case(2, ("s_0_checkpoint.pt", "does not fit clam_sb", "likely cause"))


def wrong_model_type(p: Path, mp) -> Case:
    return Case(
        2, ("s_0_checkpoint.pt", "clam_mb"), args=_set("model_arguments.model_type=clam_mb")
    )


def missing_encoder_weights(p: Path, mp) -> Case:
    sets = _set("heatmap_arguments.calc_heatmap=true") + _set(
        f"runner_arguments.encoder_weights={p / 'nope.pth'}"
    )
    return Case(2, ("runner_arguments.encoder_weights", "nope.pth", "no such file"), args=sets)


def _calc(p: Path, mp, *sets: str) -> list[str]:
    """``calc_heatmap: true`` (CLAM's template) plus ``sets``, with an empty weights cache."""
    mp.setenv("HF_HOME", str(p / "empty_hf_home"))
    mp.delenv("HF_HUB_CACHE", raising=False)
    mp.delenv("UNI_CKPT_PATH", raising=False)
    return [a for key in ("heatmap_arguments.calc_heatmap=true", *sets) for a in _set(key)]


def _tiny_weights(weights: Path) -> tuple[str, str]:
    return "encoder_arguments.model_name=tiny_cnn", f"runner_arguments.encoder_weights={weights}"


def encoder_weights_not_found(p: Path, mp) -> Case:
    from clam_heat.models.clam import ClamSB

    torch.save(ClamSB(embed_dim=1024).state_dict(), _ckpt(p))  # a 1024-d (ResNet50) model
    args = _calc(p, mp, "model_arguments.embed_dim=1024")
    return Case(2, ("resnet50_trunc", "no weights found", "runner_arguments.encoder_weights"), args)


def pickled_encoder_weights(p: Path, mp) -> Case:
    import pickle

    (p / "w.pt").write_bytes(pickle.dumps({"weights": [1.0]}, protocol=4))
    sets = _tiny_weights(p / "w.pt")
    names = ("runner_arguments.encoder_weights", "w.pt", "pickled Python objects")
    return Case(2, names, _calc(p, mp, *sets))


def pickled_encoder_weights_with_workers(p: Path, mp) -> Case:
    case = pickled_encoder_weights(p, mp)  # checked in the driver before any worker starts
    case.args += ["--workers", "2"]
    return case


def unreadable_encoder_weights(p: Path, mp) -> Case:
    (p / "w.pt").write_bytes(b"not a checkpoint at all")
    sets = _tiny_weights(p / "w.pt")
    names = ("runner_arguments.encoder_weights", "w.pt", "cannot be read", "state_dict")
    return Case(2, names, _calc(p, mp, *sets))


def permission_denied_encoder_weights(p: Path, mp) -> Case:
    from clam_heat.encoders import build_encoder

    weights = p / "w.pt"
    torch.save(build_encoder("tiny_cnn", dim=64).module.state_dict(), weights)
    real_load = torch.load

    def fault(file, *args, **kwargs):  # what a file without read permission does (not as root)
        if Path(str(file)) == weights:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_load(file, *args, **kwargs)

    mp.setattr(torch, "load", fault)
    sets = _tiny_weights(weights)
    names = ("runner_arguments.encoder_weights", "w.pt", "permission denied")
    return Case(2, names, _calc(p, mp, *sets))


def encoder_of_the_wrong_width(p: Path, mp) -> Case:
    (p / "w.pt").write_bytes(_ckpt(p).read_bytes())  # any file: the width is refused first
    args = _calc(p, mp, f"runner_arguments.encoder_weights={p / 'w.pt'}")
    return Case(2, ("resnet50_trunc", "1024-d", "embed_dim is 64"), args)


def encoder_weights_of_another_width(p: Path, mp) -> Case:
    from clam_heat.encoders import build_encoder

    torch.save(build_encoder("tiny_cnn", dim=32).module.state_dict(), p / "w.pt")
    sets = _tiny_weights(p / "w.pt")
    names = ("runner_arguments.encoder_weights", "w.pt", "do not fit", "(32,) vs (64,)")
    return Case(2, names, _calc(p, mp, *sets))


def nan_checkpoint(p: Path, mp) -> Case:
    state = torch.load(_ckpt(p), weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 3)
    state[key].view(-1)[3] = float("nan")
    torch.save(state, _ckpt(p))
    return Case(2, ("model_arguments.ckpt_path", "s_0_checkpoint.pt", "1 NaN/Inf", "earlier"))


def raw_root_under_a_file(p: Path, mp) -> Case:
    (p / "blocker").write_text("a file")
    args = _set(f"exp_arguments.raw_save_dir={p / 'blocker' / 'raw'}")
    return Case(2, ("exp_arguments.raw_save_dir", "blocker", "not a folder"), args=args)


def production_root_under_a_file(p: Path, mp) -> Case:
    (p / "blocker").write_text("a file")
    args = _set(f"exp_arguments.production_save_dir={p / 'blocker' / 'prod'}")
    return Case(2, ("exp_arguments.production_save_dir", "blocker", "not a folder"), args=args)


def read_only_root(p: Path, mp) -> Case:
    ro = p / "ro"
    if not _mount_tmpfs(ro, "size=1m,ro"):
        _inject(mp, ro, errno.EROFS)
    _MOUNTS.append(ro)
    args = _set(f"exp_arguments.production_save_dir={ro}")
    return Case(2, ("exp_arguments.production_save_dir", "read-only"), args=args)


def permission_denied_root(p: Path, mp) -> Case:
    locked = p / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root writes anyway: inject what a normal user gets
        _inject(mp, locked, errno.EACCES)
    args = _set(f"exp_arguments.raw_save_dir={locked / 'raw'}")
    return Case(2, ("exp_arguments.raw_save_dir", "permission denied", "owner of"), args=args)


def disk_full_root(p: Path, mp) -> Case:
    full = p / "full"
    if _mount_tmpfs(full, "size=256k"):
        _MOUNTS.append(full)
        fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # fill it
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError as err:
            assert err.errno == errno.ENOSPC
        finally:
            os.close(fd)
    else:
        _inject(mp, full, errno.ENOSPC)
    args = _set(f"exp_arguments.production_save_dir={full / 'prod'}")
    return Case(
        2, ("exp_arguments.production_save_dir", "free space on the volume", "MB left"), args
    )


def status_of_missing_list(p: Path, mp) -> Case:
    return Case(2, ("nope.csv", "not found"), command="status")


CASES: list[CaseFn] = [
    unopenable_slide, unreadable_slide, truncated_slide, header_only_slide, zero_byte_slide,
    text_file_as_slide, broken_h5, zero_byte_h5, h5_without_features, h5_without_coords,
    count_mismatch, width_mismatch, nan_features, inf_features, missing_h5, coords_all_outside,
    header_of_ten_million_rows, header_of_ten_million_rows_within_max_patches,
    dangling_soft_link_in_h5, coords_at_another_level, single_patch, equal_scores, duplicate_ids,
    traversal_id,
    separator_id, traversal_label, absolute_label, dotdot_label, backslash_label,
    dangling_symlink_in_list, dangling_symlink_in_folder, unreadable_entry_in_list,
    long_label, newline_in_slide_id, newline_in_slide_file_name, save_exp_code_outside_the_roots,
    absolute_save_exp_code, dotdot_save_exp_code_flag, long_save_exp_code,
    sampler_name_outside_the_roots, class_name_outside_the_roots,
    yaml_alias_bomb, yaml_recursive_alias, duplicate_yaml_key, duplicate_yaml_block,
    all_white_slide, bad_yaml, unknown_yaml_key, set_without_value, set_unknown_key,
    set_out_of_range, missing_config, missing_slide_folder, workers_zero, more_workers_than_rows,
    bad_shard,
    missing_checkpoint, empty_checkpoint, truncated_checkpoint, plain_pickle_checkpoint,
    wrong_architecture_checkpoint, wrong_model_type, missing_encoder_weights,
    encoder_weights_not_found, pickled_encoder_weights, pickled_encoder_weights_with_workers,
    unreadable_encoder_weights,
    permission_denied_encoder_weights, encoder_of_the_wrong_width,
    encoder_weights_of_another_width, nan_checkpoint,
    raw_root_under_a_file, production_root_under_a_file, read_only_root, permission_denied_root,
    disk_full_root, status_of_missing_list,
]  # fmt: skip


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under the finished run's output folders (the good rows' outputs)."""
    out = {}
    for root in (folder / "heatmaps",):
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.name.endswith(".log"):
                out[str(path.relative_to(folder))] = path.read_bytes()
    return out


@pytest.mark.parametrize("build", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input(
    build: CaseFn,
    finished: Path,
    openslide_fixtures: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "fx").symlink_to(openslide_fixtures)
    project = tmp_path / "work" / "demo"
    shutil.copytree(finished, project)
    before = _snapshot(project)
    monkeypatch.chdir(project)
    try:
        case = build(project, monkeypatch)
        if case.command == "status":
            argv = ["status", "nope.csv"]
        else:
            argv = [case.command, str(project / "config.yaml"), "-q", *case.args]
        capfd.readouterr()
        code = cli_main(argv)
        out, err = capfd.readouterr()
    finally:
        while _MOUNTS:
            subprocess.run(["umount", str(_MOUNTS.pop())], capture_output=True)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == case.code, (out, err)
    assert "Traceback" not in err and "Warning:" not in err and "UserWarning" not in err, err
    if case.names:
        assert len(lines) == 1, err
        assert lines[0].startswith(case.stderr_prefix) or lines[0].startswith("failed bad:"), err
        for name in case.names:
            assert name in lines[0], (name, lines[0])
    else:
        assert lines == [], err
    left = [p for p in project.rglob("*") if is_temp_name(p.name)]
    assert not left, left
    if case.code == 2:  # stopped before any work: no output of the good rows changed
        assert _snapshot(project) == before
    if case.row is not None:
        df = pd.read_csv(project / "process_lists" / "demo.csv", dtype=str, keep_default_na=False)
        status = dict(zip(df["slide_id"], df["status"], strict=True))
        error = dict(zip(df["slide_id"], df["error"], strict=True))
        assert status["bad"] == case.row[0], error["bad"]
        assert case.row[1] in error["bad"]
        if case.row[0] == "failed":
            assert lines[0] == f"failed bad: {error['bad']}"
        assert all(status[s] == "done" for s in GOOD), status
    assert not (project.parent / "outside").exists() and not Path("/tmp/elsewhere").exists()


def test_status_names_the_demo_list_one_folder_down(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    """After `clam-heat demo` the list is under clam_heat_demo/: say so instead of 'not found'."""
    shutil.copytree(finished, tmp_path / "clam_heat_demo")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["status", "process_lists/demo.csv"]) == 2
    err = capfd.readouterr().err
    assert err == (
        "error: process_lists/demo.csv: process list file not found; did you mean "
        "clam-heat status clam_heat_demo/process_lists/demo.csv?\n"
    )
    assert cli_main(["status", "clam_heat_demo/process_lists/demo.csv"]) == 0
    out = capfd.readouterr().out
    assert out.startswith("clam_heat_demo/process_lists/demo.csv: 5 rows (5 done)")


def test_unexpected_error_is_one_line_with_the_traceback_in_a_file(
    finished: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    """A bug (here injected into the list builder) is one line naming where its traceback is."""
    import clam_heat.runner as runner

    def bug(*args, **kwargs):
        raise ZeroDivisionError("injected")

    monkeypatch.setattr(runner, "build_process_list", bug)
    assert cli_main(["run", str(finished / "config.yaml"), "-q"]) == 1
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unexpected ZeroDivisionError: injected")
    log = Path(lines[0].rsplit("traceback is in ", 1)[1].rstrip(")"))
    assert "Traceback" in log.read_text() and "ZeroDivisionError" in log.read_text()


def test_start_up_sweep_removes_only_our_leftovers_inside_the_roots(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    """Catches: a sweep that walks a sibling run's folder or the shared root, follows a link out
    of the root, removes a link (or its target) with a temp-like name, or forgets the probe."""
    project = tmp_path / "demo"
    shutil.copytree(finished, project)
    raw = project / "heatmaps" / "heatmap_raw_results"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    kept = [
        raw / "other_exp" / ".x_heatmap.jpg.abcd1234.tmp.jpg",  # a sibling run's live write
        raw / ".list.csv.abcd1234.tmp",  # the shared root, beside our run's folder
        elsewhere / ".z_heatmap.jpg.abcd1234.tmp.jpg",  # reached only through a link
        raw / "..clam_heat_probe.probe-fresh123.tmp",  # another run probing right now
    ]
    for path in kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"someone else's")
    (raw / "demo" / "linked").symlink_to(elsewhere, target_is_directory=True)
    link = raw / "demo" / ".y_heatmap.jpg.abcd1234.tmp.jpg"
    link.symlink_to(kept[2])
    removed = [
        raw / "demo" / "tumour" / ".demo_000.h5.qwer5678.tmp.h5",  # our killed write
        raw / "..clam_heat_probe.probe-killed12.tmp",  # a probe killed two minutes ago
    ]
    for path in removed:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"ours")
    os.utime(removed[1], (time.time() - 120, time.time() - 120))
    monkeypatch.chdir(project)
    assert cli_main(["run", str(project / "config.yaml"), "-q"]) == 0, capfd.readouterr()
    assert [p for p in removed if os.path.lexists(p)] == []
    assert all(p.read_bytes() == b"someone else's" for p in kept)
    assert link.is_symlink() and (raw / "demo" / "linked").is_symlink()


def test_a_held_list_is_refused_before_the_start_up_checks(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    """Catches: a second run that loads the checkpoint and encoder and probes every output folder
    before it learns that the list is taken (seconds to minutes with a large encoder)."""
    import clam_heat.runner as runner
    from clam_heat.process_list.lock import list_lock

    project = tmp_path / "demo"
    shutil.copytree(finished, project)
    checks: list[object] = []
    monkeypatch.setattr(runner, "preflight", lambda *a, **k: checks.append(a))
    with list_lock(project / "process_lists" / "demo.csv"):
        assert cli_main(["run", str(project / "config.yaml"), "-q"]) == 2
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and "demo.csv: is being run by pid" in lines[0], lines
    assert checks == []


def test_a_ten_million_row_header_is_refused_before_its_data_is_read(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    """Catches: a reader that reads (and allocates) a dataset before checking its declared shape
    against the coords and max_patches (2.5 GB for an 8 KB file). Every data read of the bad
    file is counted at h5py's one read entry point."""
    project = tmp_path / "demo"
    shutil.copytree(finished, project)
    bad = _declared_h5(project, 10_000_000)
    reads: list[str] = []
    real = h5py.Dataset.__getitem__

    def counting(self, *args, **kwargs):
        if Path(self.file.filename) == bad:
            reads.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    for extra in ([], _set("runner_arguments.max_patches=20000000")):
        assert cli_main(["run", str(project / "config.yaml"), "-q", "--retry-failed", *extra]) == 1
        assert "bad.h5" in capfd.readouterr().err
    assert reads == []
    with h5py.File(bad) as h5:  # the counter does see a read of that file
        h5["coords"][:2]
    assert reads == ["/coords"]


def test_workers_are_capped_at_the_pending_rows_and_the_cores(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Catches: `--workers 64` on 2 rows starting 64 processes that each load the model."""
    import clam_heat.executors.base as base
    from clam_heat.executors import LocalExecutor
    from clam_heat.runner import cap_workers

    monkeypatch.setattr(base, "available_cores", lambda: 8)
    cases = [(64, 2, False, 2), (64, 100, False, 8), (64, 100, True, 64), (3, 100, False, 3)]
    for asked, pending, force, expected in cases:
        pool = LocalExecutor(asked)
        caplog.clear()
        cap_workers(pool, pending, force=force)
        assert pool.workers == expected and pool.pids == []
        notices = [r.getMessage() for r in caplog.records if r.name == "clam_heat.notice"]
        assert len(notices) == (expected < asked), notices
