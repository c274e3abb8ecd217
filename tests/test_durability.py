"""Durability at stage boundaries: outputs are synced in one batch before the ledger says done,
and each done stage records its outputs' identities, so a truncated output reruns its stage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from demo_state import done_stages
from PIL import Image

from clam_heat.config import load_config
from clam_heat.ledger import Ledger, output_identity
from clam_heat.runner import run_pipeline
from clam_heat.stages import row as stage_row

N_ROWS = 2


def _two_rows(config: Path) -> Path:
    """Keep the first two rows of the demo list (the tests need one slide to damage, one to
    stay untouched)."""
    cfg = load_config(config)
    lines = cfg.process_list_path.read_text().splitlines()[: N_ROWS + 1]
    cfg.process_list_path.write_text("\n".join(lines) + "\n")
    return config


def _ledger(cfg, slide_id: str) -> Ledger:
    root = Path(cfg.exp_arguments.raw_save_dir) / cfg.exp_arguments.save_exp_code
    return Ledger.load(next(root.rglob(f"{slide_id}.ledger.json")))


def _truncate(path: Path) -> bytes:
    """Cut ``path`` to half its size, as a crash before writeback would; returns the old bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data


def test_done_stages_record_their_outputs_identity(demo_project: Path) -> None:
    cfg = load_config(_two_rows(demo_project))
    assert run_pipeline(cfg).ok
    for stage in ("segment", "infer", "heatmap", "sample"):
        rec = _ledger(cfg, "demo_000").record(stage)
        assert rec is not None and rec["state"] == "done"
        assert set(rec["output_ids"]) == set(rec["outputs"]) and rec["outputs"]
        for out, ident in rec["output_ids"].items():
            stat = Path(out).stat()
            assert ident == [stat.st_size, stat.st_mtime_ns]


def test_truncated_sampled_patch_reruns_exactly_that_stage(demo_project: Path) -> None:
    cfg = load_config(_two_rows(demo_project))
    assert run_pipeline(cfg).ok
    before = done_stages(cfg)
    patch = Path(_ledger(cfg, "demo_000").record("sample")["outputs"][0])
    original = _truncate(patch)

    plan = run_pipeline(cfg, dry_run=True).plans
    assert plan["demo_000"]["sample"] == f"output changed: {patch.name}"
    assert {s for s, why in plan["demo_000"].items() if why} == {"sample"}
    assert not any(plan["demo_001"].values())

    assert run_pipeline(cfg).ok
    after = done_stages(cfg)
    assert {key for key in before if before[key] != after[key]} == {("demo_000", "sample")}
    assert patch.read_bytes() == original  # rewritten whole (sampling is deterministic)
    Image.open(patch).load()


def test_truncated_heatmap_reruns_exactly_that_stage(demo_project: Path) -> None:
    cfg = load_config(_two_rows(demo_project))
    assert run_pipeline(cfg).ok
    before = done_stages(cfg)
    production = Path(_ledger(cfg, "demo_001").record("heatmap")["outputs"][1])
    assert production.suffix == ".jpg"
    original = _truncate(production)

    assert run_pipeline(cfg).ok
    after = done_stages(cfg)
    # sample reads the blockmap H5, not the heatmap image: it stays done as it was
    assert {key for key in before if before[key] != after[key]} == {("demo_001", "heatmap")}
    assert production.read_bytes() == original


def test_rewritten_output_of_the_same_size_is_noticed(tmp_path: Path) -> None:
    out = tmp_path / "a.bin"
    out.write_bytes(b"12345678")
    ledger = Ledger(tmp_path / "x.ledger.json")
    ledger.mark_started("s")
    ledger.mark_done("s", {"k": 1}, [out], seconds=0.1)
    assert Ledger.load(ledger.path).reason("s", {"k": 1}) is None
    stat = out.stat()
    out.write_bytes(b"87654321")  # same size, new content
    os.utime(out, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    reason = Ledger.load(ledger.path).reason("s", {"k": 1})
    assert reason is not None and str(reason) == "output changed: a.bin"
    out.unlink()
    assert str(Ledger.load(ledger.path).reason("s", {"k": 1})) == "output missing: a.bin"
    assert output_identity(out) is None


def test_records_without_identities_are_still_trusted(tmp_path: Path) -> None:
    """Ledgers written before identities were recorded do not rerun every stage."""
    out = tmp_path / "a.bin"
    out.write_bytes(b"1234")
    ledger = Ledger(tmp_path / "x.ledger.json")
    ledger.mark_started("s")
    ledger.mark_done("s", {"k": 1}, [out], seconds=0.1)
    del ledger.stages["s"]["output_ids"]
    ledger.save()
    out.write_bytes(b"12")
    assert Ledger.load(ledger.path).reason("s", {"k": 1}) is None


def test_outputs_are_synced_in_one_batch_before_the_stage_is_done(
    demo_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(demo_project)
    lines = cfg.process_list_path.read_text().splitlines()[:2]  # one row: one ledger
    cfg.process_list_path.write_text("\n".join(lines) + "\n")
    raw = Path(cfg.exp_arguments.raw_save_dir)
    synced: list[tuple[list[str], list[Path]]] = []
    real_sync = stage_row.sync_paths

    def spy(paths):
        paths = [Path(p) for p in paths]
        ledger = Ledger.load(next(raw.rglob("demo_000.ledger.json")))
        started = [name for name, rec in ledger.stages.items() if rec["state"] == "started"]
        synced.append((started, paths))
        real_sync(paths)

    monkeypatch.setattr(stage_row, "sync_paths", spy)
    assert run_pipeline(cfg).ok
    # one sync per stage, while that stage (and only it) was still marked started
    assert [started for started, _ in synced] == [["segment"], ["infer"], ["heatmap"], ["sample"]]
    ledger = _ledger(cfg, "demo_000")
    for started, paths in synced:
        assert paths == [Path(p) for p in ledger.record(started[0])["outputs"]]
    assert len(synced[3][1]) > 1  # the sampled patches: many files, one batch


def test_a_failed_sync_leaves_the_stage_not_done_and_it_reruns(
    demo_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(_two_rows(demo_project))
    real_sync = stage_row.sync_paths

    def failing(paths):
        paths = list(paths)
        if any(p.suffix == ".png" and "sampled_patches" in str(p) for p in map(Path, paths)):
            raise OSError(5, "Input/output error")  # injected: the disk failed the writeback
        real_sync(paths)

    monkeypatch.setattr(stage_row, "sync_paths", failing)
    summary = run_pipeline(cfg)
    assert summary.counts == {"failed": N_ROWS}
    assert _ledger(cfg, "demo_000").record("sample")["state"] == "failed"  # never "done"

    monkeypatch.setattr(stage_row, "sync_paths", real_sync)
    plan = run_pipeline(cfg, retry_failed=True, dry_run=True).plans
    assert plan["demo_000"]["sample"].startswith("previous run failed: OSError")
    assert run_pipeline(cfg, retry_failed=True).ok
    assert _ledger(cfg, "demo_000").record("sample")["state"] == "done"
