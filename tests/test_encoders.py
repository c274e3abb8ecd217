"""The encoder path: encoders with timm layouts, patch reading, encoding, attention, H5 outputs.

Everything runs on real components: a pyramidal TIFF written here with tifffile and read through
OpenSlide, real torch networks (randomly initialised, no downloads), real HDF5 files and the
project's CLAM models. Mocks only inject faults (a failing ``os.replace``, a stand-in package).

The built-in networks are checked against timm itself through ``tests/data/timm/*.json``: the
state-dict keys and shapes of the networks CLAM builds with ``timm.create_model``, and timm's
outputs for small and full networks filled with deterministic weights (rules below, recorded in
each file). timm cannot be installed beside a CPU torch here, so those files were generated once
in a scratch environment; the tests that need timm itself skip without it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import struct
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import percentileofscore

from clam_heat import encoders
from clam_heat.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderError,
    PatchDataset,
    ResNet50Trunk,
    VisionTransformer,
    attention_logits,
    build_encoder,
    encode_patches,
    encoder_backend,
    find_encoder_weights,
    load_weights_file,
    overlap_scores,
    resample_abs_pos_embed,
    write_features_h5,
    write_scores_h5,
)
from clam_heat.errors import CheckpointError, FeatureError, OutputError
from clam_heat.heatmap import percentile_of_scores
from clam_heat.models import build_model
from clam_heat.models.inference import fixed_threads
from clam_heat.slide import open_slide

# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 512x384 RGB noise pyramid (levels 1, 2, 4), tiled and uncompressed, so pixels are exact."""
    import tifffile

    rng = np.random.default_rng(7)
    level0 = rng.integers(0, 256, size=(384, 512, 3), dtype=np.uint8)
    levels = [level0]
    for _ in range(2):
        prev = levels[-1].astype(np.float32)
        h, w = prev.shape[0] // 2, prev.shape[1] // 2
        levels.append(prev.reshape(h, 2, w, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8))
    path = tmp_path_factory.mktemp("pyramid") / "noise.tiff"
    with tifffile.TiffWriter(path) as tw:
        for i, data in enumerate(levels):
            tw.write(
                data,
                tile=(64, 64),
                photometric="rgb",
                compression=None,
                subfiletype=0 if i == 0 else 1,
                metadata=None,
            )
    return path


@pytest.fixture()
def no_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache and no CLAM weight variables."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.delenv("UNI_CKPT_PATH", raising=False)
    monkeypatch.delenv("CONCH_CKPT_PATH", raising=False)
    return hub


def _grid(n: int, step: int = 32, width: int = 512) -> np.ndarray:
    """n level-0 top-lefts on a row-major grid with ``step`` spacing."""
    per_row = width // step
    i = np.arange(n)
    return np.stack([(i % per_row) * step, (i // per_row) * step], axis=1).astype(np.int64)


# ----------------------------------------------------------------------------------- building


def test_unknown_name_lists_the_valid_names() -> None:
    with pytest.raises(EncoderError) as err:
        build_encoder("resnet50")
    assert str(err.value) == (
        "encoder_arguments.model_name 'resnet50' is not a known encoder (did you mean "
        "'resnet50_trunc'?); choose one of resnet50_trunc, uni_v1, conch_v1, conch_v1_5, tiny_cnn"
    )


def test_tiny_cnn_is_seeded_and_its_width_configurable() -> None:
    x = torch.rand(2, 3, 224, 224)
    a, b = build_encoder("tiny_cnn"), build_encoder("tiny_cnn")
    assert a.dim == 64 and a.weights == "seeded-random"
    assert a.mean == IMAGENET_MEAN and a.std == IMAGENET_STD and a.target_img_size == 224
    with torch.inference_mode():
        assert torch.equal(a.module(x), b.module(x))
        assert build_encoder("tiny_cnn", dim=32).module(x).shape == (2, 32)
    assert not a.module.training
    assert not any(p.requires_grad for p in a.module.parameters())


def test_resnet50_trunc_has_timm_keys_and_1024_outputs(no_hf_cache: Path) -> None:
    enc = build_encoder("resnet50_trunc", allow_random=True, backend="builtin")
    assert (enc.name, enc.dim, enc.weights) == ("resnet50_trunc", 1024, "random")
    keys = enc.module.state_dict()
    # stem 6 + 13 bottlenecks x 18 + 3 downsample branches x 6
    assert len(keys) == 258
    for key in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.num_batches_tracked",
        "layer2.3.conv3.weight",
        "layer3.0.downsample.1.bias",
        "layer3.5.bn3.running_mean",
    ):
        assert key in keys
    assert not any(k.startswith(("layer4", "fc")) for k in keys)
    assert keys["layer3.5.conv3.weight"].shape == (1024, 256, 1, 1)
    with torch.inference_mode():
        out = enc.module(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, 1024) and out.dtype == torch.float32


def test_resnet50_trunc_loads_a_full_timm_checkpoint_strictly(tmp_path: Path) -> None:
    """A timm ``resnet50`` file has layer4 and fc too; the trunk takes the rest, strictly."""
    enc = build_encoder("resnet50_trunc", allow_random=True, backend="builtin")
    gen = torch.Generator().manual_seed(3)
    state = {
        k: (torch.randn(v.shape, generator=gen) * 0.05 if v.is_floating_point() else v)
        for k, v in enc.module.state_dict().items()
    }
    for k in [k for k in state if k.endswith("running_var")]:
        state[k] = state[k].abs() + 1.0
    full = dict(state)
    full["layer4.0.conv1.weight"] = torch.zeros(512, 1024, 1, 1)
    full["fc.weight"], full["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    path = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.items()}}, path)

    loaded = build_encoder("resnet50_trunc", weights=path, backend="builtin")
    assert loaded.weights == str(path)
    for key, value in loaded.module.state_dict().items():
        assert torch.equal(value, state[key]), key

    # CLAM's wrapper module keeps the network under ``model.``; its state dict loads too
    clam_file = tmp_path / "clam_encoder.pt"
    torch.save({f"model.{k}": v for k, v in state.items()}, clam_file)
    again = build_encoder("resnet50_trunc", weights=clam_file, backend="builtin")
    assert all(torch.equal(v, state[k]) for k, v in again.module.state_dict().items())


def test_weights_are_found_in_the_hugging_face_cache(no_hf_cache: Path) -> None:
    enc = build_encoder("resnet50_trunc", allow_random=True)
    folder = no_hf_cache / "models--timm--resnet50.tv_in1k"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    target = folder / "snapshots" / "abc123" / "pytorch_model.bin"
    torch.save(enc.module.state_dict(), target)
    assert build_encoder("resnet50_trunc").weights == str(target)
    assert find_encoder_weights("resnet50_trunc") == target
    assert find_encoder_weights("uni_v1") is None
    assert find_encoder_weights("tiny_cnn") is None


def test_missing_weights_say_where_it_looked_and_how_to_fix(no_hf_cache: Path) -> None:
    with pytest.raises(EncoderError) as err:
        build_encoder("resnet50_trunc")
    assert str(err.value) == (
        "encoder 'resnet50_trunc': no weights found (looked at runner_arguments.encoder_weights "
        f"(not set); {no_hf_cache}/models--timm--resnet50.tv_in1k/snapshots/*/"
        "{model.safetensors,pytorch_model.bin}); run `huggingface-cli download "
        "timm/resnet50.tv_in1k` once on a machine with internet and set "
        "runner_arguments.encoder_weights to the weights file (no downloads are made)"
    )
    with pytest.raises(EncoderError, match=r"\$UNI_CKPT_PATH \(not set\)"):
        build_encoder("uni_v1")
    with pytest.raises(EncoderError) as err:
        build_encoder("tiny_cnn", weights=no_hf_cache / "nope.bin")
    assert str(err.value) == (
        f"{no_hf_cache}/nope.bin: encoder weights file not found "
        "(fix runner_arguments.encoder_weights)"
    )


def test_uni_env_variable_is_honoured(no_hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLAM reads UNI from $UNI_CKPT_PATH; a wrong file there fails on its keys, naming it."""
    bogus = no_hf_cache.parent / "uni.bin"
    torch.save({"cls_token": torch.zeros(1, 1, 1024)}, bogus)
    monkeypatch.setenv("UNI_CKPT_PATH", str(bogus))
    with pytest.raises(EncoderError, match=r"uni\.bin: weights do not fit encoder 'uni_v1' \("):
        build_encoder("uni_v1", device="meta")


def test_safetensors_weights_load_without_the_package(tmp_path: Path) -> None:
    """The safetensors layout, written by hand from its spec, is read by the built-in reader."""
    source = build_encoder("tiny_cnn", dim=8).module.state_dict()
    state = {k: torch.randn(v.shape) for k, v in source.items()}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for key, value in state.items():
        raw = value.numpy().astype("<f4").tobytes()
        header[key] = {
            "dtype": "F32",
            "shape": list(value.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))

    read = encoders.weights._read_safetensors(path)
    assert all(torch.equal(read[k], state[k]) for k in state)
    enc = build_encoder("tiny_cnn", dim=8, weights=path)
    assert all(torch.equal(v, state[k]) for k, v in enc.module.state_dict().items())


def test_weights_that_do_not_fit_are_refused_with_the_key(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(build_encoder("tiny_cnn", dim=8).module.state_dict(), path)
    with pytest.raises(EncoderError) as err:
        build_encoder("tiny_cnn", dim=16, weights=path)
    assert str(err.value) == (
        f"{path}: weights do not fit encoder 'tiny_cnn' (shape mismatch body.4.bias (8,) vs "
        "(16,)); check encoder_arguments.model_name and runner_arguments.encoder_weights"
    )
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match=r"junk\.bin: encoder weights cannot be read"):
        load_weights_file(junk)


def test_embed_dim_mismatch_is_refused_up_front() -> None:
    with pytest.raises(EncoderError) as err:
        build_encoder("resnet50_trunc", allow_random=True, dim=512)
    assert str(err.value) == (
        "encoder 'resnet50_trunc' produces 1024-d features but model_arguments.embed_dim is "
        "512; use the encoder the checkpoint was trained on"
    )


def test_small_vit_runs_at_any_size_and_reloads_strictly() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=4).eval()
    with torch.inference_mode():
        out64 = vit(torch.rand(2, 3, 64, 64))
        out96 = vit(torch.rand(2, 3, 96, 80))  # 6x5 grid: position embeddings resampled
    assert out64.shape == out96.shape == (2, 32)
    assert torch.isfinite(out96).all()

    torch.manual_seed(1)
    other = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=4).eval()
    other.load_state_dict(vit.state_dict(), strict=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(other(x), vit(x))
    assert torch.allclose(vit.blocks[0].ls1.gamma, torch.full((32,), 1e-5))


def test_pos_embed_resampling_keeps_the_class_token_and_identity_grid() -> None:
    pe = torch.randn(1, 1 + 16, 8)
    assert resample_abs_pos_embed(pe, (4, 4), (4, 4)) is pe
    out = resample_abs_pos_embed(pe, (6, 5), (4, 4))
    assert out.shape == (1, 31, 8)
    assert torch.equal(out[:, 0], pe[:, 0])


# ------------------------------------------------------------------- checked against timm

TIMM_DATA = Path(__file__).parent / "data" / "timm"

#: How the reference weights were filled; the fixture files carry the same text.
FILL_RULE = (
    "j = index of the key in sorted(state_dict keys); s = sin(0.731 * arange(numel) + j) in "
    "float64, reshaped row-major, cast to float32. running_var: 0.75 + 0.25 s; other 1-D "
    "'*weight'/'*gamma': 1 + 0.2 s; other 1-D (bias, running_mean): 0.1 s; cls_token, "
    "pos_embed: 0.5 s; every other tensor: s * 2 / sqrt(numel / shape[0]); integer tensors "
    "(num_batches_tracked) are left at 0."
)
INPUT_RULE = (
    "x[b, c, h, w] = sin(0.05 * h * (c + 1) + 0.07 * w + 0.9 * b + c) in float64, cast to "
    "float32 (B=2, C=3)."
)


def _timm_fixture(name: str) -> dict:
    return json.loads((TIMM_DATA / f"{name}.json").read_text())


def _fill_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``FILL_RULE`` for ``module``'s keys (also loaded into ``module``)."""
    state = module.state_dict()
    filled: dict[str, torch.Tensor] = {}
    for j, key in enumerate(sorted(state)):
        t = state[key]
        if not t.is_floating_point():
            filled[key] = torch.zeros_like(t, device="cpu")
            continue
        n = t.numel()
        s = torch.sin(0.731 * torch.arange(n, dtype=torch.float64) + j).reshape(t.shape)
        if key.endswith("running_var"):
            v = 0.75 + 0.25 * s
        elif t.ndim == 1 and key.endswith(("weight", "gamma")):
            v = 1 + 0.2 * s
        elif t.ndim == 1:
            v = 0.1 * s
        elif key in ("cls_token", "pos_embed"):
            v = 0.5 * s
        else:
            v = s * 2 / math.sqrt(n / t.shape[0])
        filled[key] = v.to(torch.float32)
    module.load_state_dict(filled, strict=True, assign=True)
    return filled


@pytest.fixture(scope="module")
def resnet50_reference() -> dict[str, torch.Tensor]:
    """``FILL_RULE`` weights of the full ``resnet50_trunc`` (8.5M values, made once)."""
    with torch.device("meta"):
        module = ResNet50Trunk()
    return _fill_weights(module)


def _fixture_input(h: int, w: int) -> torch.Tensor:
    b = torch.arange(2, dtype=torch.float64).view(2, 1, 1, 1)
    c = torch.arange(3, dtype=torch.float64).view(1, 3, 1, 1)
    y = torch.arange(h, dtype=torch.float64).view(1, 1, h, 1)
    x = torch.arange(w, dtype=torch.float64).view(1, 1, 1, w)
    return torch.sin(0.05 * y * (c + 1) + 0.07 * x + 0.9 * b + c).to(torch.float32)


def _layout(module: torch.nn.Module) -> dict[str, tuple[list[int], str]]:
    return {
        k: (list(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in module.state_dict().items()
    }


def _builtin(name: str) -> torch.nn.Module:
    """The built-in network that mirrors each reference file's timm network."""
    if name in ("resnet50_trunc", "uni_v1"):
        return build_encoder(name, allow_random=True, backend="builtin", device="meta").module
    if name == "vit_tiny":
        return VisionTransformer(embed_dim=64, depth=2, num_heads=2)
    return ResNet50Trunk(layers=(1, 1, 1), channels=(8, 16, 32))


def _assert_matches_outputs(name: str, module: torch.nn.Module, rel_tol: float) -> None:
    """``module`` (already filled) gives timm's outputs; error relative to the largest value."""
    doc = _timm_fixture(name)
    assert (doc["fill_rule"], doc["input_rule"]) == (FILL_RULE, INPUT_RULE)
    module.eval()
    for case in doc["outputs"]:
        _, _, h, w = case["input_shape"]
        with torch.inference_mode():
            got = module(_fixture_input(h, w))
        want = torch.tensor(case["values"])
        assert list(got.shape) == case["output_shape"] == list(want.shape)
        err = float((got - want).abs().max() / want.abs().max())
        assert err < rel_tol, (name, (h, w), err)


@pytest.mark.parametrize("name", ["resnet50_trunc", "uni_v1", "vit_tiny", "resnet_tiny_trunc"])
def test_state_dict_layout_is_timms(name: str) -> None:
    """Every key, shape and dtype equals what timm's ``create_model`` builds (meta device)."""
    doc = _timm_fixture(name)
    with torch.device("meta"):
        module = _builtin(name)
    want = {key: (shape, dtype) for key, shape, dtype in doc["keys"]}
    assert _layout(module) == want
    assert list(module.state_dict()) == list(want)  # same order as timm, too


# Rounding the references to 6 significant digits costs ~3e-6 of the largest value; a LayerNorm
# eps of 1e-5 instead of 1e-6 or a tanh GELU already shows as ~2e-5, no antialiasing when
# resampling position embeddings as ~4e-3, a wrong BN eps as ~2e-3.
@pytest.mark.parametrize(
    ("name", "rel_tol"), [("vit_tiny", 1e-5), ("resnet_tiny_trunc", 1e-5), ("resnet50_trunc", 5e-5)]
)
def test_outputs_equal_timms_with_the_same_weights(
    name: str, rel_tol: float, resnet50_reference: dict[str, torch.Tensor]
) -> None:
    """Same weights, same input: timm's numbers. ``vit_tiny`` also runs a 176x240 input (11x15
    patches), so position-embedding resampling (``dynamic_img_size``) is compared too."""
    with torch.device("meta"):
        module = _builtin(name)
    if name == "resnet50_trunc":
        module.load_state_dict(resnet50_reference, strict=True, assign=True)
    else:
        _fill_weights(module)
    _assert_matches_outputs(name, module, rel_tol)


@pytest.fixture()
def timm_fails_to_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``timm`` whose import fails the way it does with a torchvision built for another torch."""
    pkg = tmp_path / "fake_site" / "timm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n'
    )
    monkeypatch.syspath_prepend(str(pkg.parent))
    for mod in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, mod)
    encoders.build._import_timm.cache_clear()
    yield
    encoders.build._import_timm.cache_clear()


@pytest.mark.usefixtures("timm_fails_to_import")
def test_without_a_working_timm_the_builtin_networks_are_used(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="clam_heat.encoders"):
        enc = build_encoder("resnet50_trunc", allow_random=True)
    assert isinstance(enc.module, ResNet50Trunk)
    assert enc.backend == "builtin" and enc.fingerprint()["backend"] == "builtin"
    assert caplog.messages == [
        "encoder resnet50_trunc: built-in network (timm unavailable: RuntimeError: operator "
        "torchvision::nms does not exist)"
    ]
    assert encoder_backend("uni_v1") == encoder_backend("tiny_cnn") == "builtin"
    assert encoder_backend("conch_v1") == "package"
    with pytest.raises(EncoderError) as err:
        build_encoder("uni_v1", allow_random=True, device="meta", backend="timm")
    assert str(err.value) == (
        "encoder 'uni_v1': backend 'timm' requested but timm does not import (RuntimeError: "
        "operator torchvision::nms does not exist); install timm with a torchvision that "
        "matches your torch, or use backend 'auto'"
    )
    with pytest.raises(EncoderError, match=r"one of auto, timm, builtin, got 'tim'"):
        build_encoder("uni_v1", device="meta", backend="tim")  # type: ignore[arg-type]


def test_timm_branch_calls_create_model_as_clam_does(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_hf_cache: Path,
    resnet50_reference: dict[str, torch.Tensor],
) -> None:
    """With a stand-in ``timm`` (built-in networks behind timm's interface): CLAM's exact
    ``create_model`` arguments, the single feature map pooled, strict loading of a full timm
    checkpoint (layer4 and fc dropped), and the backend recorded in the fingerprint."""
    calls: list[tuple[str, dict]] = []

    class FeatureList(ResNet50Trunk):  # timm's FeatureListNet returns [map] for out_indices=(3,)
        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
            return [self.forward_features(x)]

    def create_model(name: str, **kwargs: object) -> torch.nn.Module:
        calls.append((name, kwargs))
        return FeatureList() if name.startswith("resnet") else VisionTransformer()

    fake = types.ModuleType("timm")
    fake.__version__ = "9.9.9"  # type: ignore[attr-defined]
    fake.create_model = create_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "timm", fake)
    encoders.build._import_timm.cache_clear()
    monkeypatch.setattr(encoders.build, "_import_timm", lambda: (fake, ""))

    with torch.device("meta"):
        reference = ResNet50Trunk()
    state = resnet50_reference
    reference.load_state_dict(state, strict=True, assign=True)
    full = dict(state)
    full["layer4.0.conv1.weight"] = torch.zeros(512, 1024, 1, 1)
    full["fc.weight"], full["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    path = tmp_path / "pytorch_model.bin"
    torch.save(full, path)

    enc = build_encoder("resnet50_trunc", weights=path)
    assert calls == [
        (
            "resnet50.tv_in1k",
            {"features_only": True, "out_indices": (3,), "pretrained": False, "num_classes": 0},
        )
    ]
    assert isinstance(enc.module, encoders.networks._TimmTrunk) and enc.backend == "timm==9.9.9"
    assert enc.fingerprint()["backend"] == "timm==9.9.9" and enc.weights == str(path)
    assert {k.removeprefix("model."): v for k, v in enc.module.state_dict().items()}.keys() == (
        state.keys()
    )
    x = _fixture_input(64, 64)
    with torch.inference_mode():
        # (the encoder runs channels-last, so equal up to float rounding)
        torch.testing.assert_close(enc.module(x), reference.eval()(x), rtol=1e-5, atol=1e-5)

    calls.clear()
    vit = build_encoder("uni_v1", allow_random=True, device="meta")
    assert calls == [
        (
            "vit_large_patch16_224",
            {"init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
        )
    ]
    assert vit.backend == "timm==9.9.9"
    assert build_encoder("uni_v1", device="meta", backend="builtin", allow_random=True).backend == (
        "builtin"
    )


def test_real_timm_builds_what_the_builtin_networks_mirror(
    tmp_path: Path, no_hf_cache: Path, resnet50_reference: dict[str, torch.Tensor]
) -> None:
    """Only where timm imports (it needs a torchvision matching torch): both backends load the
    same file strictly and give the same features, equal to the reference numbers."""
    timm = pytest.importorskip("timm")
    encoders.build._import_timm.cache_clear()
    path = tmp_path / "resnet50.bin"
    torch.save(resnet50_reference, path)
    via_timm = build_encoder("resnet50_trunc", weights=path, backend="timm")
    builtin = build_encoder("resnet50_trunc", weights=path, backend="builtin")
    assert via_timm.backend == f"timm=={timm.__version__}" and builtin.backend == "builtin"
    x = _fixture_input(96, 128)
    with torch.inference_mode():
        torch.testing.assert_close(via_timm.module(x), builtin.module(x), rtol=1e-5, atol=1e-5)
    _assert_matches_outputs("resnet50_trunc", via_timm.module, 5e-5)

    vit = build_encoder("uni_v1", allow_random=True, device="meta", backend="timm")
    want = {key: (shape, dtype) for key, shape, dtype in _timm_fixture("uni_v1")["keys"]}
    assert _layout(vit.module) == want


def test_conch_encoders_say_what_to_install() -> None:
    with pytest.raises(EncoderError) as err:
        build_encoder("conch_v1")
    assert str(err.value).startswith(
        "encoder 'conch_v1' needs the CONCH package: pip install "
        "git+https://github.com/Mahmoodlab/CONCH.git"
    )
    with pytest.raises(EncoderError) as err:
        build_encoder("conch_v1_5", target_img_size=448)
    assert str(err.value).startswith(
        "encoder 'conch_v1_5' needs Hugging Face transformers: pip install transformers"
    )
    with pytest.raises(EncoderError, match="needs encoder_arguments.target_img_size 448, got 224"):
        build_encoder("conch_v1_5")


def test_conch_v1_wraps_encode_image_as_clam_calls_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a stand-in ``conch`` package: the checkpoint path is passed on and the forward is
    ``encode_image(proj_contrast=False, normalize=False)``."""
    calls: dict[str, object] = {}

    class FakeConch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def encode_image(
            self, x: torch.Tensor, proj_contrast: bool, normalize: bool
        ) -> torch.Tensor:
            calls["flags"] = (proj_contrast, normalize)
            return x.mean(dim=(2, 3)).repeat(1, 171)[:, :512] * self.w

    def create(name: str, checkpoint_path: str) -> tuple[torch.nn.Module, None]:
        calls["create"] = (name, checkpoint_path)
        return FakeConch(), None

    pkg, sub = types.ModuleType("conch"), types.ModuleType("conch.open_clip_custom")
    sub.create_model_from_pretrained = create  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "conch", pkg)
    monkeypatch.setitem(sys.modules, "conch.open_clip_custom", sub)
    ckpt = tmp_path / "conch.bin"
    ckpt.write_bytes(b"x")
    monkeypatch.setenv("CONCH_CKPT_PATH", str(ckpt))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    enc = build_encoder("conch_v1")
    assert (enc.dim, enc.weights) == (512, str(ckpt))
    assert enc.mean == encoders.OPENAI_CLIP_MEAN
    assert calls["create"] == ("conch_ViT-B-16", str(ckpt))
    with torch.inference_mode():
        assert enc.module(torch.rand(2, 3, 8, 8)).shape == (2, 512)
    assert calls["flags"] == (False, False)


# ------------------------------------------------------------------------------ patch reading


def test_patch_dataset_reads_the_same_pixels_as_read_region(pyramid: Path) -> None:
    coords = np.array([[0, 0], [128, 64], [480, 352]], dtype=np.int64)  # last: half outside
    ds = PatchDataset(
        pyramid, coords, patch_level=1, patch_size=64, target_img_size=0, normalize=False
    )
    assert len(ds) == 3 and (ds.read_level, ds.read_size, ds.out_size) == (1, (64, 64), 64)
    with open_slide(pyramid) as slide:
        for i, (x, y) in enumerate(coords):
            expected = slide.read_region((int(x), int(y)), 1, (64, 64))
            item = ds[i]
            assert item.dtype == torch.uint8 and item.shape == (3, 64, 64)
            np.testing.assert_array_equal(item.permute(1, 2, 0).numpy(), expected)
    assert ds[2].permute(1, 2, 0).numpy()[20:, 20:].max() == 0  # beyond the slide: black
    ds.close()


def test_patch_dataset_resizes_and_normalises_like_clams_transforms(pyramid: Path) -> None:
    coords = np.array([[64, 32]], dtype=np.int64)
    ds = PatchDataset(pyramid, coords, patch_level=0, patch_size=64, target_img_size=48)
    with open_slide(pyramid) as slide:
        raw = slide.read_region((64, 32), 0, (64, 64))
    resized = np.asarray(Image.fromarray(raw).resize((48, 48), Image.Resampling.BILINEAR))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255 - mean) / std
    item = ds[0]
    assert item.dtype == torch.float32 and item.shape == (3, 48, 48)
    torch.testing.assert_close(item, expected, rtol=0, atol=1e-6)


def test_custom_downsample_reads_the_footprint_at_the_best_level(pyramid: Path) -> None:
    """cd=2 at level 0: 128 level-0 px, read as 64 px at level 1 (downsample 2). cd=2 at level 1:
    256 level-0 px, read at level 2 (CLAM would read 128 px at level 1 here,
    docs/rules/heatmaps.md#custom-downsample-level)."""
    coords = np.array([[128, 64]], dtype=np.int64)
    with open_slide(pyramid) as slide:
        at1 = slide.read_region((128, 64), 1, (64, 64))
        at2 = slide.read_region((128, 64), 2, (64, 64))
    ds0 = PatchDataset(
        pyramid,
        coords,
        patch_level=0,
        patch_size=64,
        custom_downsample=2,
        target_img_size=0,
        normalize=False,
    )
    assert (ds0.read_level, ds0.read_size) == (1, (64, 64))
    np.testing.assert_array_equal(ds0.image(0), at1)
    ds1 = PatchDataset(
        pyramid,
        coords,
        patch_level=1,
        patch_size=64,
        custom_downsample=2,
        target_img_size=0,
        normalize=False,
    )
    assert (ds1.read_level, ds1.read_size) == (2, (64, 64))
    np.testing.assert_array_equal(ds1.image(0), at2)
    # cd=3 has no matching level: 192 level-0 px read at level 1 (96 px) and resized to 64.
    ds3 = PatchDataset(
        pyramid,
        coords,
        patch_level=0,
        patch_size=64,
        custom_downsample=3,
        target_img_size=0,
        normalize=False,
    )
    assert (ds3.read_level, ds3.read_size) == (1, (96, 96))
    with open_slide(pyramid) as slide:
        raw = slide.read_region((128, 64), 1, (96, 96))
    expected = np.asarray(Image.fromarray(raw).resize((64, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(ds3.image(0), expected)


def test_patch_dataset_pickles_without_its_slide_handle(pyramid: Path) -> None:
    ds = PatchDataset(pyramid, _grid(3), patch_level=0, patch_size=32, target_img_size=0)
    first = ds[0]
    assert ds._slide is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._slide is None
    assert torch.equal(clone[0], first)
    ds.close()
    clone.close()


def test_patch_dataset_rejects_bad_inputs(pyramid: Path) -> None:
    with pytest.raises(FeatureError, match=r"coords must have shape \(N, 2\)"):
        PatchDataset(pyramid, np.zeros((3, 3)), patch_level=0, patch_size=32)
    with pytest.raises(FeatureError, match="whole level-0 pixel positions"):
        PatchDataset(pyramid, np.array([[0.5, 1.0]]), patch_level=0, patch_size=32)
    with pytest.raises(Exception, match="level 5 does not exist"):
        PatchDataset(pyramid, _grid(2), patch_level=5, patch_size=32)


# ----------------------------------------------------------------------------------- encoding


def test_encode_patches_is_independent_of_workers_and_batching(pyramid: Path) -> None:
    enc = build_encoder("tiny_cnn", target_img_size=64)
    coords = _grid(37)
    seen: list[int] = []
    kwargs = {"encoder": enc, "patch_level": 0, "patch_size": 32, "batch_size": 8}
    serial = encode_patches(pyramid, coords, num_workers=0, progress=seen.append, **kwargs)
    parallel = encode_patches(pyramid, coords, num_workers=2, **kwargs)
    assert serial.shape == (37, 64) and serial.dtype == np.float32
    assert seen == [8, 8, 8, 8, 5]
    np.testing.assert_array_equal(serial, parallel)

    ds = PatchDataset(pyramid, coords, patch_level=0, patch_size=32, target_img_size=64)
    with torch.inference_mode():
        direct = enc.module(torch.stack([ds[i] for i in range(len(ds))])).numpy()
    ds.close()
    np.testing.assert_allclose(serial, direct, rtol=1e-5, atol=1e-5)
    assert np.unique(serial.round(4), axis=0).shape[0] == 37  # every patch differs

    empty = encode_patches(pyramid, np.zeros((0, 2), np.int64), **kwargs)
    assert empty.shape == (0, 64)


def test_encode_patches_with_spawned_workers(pyramid: Path) -> None:
    """The dataset survives the spawn start method (nothing unpicklable, handle reopened)."""
    enc = build_encoder("tiny_cnn", target_img_size=0)
    coords = _grid(6)
    kwargs = {"encoder": enc, "patch_level": 0, "patch_size": 32, "batch_size": 4}
    np.testing.assert_array_equal(
        encode_patches(pyramid, coords, num_workers=1, mp_context="spawn", **kwargs),
        encode_patches(pyramid, coords, **kwargs),
    )


def test_encode_patches_refuses_a_device_the_encoder_is_not_on(pyramid: Path) -> None:
    enc = build_encoder("tiny_cnn")
    with pytest.raises(EncoderError, match=r"encoder is on cpu but device='meta' was requested"):
        encode_patches(pyramid, _grid(2), encoder=enc, patch_level=0, patch_size=32, device="meta")


# ---------------------------------------------------------------------------------- attention


def test_attention_logits_match_clam_attention_only() -> None:
    torch.manual_seed(0)
    feats = np.random.default_rng(0).standard_normal((11, 64)).astype(np.float32)
    sb = build_model("clam_sb", n_classes=2, embed_dim=64).eval()
    # the model's own forward on the thread count inference is pinned to (float sums depend
    # on it: on 2 threads these 11 logits differ in the last bits)
    with torch.inference_mode(), fixed_threads():
        expected = sb(torch.from_numpy(feats), attention_only=True)
    assert expected.shape == (1, 11)
    got = attention_logits(sb, feats, branch=None)
    assert got.dtype == np.float32 and got.shape == (11,)
    np.testing.assert_array_equal(got, expected[0].numpy())

    mb = build_model("clam_mb", n_classes=3, embed_dim=64).eval()
    with torch.inference_mode(), fixed_threads():
        expected = mb(torch.from_numpy(feats), attention_only=True)
    np.testing.assert_array_equal(attention_logits(mb, feats, branch=2), expected[2].numpy())
    with pytest.raises(CheckpointError) as err:
        attention_logits(mb, feats, branch=None)
    assert str(err.value) == (
        "model has 3 attention branches; branch must be the predicted class in 0..2, got None"
    )
    with pytest.raises(FeatureError, match="feature width 32 does not match"):
        attention_logits(sb, feats[:, :32], branch=None)


def test_overlap_scores_are_attention_of_encoded_patches_as_percentiles(pyramid: Path) -> None:
    enc = build_encoder("tiny_cnn", target_img_size=0)
    torch.manual_seed(0)
    model = build_model("clam_mb", n_classes=2, embed_dim=64).eval()
    coords = _grid(21, step=48)
    common = {"encoder": enc, "patch_level": 0, "patch_size": 48, "batch_size": 5}
    feats = encode_patches(pyramid, coords, **common)
    raw = overlap_scores(pyramid, coords, model=model, branch=1, reference_scores=None, **common)
    np.testing.assert_allclose(raw, attention_logits(model, feats, branch=1), rtol=1e-6)

    reference = np.concatenate([raw[::2], raw[:3]]).reshape(-1, 1)  # (N, 1) as CLAM passes it
    pct = overlap_scores(
        pyramid, coords, model=model, branch=1, reference_scores=reference, **common
    )
    expected = [percentileofscore(reference.ravel(), s, kind="rank") for s in raw]
    assert pct.dtype == np.float32
    np.testing.assert_allclose(pct, expected, rtol=1e-6)


def test_percentiles_match_scipy_rank_percentileofscore() -> None:
    ref = np.array([0.1, 0.5, 0.5, 0.9])
    np.testing.assert_array_equal(
        percentile_of_scores(np.array([0.5, 0.2, 1.0, 0.0, 0.9]), ref),
        [62.5, 25.0, 100.0, 0.0, 100.0],
    )
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 20, 200).astype(float)  # many ties
    scores = rng.integers(-2, 23, 50).astype(float)
    expected = [percentileofscore(ref, s, kind="rank") for s in scores]
    np.testing.assert_allclose(percentile_of_scores(scores, ref), expected)


# -------------------------------------------------------------------------------------- HDF5


def test_overlap_h5_name_is_clams() -> None:
    from clam_heat.rows import overlap_h5_name

    assert overlap_h5_name("C3L-01663-21", 0.5, False) == "C3L-01663-21_0.5_roi_False.h5"
    assert overlap_h5_name("s", 0, True) == "s_0_roi_True.h5"


def test_h5_writers_use_clams_layouts(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [256, 0], [0, 256]], dtype=np.int32)
    feats = np.arange(6, dtype=np.float64).reshape(3, 2)
    path = write_features_h5(tmp_path / "raw" / "s.h5", feats, coords, attrs={"encoder": {"a": 1}})
    with h5py.File(path) as h5:
        assert sorted(h5) == ["coords", "features"]
        assert h5["features"].dtype == np.float32 and h5["features"].shape == (3, 2)
        assert h5["coords"].dtype == np.int64
        np.testing.assert_array_equal(h5["coords"][:], coords)
        assert json.loads(h5.attrs["encoder"]) == {"a": 1}

    path = write_scores_h5(
        tmp_path / "s_0.5_roi_False.h5",
        np.array([0.5, 1.5, -1.0]),
        coords,
        coords_attrs={"patch_size_level0": 256},
    )
    with h5py.File(path) as h5:
        assert h5["coords"].attrs["patch_size_level0"] == 256
        assert sorted(h5) == ["attention_scores", "coords"]
        assert h5["attention_scores"].dtype == np.float32
        assert h5["attention_scores"].shape == (3, 1)
        np.testing.assert_array_equal(h5["attention_scores"][:, 0], [0.5, 1.5, -1.0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "s_0.5_roi_False.h5"]

    with pytest.raises(FeatureError) as err:
        write_scores_h5(tmp_path / "bad.h5", np.zeros(2), coords)
    assert str(err.value) == f"{tmp_path}/bad.h5: 2 score rows but 3 coords; they must match"


def test_h5_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    coords = np.zeros((2, 2), np.int64)
    target = write_scores_h5(tmp_path / "s_blockmap.h5", np.ones(2), coords)
    before = target.read_bytes()

    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OutputError, match="disk full"):
        write_scores_h5(target, np.zeros(2), coords)
    with pytest.raises(OutputError, match="disk full"):
        write_features_h5(tmp_path / "new.h5", np.zeros((2, 3)), coords)
    assert [p.name for p in tmp_path.iterdir()] == ["s_blockmap.h5"]  # no temp file left
    assert target.read_bytes() == before
