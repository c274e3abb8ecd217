"""Process-list builder: real CSV files in tmp_path, fake (touched) slide files for listing."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from clam_heat.config import load_config
from clam_heat.errors import OutputError, ProcessListError
from clam_heat.process_list import (
    CLAM_COLUMNS,
    PRESET_KEYS,
    PRESETS_DIR,
    STATUS_COLUMNS,
    build_process_list,
    build_process_list_from,
    builtin_defaults,
    failed_rows,
    initialize_columns,
    load_preset,
    read_process_list,
    row_params,
    slide_path_for_row,
    status_summary,
    update_row,
    write_csv_atomic,
)

MANAGED = list(CLAM_COLUMNS) + list(STATUS_COLUMNS)


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def build(tmp_path: Path, data_dir, **kw) -> tuple[pd.DataFrame, Path]:
    kw.setdefault("list_path", tmp_path / "lists" / "exp.csv")
    kw.setdefault("defaults", builtin_defaults())
    return build_process_list_from(data_dir=data_dir, **kw)


# ------------------------------------------------------------------------------- presets


# (seg_level, sthresh, mthresh, close, use_otsu, a_t, a_h, max_n_holes, vis_level,
#  line_thickness, use_padding, contour_fn, keep_ids, exclude_ids) from the table of
#  docs/rules/heatmaps.md#presets.
SPEC_PRESETS = {
    "bwh_biopsy": (-1, 15, 11, 2, False, 1.0, 1.0, 2, -1, 50, True, "four_pt", "none", "none"),
    "bwh_resection": (
        -1,
        15,
        11,
        4,
        False,
        100.0,
        16.0,
        8,
        -1,
        150,
        True,
        "four_pt",
        "none",
        "none",
    ),
    "tcga": (-1, 8, 7, 4, False, 16.0, 4.0, 8, -1, 100, True, "four_pt", "none", "none"),
}
TABLE_KEYS = [
    "seg_level", "sthresh", "mthresh", "close", "use_otsu", "a_t", "a_h", "max_n_holes",
    "vis_level", "line_thickness", "use_padding", "contour_fn", "keep_ids", "exclude_ids",
]  # fmt: skip


@pytest.mark.parametrize("name", sorted(SPEC_PRESETS))
def test_shipped_presets_match_spec_table(name: str) -> None:
    path = PRESETS_DIR / f"{name}.csv"
    params = load_preset(path)
    assert list(params) == list(PRESET_KEYS)
    assert {k: params[k] for k in TABLE_KEYS} == dict(
        zip(TABLE_KEYS, SPEC_PRESETS[name], strict=True)
    )
    assert type(params["sthresh"]) is int and type(params["a_t"]) is float
    assert type(params["use_otsu"]) is bool
    # CLAM ships the two BWH presets with CRLF line ends, TCGA with LF.
    crlf = b"\r\n" in path.read_bytes()
    assert crlf == name.startswith("bwh")


def test_builtin_defaults_when_no_preset() -> None:
    assert load_preset(None) == {
        "seg_level": -1, "sthresh": 15, "mthresh": 11, "close": 2, "use_otsu": False,
        "keep_ids": "none", "exclude_ids": "none", "a_t": 50.0, "a_h": 8.0,
        "max_n_holes": 10, "vis_level": -1, "line_thickness": 250, "use_padding": True,
        "contour_fn": "four_pt",
    }  # fmt: skip


def test_missing_presets_folder_falls_back_to_shipped_copy(tmp_path: Path) -> None:
    # CLAM's template says presets/bwh_biopsy.csv, relative to CLAM's repo root
    assert load_preset(tmp_path / "presets" / "bwh_biopsy.csv") == load_preset(
        PRESETS_DIR / "bwh_biopsy.csv"
    )
    with pytest.raises(ProcessListError) as err:
        load_preset(tmp_path / "presets" / "mine.csv")
    assert (
        str(err.value)
        == f"{tmp_path / 'presets' / 'mine.csv'}: preset file not found; check the path"
    )


def test_preset_crlf_and_fractional_area_kept(tmp_path: Path) -> None:
    text = (PRESETS_DIR / "tcga.csv").read_text().replace(",16,4,", ",0.5,0.25,")
    path = tmp_path / "frac.csv"
    path.write_bytes(text.replace("\n", "\r\n").encode())
    params = load_preset(path)
    assert (params["a_t"], params["a_h"], params["contour_fn"]) == (0.5, 0.25, "four_pt")
    # CLAM would store int(0.5) == 0 here; we keep the fraction (documented deviation).
    table = initialize_columns(pd.DataFrame({"slide_id": ["s"]}), params)
    assert table.at[0, "a_t"] == np.float32(0.5) and table["a_t"].dtype == np.float32


def test_preset_missing_column_names_file_and_column(tmp_path: Path) -> None:
    text = (PRESETS_DIR / "tcga.csv").read_text().replace("mthresh,", "").replace(",8,7,", ",8,")
    path = tmp_path / "broken.csv"
    path.write_text(text)
    with pytest.raises(ProcessListError) as err:
        load_preset(path)
    assert str(err.value) == (
        f"{path}: preset lacks column 'mthresh'; a preset needs all of seg_level, sthresh, "
        "mthresh, close, use_otsu, keep_ids, exclude_ids, a_t, a_h, max_n_holes, vis_level, "
        "line_thickness, use_padding, contour_fn"
    )


def test_preset_junk_value_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.csv"
    path.write_text((PRESETS_DIR / "tcga.csv").read_text().replace("FALSE", "maybe"))
    with pytest.raises(ProcessListError) as err:
        load_preset(path)
    assert str(err.value) == (
        f"{path}: preset column 'use_otsu' = 'maybe' is not a boolean; write TRUE/FALSE or 1/0; "
        "fix row 1 of the preset"
    )
    with pytest.raises(ProcessListError, match="preset file not found"):
        load_preset(tmp_path / "nope.csv")


# ------------------------------------------------------------------------------- listing


def test_list_from_folder(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    touch(slides, "b.svs", "a.svs", "notes.txt", "._a.svs", "c.svs.bak")
    (slides / "dir.svs").mkdir()
    df, path = build(tmp_path, slides)
    assert path == tmp_path / "lists" / "exp.csv" and path.is_file()
    assert df["slide_id"].tolist() == ["a", "b"]
    assert list(df.columns) == MANAGED
    assert df["status"].tolist() == ["tbp", "tbp"] and not df["missing"].any()
    dtypes = {c: str(df[c].dtype) for c in ("process", "seg_level", "sthresh", "mthresh")}
    assert dtypes == {
        "process": "uint8",
        "seg_level": "int8",
        "sthresh": "uint8",
        "mthresh": "uint8",
    }
    assert str(df["close"].dtype) == "uint32" and str(df["a_t"].dtype) == "float32"
    assert df["use_otsu"].dtype == bool and df["missing"].dtype == bool
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(MANAGED)
    assert lines[1] == "a,1,tbp,-1,15,11,2,False,none,none,50.0,8.0,10,-1,250,True,four_pt,,,,False"
    # read back gives the same frame
    pd.testing.assert_frame_equal(read_process_list(path), df)


def test_empty_folder_and_missing_folder_are_errors(tmp_path: Path) -> None:
    touch(tmp_path / "empty")
    with pytest.raises(ProcessListError) as err:
        build(tmp_path, tmp_path / "empty")
    assert str(err.value) == (
        f"data_arguments.data_dir: no files ending in '.svs' in {tmp_path / 'empty'}; "
        "check data_dir and slide_ext"
    )
    with pytest.raises(ProcessListError) as err:
        build(tmp_path, tmp_path / "nowhere")
    assert str(err.value) == (
        f"data_arguments.data_dir: folder {tmp_path / 'nowhere'} does not exist; "
        "fix the path in the config"
    )


def test_list_from_dict_data_dir(tmp_path: Path) -> None:
    dirs = {"site_b": tmp_path / "b", "site_a": tmp_path / "a"}
    touch(dirs["site_b"], "y.tiff", "x.tiff")
    touch(dirs["site_a"], "z.tiff")
    df, _ = build(tmp_path, dirs, slide_ext=".tiff", data_dir_key="cohort")
    assert df[["slide_id", "cohort"]].values.tolist() == [
        ["x", "site_b"],
        ["y", "site_b"],
        ["z", "site_a"],
    ]
    assert list(df.columns) == ["slide_id", "cohort"] + MANAGED[1:]
    args = SimpleNamespace(data_dir=dirs, data_dir_key="cohort", slide_ext=".tiff")
    paths = [slide_path_for_row(row, args) for _, row in df.iterrows()]
    assert paths == [
        dirs["site_b"] / "x.tiff",
        dirs["site_b"] / "y.tiff",
        dirs["site_a"] / "z.tiff",
    ]
    assert all(p.is_file() for p in paths)


def test_dict_data_dir_duplicate_id_across_folders(tmp_path: Path) -> None:
    dirs = {"one": tmp_path / "1", "two": tmp_path / "2"}
    touch(dirs["one"], "s.svs")
    touch(dirs["two"], "s.svs")
    with pytest.raises(ProcessListError) as err:
        build(tmp_path, dirs)
    assert str(err.value) == (
        f"data_arguments.data_dir: slide_id 's' appears twice ({dirs['one'] / 's.svs'} and "
        f"{dirs['two'] / 's.svs'}); ids must be unique because each names an output folder, "
        "so remove or rename one"
    )


USER_CSV = (
    "slide_id,label,x1,x2,y1,y2,sthresh,notes\n"
    "C3L-01663-21.svs,LSCC,100,900,50,850,20,keep me\n"
    "C3L-03262-22,LUAD,,,,,,NA\n"
    '007,LUAD,1,2,3,4,,"a, b"\n'
)


def test_list_from_csv_keeps_user_columns_in_place(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    touch(slides, "C3L-01663-21.svs", "C3L-03262-22.svs", "007.svs", "unlisted.svs")
    csv = tmp_path / "process_lists" / "demo.csv"
    csv.parent.mkdir()
    csv.write_text(USER_CSV)
    df, path = build(tmp_path, slides, list_path=csv, source_csv=csv)
    assert path == csv
    # only the listed slides (CLAM: a configured list is the whole work list), ids normalised
    assert df["slide_id"].tolist() == ["C3L-01663-21", "C3L-03262-22", "007"]
    assert list(df.columns) == (
        ["slide_id", "label", "x1", "x2", "y1", "y2", "sthresh", "notes", "process", "status"]
        + [c for c in MANAGED[3:] if c != "sthresh"]
    )
    assert df["sthresh"].tolist() == [20, 15, 15]  # override kept, blanks filled
    assert df["label"].tolist() == ["LSCC", "LUAD", "LUAD"]
    assert df["x1"].tolist()[0] == 100 and np.isnan(df["x1"].tolist()[1])
    assert df["notes"].tolist() == ["keep me", "NA", "a, b"]  # "NA" is text, not missing
    text = csv.read_text().splitlines()
    assert text[1].startswith("C3L-01663-21,LSCC,100,900,50,850,20,keep me,1,tbp,-1,11,")
    assert text[3].startswith('007,LUAD,1,2,3,4,15,"a, b",1,tbp,')
    assert not df["missing"].any()


def test_csv_without_slide_id_column(tmp_path: Path) -> None:
    csv = tmp_path / "l.csv"
    csv.write_text("name,label\na,LUAD\n")
    with pytest.raises(ProcessListError) as err:
        build(tmp_path, tmp_path, list_path=csv, source_csv=csv)
    assert str(err.value) == (
        f"{csv}: no 'slide_id' column; the process list needs one naming each slide file"
    )


def test_rerun_is_byte_identical_and_does_not_touch_file(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    touch(slides, "C3L-01663-21.svs", "C3L-03262-22.svs", "007.svs")
    csv = tmp_path / "demo.csv"
    csv.write_text(USER_CSV)
    first, _ = build(tmp_path, slides, list_path=csv, source_csv=csv)
    data, mtime = csv.read_bytes(), csv.stat().st_mtime_ns
    second, _ = build(tmp_path, slides, list_path=csv, source_csv=csv)
    assert csv.read_bytes() == data and csv.stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(first, second)
    # the folder-listing flavour too
    build(tmp_path, slides)
    listed = (tmp_path / "lists" / "exp.csv").read_bytes()
    build(tmp_path, slides)
    assert (tmp_path / "lists" / "exp.csv").read_bytes() == listed


def test_rerun_keeps_status_and_edits_appends_and_flags(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    touch(slides, "a.svs", "b.svs", "c.svs")
    df, path = build(tmp_path, slides)
    # the runner finishes a; a user skips b by hand and adds a column
    df = update_row(df, "a", status="done", stage="heatmap", updated_at="2025-01-02T03:04:05+00:00")
    df = df.assign(label=["LUAD", "LSCC", "LUAD"])
    df.loc[df["slide_id"] == "b", "process"] = 0
    df.loc[df["slide_id"] == "b", "sthresh"] = 30
    write_csv_atomic(df, path)
    (slides / "c.svs").unlink()
    touch(slides, "d.svs")

    again, _ = build(tmp_path, slides)
    assert again["slide_id"].tolist() == ["a", "b", "c", "d"]
    assert again["status"].tolist() == ["done", "tbp", "tbp", "tbp"]
    assert again["stage"].tolist() == ["heatmap", "", "", ""]
    assert again["updated_at"].tolist()[0] == "2025-01-02T03:04:05+00:00"
    assert again["process"].tolist() == [1, 0, 1, 1] and again["sthresh"].tolist() == [
        15,
        30,
        15,
        15,
    ]
    assert again["missing"].tolist() == [False, False, True, False]
    assert again["label"].tolist()[:3] == ["LUAD", "LSCC", "LUAD"]
    assert pd.isna(again["label"].tolist()[3])
    assert list(again.columns) == MANAGED + ["label"]

    touch(slides, "c.svs")  # the slide comes back: flag cleared, status untouched
    back, _ = build(tmp_path, slides)
    assert back["missing"].tolist() == [False] * 4 and back["status"].tolist()[0] == "done"


def test_configured_list_path_absent_enumerates_into_it(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    touch(slides, "a.svs")
    target = tmp_path / "deep" / "new" / "list.csv"
    df, path = build(tmp_path, slides, list_path=target, source_csv=target)
    assert path == target and target.is_file() and df["slide_id"].tolist() == ["a"]


def test_write_false_leaves_disk_alone(tmp_path: Path) -> None:
    touch(tmp_path / "s", "a.svs")
    df, path = build(tmp_path, tmp_path / "s", write=False)
    assert not path.exists() and df["slide_id"].tolist() == ["a"]


# ------------------------------------------------------------------------------- bad ids


@pytest.mark.parametrize(
    ("cell", "why"),
    [
        (
            "sub/a",
            "contains a path separator; ids name output folders, so give the bare file name "
            "and put its folder in data_arguments.data_dir",
        ),
        ("..", "contains '..'; ids name output folders, so rename the slide file or edit the id"),
        (
            "x..y",
            "contains '..'; ids name output folders, so rename the slide file or edit the id",
        ),
        (
            "a\\b",
            "contains a path separator; ids name output folders, so give the bare file name "
            "and put its folder in data_arguments.data_dir",
        ),
    ],
)
def test_unsafe_ids_rejected(tmp_path: Path, cell: str, why: str) -> None:
    csv = tmp_path / "l.csv"
    csv.write_text(f"slide_id\nok\n{cell}\n")
    with pytest.raises(ProcessListError) as err:
        build(tmp_path, tmp_path, list_path=csv, source_csv=csv)
    assert str(err.value) == f"{csv}: line 3: slide_id {cell!r} {why}"
    assert csv.read_text() == f"slide_id\nok\n{cell}\n"  # nothing rewritten


def test_duplicate_ids_rejected_even_with_extension(tmp_path: Path) -> None:
    csv = tmp_path / "l.csv"
    csv.write_text("slide_id\na\nb\na.svs\n")
    with pytest.raises(ProcessListError) as err:
        build(tmp_path, tmp_path, list_path=csv, source_csv=csv)
    assert str(err.value) == (
        f"{csv}: slide_id 'a' appears twice (line 2 and line 4); ids must be unique because "
        "each names an output folder, so remove or rename one"
    )


def test_empty_id_rejected(tmp_path: Path) -> None:
    csv = tmp_path / "l.csv"
    csv.write_text("slide_id,label\na,1\n,2\n")
    with pytest.raises(ProcessListError) as err:
        read_process_list(csv)
    assert str(err.value) == (
        f"{csv}: line 3: slide_id is empty; every row needs the slide's file name "
        "(extension optional)"
    )


def test_junk_override_in_list_rejected_at_build(tmp_path: Path) -> None:
    csv = tmp_path / "l.csv"
    csv.write_text("slide_id,sthresh\na,300\n")
    with pytest.raises(ProcessListError) as err:
        build(tmp_path, tmp_path, list_path=csv, source_csv=csv)
    assert str(err.value) == (
        f"{csv}: slide_id 'a': column 'sthresh' = 300 is out of range 0..255 (uint8 in CLAM); "
        "fix the cell '300'"
    )
    csv.write_text("slide_id,use_otsu\na,perhaps\n")
    with pytest.raises(ProcessListError) as err:
        build(tmp_path, tmp_path, list_path=csv, source_csv=csv)
    assert str(err.value) == (
        f"{csv}: slide_id 'a': column 'use_otsu' = 'perhaps' is not a boolean; write TRUE/FALSE "
        "or 1/0; fix the cell or leave it empty to use the default False"
    )


# ------------------------------------------------------------------------------- row_params


def test_row_params_blank_cells_use_defaults() -> None:
    defaults = load_preset(PRESETS_DIR / "tcga.csv")
    row = pd.Series(
        {"slide_id": "a", "sthresh": np.nan, "a_t": "", "use_otsu": None, "keep_ids": np.nan}
    )
    params = row_params(row, defaults)
    assert params == {**defaults, "keep_ids": [], "exclude_ids": []}


def test_row_params_valid_overrides() -> None:
    row = {
        "slide_id": "a",
        "sthresh": 20.0,  # numeric column read as float
        "close": "6",
        "use_otsu": "TRUE",
        "use_padding": 0,
        "a_t": "0.5",
        "keep_ids": "0,3",
        "exclude_ids": 2.0,
        "contour_fn": "basic",
    }
    params = row_params(row, builtin_defaults())
    assert params["sthresh"] == 20 and type(params["sthresh"]) is int
    assert (params["close"], params["use_otsu"], params["use_padding"]) == (6, True, False)
    assert params["a_t"] == 0.5 and params["contour_fn"] == "basic"
    assert (params["keep_ids"], params["exclude_ids"]) == ([0, 3], [2])
    assert (params["mthresh"], params["line_thickness"]) == (11, 250)


@pytest.mark.parametrize(
    ("column", "cell", "message"),
    [
        (
            "sthresh",
            "abc",
            "slide_id 'a': column 'sthresh' = 'abc' is not a whole number; fix the cell or "
            "leave it empty to use the default 15",
        ),
        (
            "use_otsu",
            "sometimes",
            "slide_id 'a': column 'use_otsu' = 'sometimes' is not a boolean; write TRUE/FALSE or "
            "1/0; fix the cell or leave it empty to use the default False",
        ),
        (
            "keep_ids",
            "0;3",
            "slide_id 'a': column 'keep_ids' = '0;3' is not a list of contour ids; write 'none' "
            "or ids like \"0,3\"; fix the cell or leave it empty to use the default 'none'",
        ),
        (
            "sthresh",
            12.5,
            "slide_id 'a': column 'sthresh' = 12.5 is not a whole number; fix the cell or leave "
            "it empty to use the default 15",
        ),
        (
            "vis_level",
            "200",
            "slide_id 'a': column 'vis_level' = 200 is out of range -128..127 (int8 in CLAM); "
            "fix the cell",
        ),
    ],
)
def test_row_params_junk_names_slide_column_value(column: str, cell: object, message: str) -> None:
    with pytest.raises(ProcessListError) as err:
        row_params({"slide_id": "a", column: cell}, builtin_defaults())
    assert str(err.value) == message


# ------------------------------------------------------------------------------- columns


def test_initialize_columns_clam_semantics() -> None:
    df = pd.DataFrame(
        {
            "slide_id": ["a", "b"],
            "label": ["LUAD", "LSCC"],
            "sthresh": [np.nan, 9.0],
            "status": ["processed", np.nan],
            "notes": ["x", "y"],
        }
    )
    out = initialize_columns(df, builtin_defaults())
    head = ["slide_id", "label", "sthresh", "status", "notes", "process", "seg_level", "mthresh"]
    assert list(out.columns) == head + [c for c in MANAGED if c not in head]
    assert out["sthresh"].tolist() == [15, 9] and out["sthresh"].dtype == np.uint8
    assert out["status"].tolist() == ["processed", "tbp"]  # foreign statuses kept verbatim
    assert df["sthresh"].isna().sum() == 1  # input untouched


def test_read_process_list_dtypes(tmp_path: Path) -> None:
    csv = tmp_path / "l.csv"
    csv.write_text(
        "slide_id,label,keep_ids,exclude_ids,sthresh,status,stage,error,updated_at,missing\n"
        '001,0,"0,3",none,,done,heatmap,,,False\n'
        "2.50,1,,2,20,failed,,boom: no tissue,2025-01-01T00:00:00+00:00,\n"
    )
    df = read_process_list(csv)
    assert df["slide_id"].tolist() == ["001", "2.50"]
    assert df["keep_ids"].tolist() == ["0,3", ""] and df["exclude_ids"].tolist() == ["none", "2"]
    assert str(df["keep_ids"].dtype) == "str" and str(df["slide_id"].dtype) == "str"
    assert df["stage"].tolist() == ["heatmap", ""] and df["error"].tolist() == [
        "",
        "boom: no tissue",
    ]
    assert df["updated_at"].tolist()[0] == "" and df["missing"].tolist() == [False, False]
    assert df["label"].tolist() == [0, 1]  # user columns inferred as pandas would
    assert np.isnan(df["sthresh"].tolist()[0]) and df["sthresh"].tolist()[1] == 20
    params = row_params(df.iloc[0], builtin_defaults())
    assert (params["sthresh"], params["keep_ids"]) == (15, [0, 3])
    assert row_params(df.to_dict("records")[1], builtin_defaults())["exclude_ids"] == [2]


def test_slide_path_for_row_rules(tmp_path: Path) -> None:
    args = SimpleNamespace(data_dir=tmp_path, data_dir_key="source", slide_ext=".svs")
    assert slide_path_for_row({"slide_id": "a"}, args) == tmp_path / "a.svs"
    assert slide_path_for_row({"slide_id": "a.svs"}, args) == tmp_path / "a.svs"
    cfg = SimpleNamespace(data_arguments=args)
    assert slide_path_for_row(pd.Series({"slide_id": "a"}), cfg) == tmp_path / "a.svs"
    dict_args = SimpleNamespace(
        data_dir={"x": tmp_path / "x", "1": tmp_path / "one"},
        data_dir_key="source",
        slide_ext=".svs",
    )
    assert slide_path_for_row({"slide_id": "a", "source": "x"}, dict_args) == tmp_path / "x/a.svs"
    assert slide_path_for_row({"slide_id": "a", "source": 1.0}, dict_args) == tmp_path / "one/a.svs"
    with pytest.raises(ProcessListError) as err:
        slide_path_for_row({"slide_id": "a", "source": "y"}, dict_args)
    assert str(err.value) == (
        "slide_id 'a': column 'source' = 'y' is not a data_arguments.data_dir key; use one of "
        "['1', 'x'] or add 'y' to data_dir"
    )
    with pytest.raises(ProcessListError) as err:
        slide_path_for_row({"slide_id": "a", "source": np.nan}, dict_args)
    assert str(err.value) == (
        "slide_id 'a': column 'source' (data_arguments.data_dir_key) is empty or absent; "
        "data_dir is a dict, so set it to one of ['1', 'x']"
    )


# ------------------------------------------------------------------------------- status


def test_update_row_status_summary_failed_rows(tmp_path: Path) -> None:
    touch(tmp_path / "s", "a.svs", "b.svs", "c.svs")
    df, path = build(tmp_path, tmp_path / "s")
    before = df.copy()
    df = update_row(df, "a", status="running")
    df = update_row(df, "b", status="failed", stage="segment", error="no tissue\nfound", bag_size=3)
    pd.testing.assert_frame_equal(before, build(tmp_path, tmp_path / "s", write=False)[0])
    assert df.loc[1, "error"] == "no tissue found" and df.loc[1, "bag_size"] == 3
    assert df.loc[0, "updated_at"].endswith("+00:00") and df.loc[2, "updated_at"] == ""
    assert status_summary(df) == {"tbp": 1, "running": 1, "done": 0, "failed": 1, "skipped": 0}
    failed = failed_rows(df)
    assert failed["slide_id"].tolist() == ["b"] and failed["error"].tolist() == ["no tissue found"]
    with pytest.raises(ProcessListError, match="slide_id 'zz' is not in the process list"):
        update_row(df, "zz", status="done")
    with pytest.raises(ValueError, match="status 'finished' is not one of"):
        update_row(df, "a", status="finished")
    write_csv_atomic(df, path)
    again = read_process_list(path)
    assert again["status"].tolist() == ["running", "failed", "tbp"]
    assert again["bag_size"].tolist()[1] == 3


# ------------------------------------------------------------------------------- atomic write


def test_atomic_write_failure_keeps_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    touch(tmp_path / "s", "a.svs")
    df, path = build(tmp_path, tmp_path / "s")
    old = path.read_bytes()

    def refuse(src: str, dst: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OutputError) as err:
        write_csv_atomic(update_row(df, "a", status="done"), path)
    assert str(err.value) == (
        f"{path}: cannot write the CSV (Permission denied); check the folder is writable and "
        "has free space"
    )
    assert path.read_bytes() == old
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_atomic_write_creates_folder(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.csv"
    write_csv_atomic(pd.DataFrame({"slide_id": ["x"], "n": [1]}), target)
    assert target.read_text() == "slide_id,n\nx,1\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.csv"]


# ------------------------------------------------------------------------------- config adapter


def test_build_process_list_from_config_object(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    touch(slides, "a.svs", "b.svs")
    data = SimpleNamespace(
        data_dir=slides,
        data_dir_key="source",
        process_list=None,
        preset=PRESETS_DIR / "bwh_resection.csv",
        slide_ext=".svs",
        label_dict={"LUAD": 0, "LSCC": 1},
    )
    cfg = SimpleNamespace(
        data_arguments=data,
        exp_arguments=SimpleNamespace(save_exp_code="EXP"),
        process_list_path=tmp_path / "process_lists" / "EXP.csv",
    )
    df, path = build_process_list(cfg)
    assert path == cfg.process_list_path and path.is_file()
    assert df["a_t"].tolist() == [100.0, 100.0] and df["line_thickness"].tolist() == [150, 150]
    # a configured list that exists is the source: unlisted slides are not added
    path.write_text("slide_id,label\nb.svs,LUAD\n")
    data.process_list = path
    df, _ = build_process_list(cfg)
    assert df["slide_id"].tolist() == ["b"] and df["label"].tolist() == ["LUAD"]


def test_build_process_list_with_real_config(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    touch(slides, "b.svs", "a.svs")
    config = tmp_path / "cfg" / "config.yaml"
    config.parent.mkdir()
    config.write_text(
        "exp_arguments:\n  save_exp_code: exp7\n"
        f"data_arguments:\n  data_dir: {slides}\n  process_list: null\n"
        f"  preset: {PRESETS_DIR / 'tcga.csv'}\n"
    )
    cfg = load_config(config)
    df, path = build_process_list(cfg)
    assert path == tmp_path / "cfg" / "process_lists" / "exp7.csv" == cfg.process_list_path
    assert df["slide_id"].tolist() == ["a", "b"] and df["sthresh"].tolist() == [8, 8]
    assert slide_path_for_row(df.iloc[0], cfg) == slides / "a.svs"


def test_hand_edited_status_in_csv_text_survives_rebuild(tmp_path: Path) -> None:
    touch(tmp_path / "s", "a.svs", "b.svs")
    _, path = build(tmp_path, tmp_path / "s")
    path.write_text(path.read_text().replace("b,1,tbp,", "b,1,done,"))
    edited = path.read_bytes()
    df, _ = build(tmp_path, tmp_path / "s")
    assert df["status"].tolist() == ["tbp", "done"] and path.read_bytes() == edited


def test_presets_ship_inside_the_wheel(tmp_path: Path) -> None:
    """A non-editable install must find CLAM's template preset without a checkout."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "src"  # a copy, so that the build leaves the checkout untouched
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    shutil.copytree(
        root / "clam_heat", source / "clam_heat", ignore=shutil.ignore_patterns("__pycache__")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(source)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("clam_heat-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in SPEC_PRESETS:
        assert f"clam_heat/presets/{name}.csv" in names


def test_a_shard_with_no_rows_still_writes_its_file(tmp_path: Path) -> None:
    """One shard file per array task, even a task with nothing to do (docs/cohorts.md#shards)."""
    from clam_heat.process_list.shards import shard_frame, shard_of, shard_path

    ids = ["a", "b", "c"]
    empty = next(i for i in range(16) if all(shard_of(s, 16) != i for s in ids))
    df = pd.DataFrame({"slide_id": ids, "label": ["x", "y", "x"], "status": ["tbp"] * 3})
    listing = tmp_path / "list.csv"
    rows = shard_frame(df, listing, empty, 16)
    assert len(rows) == 0
    written = shard_path(listing, empty, 16)
    assert written.read_text().splitlines() == ["slide_id,label,status"]
    assert len(shard_frame(df, listing, empty, 16)) == 0  # resumes from the empty file
