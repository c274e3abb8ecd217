"""The config loader on real YAML files: CLAM configs load unchanged, every problem is named."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from clam_heat.config import (
    BLOCK_NAMES,
    HeatmapConfig,
    SampleSpec,
    config_from_dict,
    find_config,
    load_config,
)
from clam_heat.errors import ConfigError

TEMPLATE = Path(__file__).resolve().parents[1] / "configs" / "clam_template.yaml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def problems_of(path: Path | str, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)  # type: ignore[arg-type]
    assert info.value.exit_code == 2
    return info.value.problems


def documented_defaults(cwd: Path) -> dict[str, object]:
    """CLAM's template values (configs/clam_template.yaml), paths resolved against an empty CWD."""
    return {
        "exp_arguments": {
            "n_classes": 2,
            "save_exp_code": "HEATMAP_OUTPUT",
            "raw_save_dir": str(cwd / "heatmaps/heatmap_raw_results"),
            "production_save_dir": str(cwd / "heatmaps/heatmap_production_results"),
            "batch_size": 256,
        },
        "data_arguments": {
            "data_dir": str(cwd / "heatmaps/demo/slides"),
            "data_dir_key": "source",
            "process_list": str(cwd / "process_lists/heatmap_demo_dataset.csv"),
            "preset": str(cwd / "presets/bwh_biopsy.csv"),
            "slide_ext": ".svs",
            "label_dict": {"LUAD": 0, "LSCC": 1},
        },
        "patching_arguments": {
            "patch_size": 256,
            "overlap": 0.5,
            "patch_level": 0,
            "custom_downsample": 1,
        },
        "encoder_arguments": {"model_name": "resnet50_trunc", "target_img_size": 224},
        "model_arguments": {
            "ckpt_path": str(cwd / "heatmaps/demo/ckpts/s_0_checkpoint.pt"),
            "model_type": "clam_sb",
            "initiate_fn": "initiate_model",
            "model_size": "small",
            "drop_out": 0.0,
            "embed_dim": 1024,
        },
        "heatmap_arguments": {
            "vis_level": 1,
            "alpha": 0.4,
            "blank_canvas": False,
            "save_orig": True,
            "save_ext": "jpg",
            "use_ref_scores": True,
            "blur": False,
            "use_center_shift": True,
            "use_roi": False,
            "calc_heatmap": True,
            "binarize": False,
            "binary_thresh": -1.0,
            "custom_downsample": 1,
            "cmap": "jet",
            "score_scale": "slide",
            "classes": "predicted",
        },
        "sample_arguments": {
            "samples": [
                {
                    "name": "topk_high_attention",
                    "sample": True,
                    "seed": 1,
                    "k": 15,
                    "mode": "topk",
                    "score_start": 0.0,
                    "score_end": 1.0,
                    "threshold": 0.9,
                    "score": "percentile",
                    "format": "png",
                }
            ]
        },
        "runner_arguments": {
            "device": "auto",
            "workers": 1,
            "force_workers": False,
            "max_patches": 2_000_000,
            "features_dir": None,
            "patches_dir": None,
            "patch_size_level0": None,
            "results_dir": str(cwd / "heatmaps/results"),
            "write_pyramid_tiff": False,
            "write_geojson": False,
            "segment_heatmap": True,
            "encoder_weights": None,
            "extract_features": False,
            "loader_workers": 0,
            "amp": False,
            "flush_seconds": 30.0,
            "tracker": "none",
            "tracker_uri": None,
            "log_level": "INFO",
        },
    }


# --------------------------------------------------------------------------- template / defaults


def test_template_validates_and_equals_documented_defaults(cwd: Path) -> None:
    cfg = load_config(TEMPLATE)
    assert cfg.source_path == TEMPLATE
    assert cfg.to_yaml_dict() == documented_defaults(cwd)
    # the template is exactly the default of every key
    assert config_from_dict({}).to_yaml_dict() == cfg.to_yaml_dict()
    assert TEMPLATE.read_text().startswith("#")  # CLAM's quirk: comment, then '---'
    assert "\n---\n" in TEMPLATE.read_text()


def test_template_has_clam_blocks_only(cwd: Path) -> None:
    raw = yaml.safe_load(TEMPLATE.read_text())
    assert list(raw) == list(BLOCK_NAMES[:7])
    assert raw["sample_arguments"]["samples"] == [
        {"name": "topk_high_attention", "sample": True, "seed": 1, "k": 15, "mode": "topk"}
    ]


def test_derived_paths_and_label_names(cwd: Path) -> None:
    cfg = load_config(TEMPLATE)
    assert cfg.process_list_path == cwd / "process_lists/heatmap_demo_dataset.csv"
    assert cfg.results_csv_path == cwd / "heatmaps/results/heatmap_demo_dataset.csv"
    assert cfg.data_arguments.label_names() == {0: "LUAD", 1: "LSCC"}
    assert cfg.block("heatmap_arguments")["alpha"] == 0.4
    assert cfg.sample_arguments.samples == [SampleSpec(name="topk_high_attention")]


def test_no_process_list_uses_save_exp_code(cwd: Path) -> None:
    path = write(
        cwd / "cfgs/run.yaml",
        """
        exp_arguments:
          save_exp_code: exp7
        data_arguments:
          process_list: null
        """,
    )
    cfg = load_config(path)
    assert cfg.data_arguments.process_list is None
    assert cfg.process_list_path == cwd / "cfgs/process_lists/exp7.csv"
    assert cfg.results_csv_path == cwd / "heatmaps/results/exp7.csv"


def test_block_rejects_unknown_name(cwd: Path) -> None:
    with pytest.raises(KeyError, match="did you mean 'heatmap_arguments'"):
        HeatmapConfig().block("heatmap_argument")


# --------------------------------------------------------------------------- messages


def test_unknown_key_names_file_line_and_suggestion(cwd: Path) -> None:
    path = write(
        cwd / "config.yaml",
        """
        # my heatmap config
        ---
        heatmap_arguments:
          vis_level: 2
          alpah: 0.5
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        "config.yaml:5 heatmap_arguments.alpah: unknown key (did you mean 'alpha'?)"
    )
    assert info.value.source == path


def test_unknown_key_without_close_match_lists_valid_keys(cwd: Path) -> None:
    path = write(cwd / "config.yaml", "encoder_arguments:\n  zzz: 1\n")
    assert problems_of(path) == [
        "config.yaml:2 encoder_arguments.zzz: unknown key (valid: model_name, target_img_size)"
    ]


def test_unknown_block(cwd: Path) -> None:
    path = write(cwd / "config.yaml", "exp_arguments: {}\nheatmap_argument:\n  alpha: 0.5\n")
    assert problems_of(path) == [
        "config.yaml:2 heatmap_argument: unknown block (did you mean 'heatmap_arguments'?)"
    ]


def test_alpha_out_of_bounds_names_key_value_and_bound(cwd: Path) -> None:
    path = write(cwd / "config.yaml", "heatmap_arguments:\n  alpha: 1.5\n")
    assert problems_of(path) == ["config.yaml:2 heatmap_arguments.alpha = 1.5: must be <= 1"]


def test_type_error_named_like_a_bound(cwd: Path) -> None:
    path = write(cwd / "config.yaml", 'heatmap_arguments:\n  alpha: "high"\n')
    assert problems_of(path) == ["config.yaml:2 heatmap_arguments.alpha = 'high': must be a number"]


def test_all_problems_reported_together_in_line_order(cwd: Path) -> None:
    path = write(
        cwd / "config.yaml",
        """
        exp_arguments:
          n_classes: 3
          batch_size: 0
        data_arguments:
          slide_ext: svs
          label_dict: {LUAD: 0, LSCC: 1}
        patching_arguments:
          overlap: 1.0
          patch_size: 256.0
        heatmap_arguments:
          cmap: jett
          save_ext: gif
        sample_arguments:
          samples:
            - {name: top, mode: top, k: 0}
            - {mdoe: topk}
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    expected = [
        "config.yaml:3 exp_arguments.batch_size = 0: must be >= 1",
        "config.yaml:5 data_arguments.slide_ext = 'svs': must start with '.' (e.g. '.svs')",
        "config.yaml:6 data_arguments.label_dict = {'LUAD': 0, 'LSCC': 1}: must have exactly "
        "n_classes (3) entries with values 0..2 (exp_arguments.n_classes = 3)",
        "config.yaml:8 patching_arguments.overlap = 1.0: must be < 1",
        "config.yaml:9 patching_arguments.patch_size = 256.0: must be an integer",
        "config.yaml:11 heatmap_arguments.cmap = 'jett': not a matplotlib colormap "
        "(did you mean 'jet'?)",
        "config.yaml:12 heatmap_arguments.save_ext = 'gif': must be one of jpg, jpeg, png, "
        "tiff, tif (did you mean 'tif'?)",
        "config.yaml:15 sample_arguments.samples[0].mode = 'top': must be one of 'topk', "
        "'reverse_topk', 'range_sample' or 'threshold'",
        "config.yaml:15 sample_arguments.samples[0].k = 0: must be >= 1",
        "config.yaml:16 sample_arguments.samples[1].name: missing required key",
        "config.yaml:16 sample_arguments.samples[1].mdoe: unknown key (did you mean 'mode'?)",
    ]
    assert info.value.problems == expected
    assert str(info.value) == "11 problems:\n  " + "\n  ".join(expected)


@pytest.mark.parametrize(
    ("n_classes", "label_dict", "rule"),
    [
        (3, "{LUAD: 0, LSCC: 1}", "entries with values 0..2 (exp_arguments.n_classes = 3)"),
        (2, "{LUAD: 0, LSCC: 2}", "entries with values 0..1 (exp_arguments.n_classes = 2)"),
        (2, "{LUAD: 1, LSCC: 1}", "entries with values 0..1 (exp_arguments.n_classes = 2)"),
    ],
)
def test_label_dict_must_match_n_classes(
    cwd: Path, n_classes: int, label_dict: str, rule: str
) -> None:
    path = write(
        cwd / "config.yaml",
        f"exp_arguments:\n  n_classes: {n_classes}\ndata_arguments:\n  label_dict: {label_dict}\n",
    )
    shown = repr(yaml.safe_load(label_dict))
    assert problems_of(path) == [
        f"config.yaml:4 data_arguments.label_dict = {shown}: must have exactly n_classes "
        f"({n_classes}) " + rule
    ]


def test_three_classes_with_matching_label_dict_loads(cwd: Path) -> None:
    path = write(
        cwd / "config.yaml",
        "exp_arguments:\n  n_classes: 3\ndata_arguments:\n  label_dict: {a: 2, b: 0, c: 1}\n",
    )
    assert load_config(path).data_arguments.label_names() == {2: "a", 0: "b", 1: "c"}


def test_data_dir_mapping_needs_data_dir_key(cwd: Path) -> None:
    path = write(
        cwd / "config.yaml",
        """
        data_arguments:
          data_dir:
            site_a: /slides/a
            site_b: slides_b
          data_dir_key: null
        """,
    )
    assert problems_of(path) == [
        "config.yaml:5 data_arguments.data_dir_key = None: must name the process-list column "
        "that selects a data_dir entry (data_dir is a mapping)"
    ]


def test_data_dir_mapping_resolves_each_folder(cwd: Path) -> None:
    (cwd / "cfg/slides_b").mkdir(parents=True)
    path = write(
        cwd / "cfg/config.yaml",
        "data_arguments:\n"
        "  data_dir: {site_a: /slides/a, site_b: slides_b}\n"
        "  data_dir_key: site\n",
    )
    data = load_config(path).data_arguments
    assert data.data_dir == {"site_a": Path("/slides/a"), "site_b": cwd / "cfg/slides_b"}
    assert data.data_dir_key == "site"


def test_data_dir_list_is_rejected(cwd: Path) -> None:
    path = write(cwd / "config.yaml", "data_arguments:\n  data_dir: [a, b]\n")
    assert problems_of(path) == [
        "config.yaml:2 data_arguments.data_dir = ['a', 'b']: must be a folder path or a "
        "mapping {key: folder}"
    ]


@pytest.mark.parametrize(
    ("block", "key", "value", "rule"),
    [
        ("patching_arguments", "overlap", "-0.1", "must be >= 0"),
        ("patching_arguments", "patch_size", "0", "must be > 0"),
        ("patching_arguments", "patch_level", "-1", "must be >= 0"),
        ("patching_arguments", "custom_downsample", "0", "must be >= 1"),
        ("heatmap_arguments", "alpha", "-0.5", "must be >= 0"),
        ("heatmap_arguments", "vis_level", "-2", "must be >= -1"),
        ("heatmap_arguments", "binary_thresh", "1.0", "must be -1 or in (0, 1)"),
        ("heatmap_arguments", "binary_thresh", "0", "must be -1 or in (0, 1)"),
        ("heatmap_arguments", "custom_downsample", "0", "must be >= 1"),
        ("heatmap_arguments", "blur", "maybe", "must be true or false"),
        ("heatmap_arguments", "use_roi", "2", "must be true or false"),
        ("exp_arguments", "n_classes", "1", "must be >= 2"),
        ("exp_arguments", "batch_size", "0", "must be >= 1"),
        ("exp_arguments", "save_exp_code", "2024", "must be a string"),
        ("model_arguments", "model_size", "huge", "must be one of 'small' or 'big'"),
        ("model_arguments", "embed_dim", "0", "must be >= 1"),
        ("model_arguments", "initiate_fn", "make_model", "must be one of 'initiate_model'"),
        ("model_arguments", "drop_out", "1.5", "must be a number in [0, 1] (or true/false)"),
        (
            "model_arguments",
            "model_type",
            "clam_ss",
            "must be one of clam_sb, clam_mb, clam, abmil, transmil, dsmil, ilra, rrt, "
            "transformer, wikg, dftd, mil_fc, mil_fc_mc, mil or a "
            "MIL-Lab name <model>.<config>.<encoder>.<task> (did you mean 'clam_sb'?)",
        ),
        ("data_arguments", "slide_ext", "tif", "must start with '.' (e.g. '.tif')"),
        ("data_arguments", "process_list", "''", "must be a non-empty path"),
        ("data_arguments", "preset", "5", "must be a path (a string)"),
        ("runner_arguments", "device", "gpu", "must be auto, cpu, cuda or cuda:N"),
        ("runner_arguments", "workers", "0", "must be >= 1"),
        ("runner_arguments", "patch_size_level0", "0", "must be >= 1"),
        (
            "runner_arguments",
            "log_level",
            "loud",
            "must be one of 'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'",
        ),
    ],
)
def test_each_rule(cwd: Path, block: str, key: str, value: str, rule: str) -> None:
    path = write(cwd / "config.yaml", f"{block}:\n  {key}: {value}\n")
    shown = repr(yaml.safe_load(value))
    if block == "runner_arguments" and key == "log_level":
        shown = repr(value.upper())
    assert problems_of(path) == [f"config.yaml:2 {block}.{key} = {shown}: {rule}"]


def test_sampler_rules(cwd: Path) -> None:
    path = write(
        cwd / "config.yaml",
        """
        sample_arguments:
          samples:
            - {name: mid, mode: range_sample, score_start: 0.6, score_end: 0.4}
            - {name: mid, mode: topk}
        """,
    )
    assert problems_of(path) == [
        "config.yaml:3 sample_arguments.samples[0].score_end = 0.4: must be >= score_start (0.6)"
    ]
    path = write(cwd / "config.yaml", "sample_arguments:\n  samples: [{name: a}, {name: a}]\n")
    assert problems_of(path) == [
        "config.yaml:2 sample_arguments.samples[1].name = 'a': duplicate sampler name "
        "(each sampler writes to its own folder)"
    ]


def test_conch_v1_5_needs_448(cwd: Path) -> None:
    path = write(cwd / "config.yaml", "encoder_arguments:\n  model_name: conch_v1_5\n")
    assert problems_of(path) == [
        "config.yaml:1 encoder_arguments.target_img_size = 224: must be 448 for conch_v1_5"
    ]


@pytest.mark.parametrize(
    "model_type",
    [
        "clam_sb",
        "clam_mb",
        "mil",
        "abmil",
        "transmil",
        "dsmil",
        "ilra",
        "rrt",
        "clam",
        "transformer",
    ]
    + ["abmil.base.uni_v2.pc108-24k", "transmil.base.conch_v15.none"],
)
def test_model_types_accepted(cwd: Path, model_type: str) -> None:
    path = write(cwd / "config.yaml", f"model_arguments:\n  model_type: {model_type}\n")
    assert load_config(path).model_arguments.model_type == model_type


def test_invalid_yaml_and_empty_file(cwd: Path) -> None:
    path = write(cwd / "config.yaml", "exp_arguments:\n  n_classes: 2\n bad: [\n")
    assert problems_of(path) == [
        "config.yaml:3 invalid YAML: while parsing a block mapping, expected <block end>, "
        "but found '<block mapping start>'"
    ]
    path = write(cwd / "empty.yaml", "# nothing\n")
    assert problems_of(path) == ["empty.yaml: the config is empty"]
    path = write(cwd / "list.yaml", "- exp_arguments\n")
    assert problems_of(path) == [
        "list.yaml: must be a mapping of blocks (exp_arguments, data_arguments, "
        "patching_arguments, encoder_arguments, model_arguments, heatmap_arguments, "
        "sample_arguments), got list"
    ]


# --------------------------------------------------------------------------- CLAM quirks


def test_clam_yaml_quirks_load(cwd: Path) -> None:
    path = write(
        cwd / "config.yaml",
        """
        # written for CLAM
        ---
        exp_arguments:
        model_arguments:
          drop_out: 0.
        patching_arguments:
          overlap: 0
        heatmap_arguments:
          alpha: 1e-1
          use_roi: 0
          binary_thresh: 0.25
        data_arguments:
          data_dir: slides
          data_dir_key: source
        """,
    )
    cfg = load_config(path)
    assert cfg.model_arguments.drop_out == 0.0
    assert cfg.patching_arguments.overlap == 0.0
    assert cfg.heatmap_arguments.alpha == pytest.approx(0.1)
    assert cfg.heatmap_arguments.use_roi is False
    assert cfg.exp_arguments.n_classes == 2  # empty block = template values
    assert cfg.data_arguments.data_dir == cwd / "slides"


def test_old_clam_bool_drop_out_is_accepted(cwd: Path) -> None:
    path = write(cwd / "config.yaml", "model_arguments:\n  drop_out: true\n")
    assert load_config(path).model_arguments.drop_out is True


# --------------------------------------------------------------------------- overrides


def test_clam_cli_overrides(cwd: Path) -> None:
    cfg = load_config(TEMPLATE, save_exp_code="run2", overlap=0.75)
    assert cfg.exp_arguments.save_exp_code == "run2"
    assert cfg.patching_arguments.overlap == 0.75
    assert problems_of(TEMPLATE, overlap=1.0) == ["--overlap 1.0: must be < 1"]


def test_set_overrides_are_typed_by_yaml(cwd: Path) -> None:
    cfg = load_config(
        TEMPLATE,
        overrides=[
            "heatmap_arguments.alpha=0.5",
            "heatmap_arguments.blur=true",
            "runner_arguments.device=cuda:1",
            "sample_arguments.samples=[{name: low, mode: reverse_topk, k: 3}]",
        ],
    )
    assert cfg.heatmap_arguments.alpha == 0.5
    assert cfg.heatmap_arguments.blur is True
    assert cfg.runner_arguments.device == "cuda:1"
    assert cfg.sample_arguments.samples == [SampleSpec(name="low", mode="reverse_topk", k=3)]


def test_set_override_errors_name_the_override(cwd: Path) -> None:
    problems = problems_of(
        TEMPLATE,
        overrides=[
            "heatmap_arguments.alpah=0.5",
            "heatmap_arguments.alpha=1.5",
            "heatmap_argument.alpha=0.5",
            "alpha=0.5",
            "sample_arguments.samples=[{name: x, mode: top}]",
        ],
    )
    assert problems == [
        "--set heatmap_arguments.alpah=0.5: unknown key (did you mean 'alpha'?)",
        "--set heatmap_arguments.alpha=1.5: must be <= 1",
        "--set heatmap_argument.alpha=0.5: unknown block (did you mean 'heatmap_arguments'?)",
        "--set alpha=0.5: expected BLOCK.KEY=VALUE (e.g. heatmap_arguments.alpha=0.5)",
        "--set sample_arguments.samples=[{name: x, mode: top}]: "
        "sample_arguments.samples[0].mode = 'top': must be one of 'topk', 'reverse_topk', "
        "'range_sample' or 'threshold'",
    ]


def test_override_fixes_a_bad_yaml_value(cwd: Path) -> None:
    path = write(cwd / "config.yaml", "heatmap_arguments:\n  alpha: 3\n")
    assert problems_of(path) == ["config.yaml:2 heatmap_arguments.alpha = 3: must be <= 1"]
    cfg = load_config(path, overrides=["heatmap_arguments.alpha=0.3"])
    assert cfg.heatmap_arguments.alpha == 0.3


def test_cli_flags_win_over_set(cwd: Path) -> None:
    cfg = load_config(
        TEMPLATE, overrides=["patching_arguments.overlap=0.25"], overlap=0.9, save_exp_code="x"
    )
    assert cfg.patching_arguments.overlap == 0.9


# --------------------------------------------------------------------------- paths


def test_relative_paths_config_folder_first_then_cwd(cwd: Path) -> None:
    (cwd / "cfg/ckpts").mkdir(parents=True)
    (cwd / "cfg/ckpts/model.pt").write_bytes(b"")
    path = write(
        cwd / "cfg/config.yaml",
        """
        model_arguments:
          ckpt_path: ckpts/model.pt
        exp_arguments:
          raw_save_dir: out/raw
          production_save_dir: ~/prod
        data_arguments:
          data_dir: /abs/slides/../slides
          preset: ../presets/p.csv
        """,
    )
    cfg = load_config(path)
    assert cfg.model_arguments.ckpt_path == cwd / "cfg/ckpts/model.pt"  # exists next to config
    assert cfg.exp_arguments.raw_save_dir == cwd / "out/raw"  # not there: CWD, like CLAM
    assert cfg.exp_arguments.production_save_dir == Path.home() / "prod"
    assert cfg.data_arguments.data_dir == Path("/abs/slides")
    assert cfg.data_arguments.preset == cwd.parent / "presets/p.csv"


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("cfg/process_lists", "cfg/process_lists"),
        ("cfg/heatmaps/process_lists", "cfg/heatmaps/process_lists"),
        ("heatmaps/process_lists", "heatmaps/process_lists"),  # CLAM layout, run from its root
        ("process_lists", "process_lists"),
        ("cfg", "cfg"),
        (None, "process_lists"),  # nowhere: where the list builder will create it
    ],
)
def test_bare_process_list_name_is_searched(cwd: Path, where: str | None, expected: str) -> None:
    if where is not None:
        write(cwd / where / "demo.csv", "slide_id,label\n")
    path = write(cwd / "cfg/config.yaml", "data_arguments:\n  process_list: demo.csv\n")
    assert load_config(path).data_arguments.process_list == cwd / expected / "demo.csv"


def test_process_list_search_prefers_config_folder(cwd: Path) -> None:
    write(cwd / "process_lists/demo.csv", "slide_id\n")
    write(cwd / "cfg/process_lists/demo.csv", "slide_id\n")
    path = write(cwd / "cfg/config.yaml", "data_arguments:\n  process_list: demo.csv\n")
    assert load_config(path).process_list_path == cwd / "cfg/process_lists/demo.csv"


def test_clam_repo_layout(cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """heatmaps/configs + heatmaps/process_lists work from the repo root and from elsewhere."""
    write(cwd / "heatmaps/process_lists/heatmap_demo_dataset.csv", "slide_id,label\n")
    config = cwd / "heatmaps/configs/config_template.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(TEMPLATE.read_text())
    expected = cwd / "heatmaps/process_lists/heatmap_demo_dataset.csv"
    assert load_config("config_template.yaml").process_list_path == expected
    monkeypatch.chdir(cwd.parent)
    assert load_config(config).process_list_path == expected


def test_process_list_with_separator_uses_the_path_rule(cwd: Path) -> None:
    path = write(cwd / "cfg/config.yaml", "data_arguments:\n  process_list: lists/demo.csv\n")
    assert load_config(path).data_arguments.process_list == cwd / "lists/demo.csv"


@pytest.mark.parametrize("folder", [".", "configs", "heatmaps/configs"])
def test_find_config_bare_name(cwd: Path, folder: str) -> None:
    target = write(cwd / folder / "mine.yaml", "exp_arguments: {}\n")
    assert find_config("mine.yaml") == target
    assert find_config("mine") == target
    assert load_config("mine.yaml").source_path == target


def test_find_config_not_found(cwd: Path) -> None:
    with pytest.raises(ConfigError) as info:
        find_config("nope.yaml")
    assert str(info.value) == (
        f"config 'nope.yaml' not found (looked in ./, configs/, heatmaps/configs/ under {cwd})"
    )
    assert info.value.exit_code == 2


def test_config_from_dict_resolves_against_base_dir(cwd: Path, tmp_path: Path) -> None:
    (tmp_path / "base/slides").mkdir(parents=True)
    cfg = config_from_dict({"data_arguments": {"data_dir": "slides"}}, base_dir=tmp_path / "base")
    assert cfg.data_arguments.data_dir == tmp_path / "base/slides"
    assert cfg.config_dir == tmp_path / "base"
    assert cfg.source_path is None
    with pytest.raises(ConfigError) as info:
        config_from_dict({"patching_arguments": {"overlap": 2}}, source="row 3")
    assert str(info.value) == "row 3 patching_arguments.overlap = 2: must be < 1"


# --------------------------------------------------------------------------- round trip


def test_to_yaml_dict_round_trips_through_load(cwd: Path, tmp_path: Path) -> None:
    (cwd / "cfg/slides_a").mkdir(parents=True)
    source = write(
        cwd / "cfg/config.yaml",
        """
        exp_arguments:
          n_classes: 3
          save_exp_code: "2024"
        data_arguments:
          data_dir: {a: slides_a, b: /data/b}
          data_dir_key: site
          process_list: null
          label_dict: {x: 0, y: 1, z: 2}
        model_arguments:
          model_type: abmil.base.uni_v2.pc108-24k
          model_size: null
        heatmap_arguments:
          vis_level: -1
          cmap: coolwarm
        sample_arguments:
          samples:
            - {name: top, k: 5}
            - {name: mid, mode: range_sample, score_start: 45, score_end: 55, seed: 3}
        runner_arguments:
          device: cpu
          features_dir: /features
          write_geojson: true
        """,
    )
    cfg = load_config(source)
    saved = tmp_path / "elsewhere/config.yaml"
    saved.parent.mkdir()
    saved.write_text(yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False))
    again = load_config(saved)
    assert again.to_yaml_dict() == cfg.to_yaml_dict()
    for name in BLOCK_NAMES:
        assert getattr(again, name) == getattr(cfg, name)
    assert again.exp_arguments.save_exp_code == "2024"
    assert again.data_arguments.data_dir == {"a": cwd / "cfg/slides_a", "b": Path("/data/b")}


def test_model_type_is_checked_against_the_models_registry(cwd: Path) -> None:
    """A model registered at run time validates; the names come from one list."""
    from clam_heat.models import registry

    path = write(cwd / "config.yaml", "model_arguments:\n  model_type: toy.base.uni.none\n")
    assert problems_of(path) == [
        "config.yaml:2 model_arguments.model_type = 'toy.base.uni.none': must be one of "
        + ", ".join([*registry.registered_models(), "mil"])
        + " or a MIL-Lab name <model>.<config>.<encoder>.<task>"
    ]
    registry.register_model("toy", lambda *, in_dim, n_classes: None)
    try:
        assert load_config(path).model_arguments.model_type == "toy.base.uni.none"
    finally:
        registry._REGISTRY.pop("toy", None)
    for name in ("wikg.base.uni.none", "dftd.base.uni.none"):  # registered since issue #22
        path = write(cwd / "config.yaml", f"model_arguments:\n  model_type: {name}\n")
        assert load_config(path).model_arguments.model_type == name
    path = write(cwd / "config.yaml", "model_arguments:\n  model_type: mil.base.uni.none\n")
    [problem] = problems_of(path)
    assert "CLAM's MIL_fc has no attention map" in problem
    path = write(cwd / "config.yaml", "model_arguments:\n  model_type: dftd.base_afs\n")
    [problem] = problems_of(path)  # caught before torch is imported
    assert "MIL-Lab config 'base_afs' changes how dftd runs" in problem


def test_config_and_model_registry_import_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, clam_heat.config, clam_heat.models.registry as r; "
        "r.model_type_problem('abmil'); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
