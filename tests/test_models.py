"""Models: CLAM and MIL-Lab-style attention networks on real torch checkpoints written to disk.

Reference forwards are written here independently (numpy, float64) from the state dict, so a
layout or maths slip in ``clam_heat.models`` cannot hide behind itself. For TransMIL, DSMIL,
ILRA, RRT and Transformer the reference is MIL-Lab itself: ``tests/data/mil_lab/<model>.json``
holds the state-dict keys and shapes of MIL-Lab's base config and the logits and attention its
networks give for deterministic weights and bag (each file says how it was produced).
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clam_heat.errors import CheckpointError, ConfigError, FeatureError
from clam_heat.models import (
    ENCODER_DIM_MAPPING,
    AttentionModel,
    ClamMB,
    ClamSB,
    MilLabModel,
    NystromAttention,
    build_model,
    load_checkpoint_state,
    load_model,
    parse_model_type,
    register_model,
    registered_models,
    resolve_device,
    run_attention,
)

SMALL = {
    "abmil": {"hidden_dim": 24, "attn_dim": 12},
    "transmil": {"hidden_dim": 32, "num_heads": 4},
    "dsmil": {"hidden_dim": 24, "attn_dim": 8},
    "ilra": {"hidden_dim": 32, "topk": 6},
    "rrt": {"hidden_dim": 32, "dim_head": 8, "pool_dim": 12},
    "transformer": {"hidden_dim": 32},
}
D = 16  # feature width of the small test bags


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Deterministic CPU maths whatever the host's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights (biases too), so attention is not flat and keys are not zeros."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model.eval()


def bag(n: int = 40, d: int = D, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def np_state(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in state.items()}


def gated_reference(
    s: dict[str, np.ndarray], h: np.ndarray, embed: str, attn: str, head: str
) -> tuple[np.ndarray, np.ndarray]:
    """Linear-ReLU embedding, gated attention, softmax pooling, linear head (CLAM_SB, ABMIL)."""
    e = np.maximum(h @ s[f"{embed}.weight"].T + s[f"{embed}.bias"], 0)
    a = np.tanh(e @ s[f"{attn}.attention_a.0.weight"].T + s[f"{attn}.attention_a.0.bias"])
    b = sigmoid(e @ s[f"{attn}.attention_b.0.weight"].T + s[f"{attn}.attention_b.0.bias"])
    raw = ((a * b) @ s[f"{attn}.attention_c.weight"].T + s[f"{attn}.attention_c.bias"])[:, 0]
    pooled = softmax(raw) @ e
    return pooled @ s[f"{head}.weight"].T + s[f"{head}.bias"], raw


# ============================================================================================
# CLAM


def test_clam_sb_state_dict_is_clams_exact_layout() -> None:
    state = ClamSB(n_classes=2, embed_dim=1024).state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes == {
        "attention_net.0.weight": (512, 1024),
        "attention_net.0.bias": (512,),
        "attention_net.3.attention_a.0.weight": (256, 512),
        "attention_net.3.attention_a.0.bias": (256,),
        "attention_net.3.attention_b.0.weight": (256, 512),
        "attention_net.3.attention_b.0.bias": (256,),
        "attention_net.3.attention_c.weight": (1, 256),
        "attention_net.3.attention_c.bias": (1,),
        "classifiers.weight": (2, 512),
        "classifiers.bias": (2,),
        "instance_classifiers.0.weight": (2, 512),
        "instance_classifiers.0.bias": (2,),
        "instance_classifiers.1.weight": (2, 512),
        "instance_classifiers.1.bias": (2,),
    }


def test_clam_mb_big_layout() -> None:
    shapes = {
        k: tuple(v.shape)
        for k, v in ClamMB(n_classes=3, embed_dim=64, size_arg="big").state_dict().items()
    }
    assert shapes["attention_net.3.attention_c.weight"] == (3, 384)
    assert shapes["classifiers.2.weight"] == (1, 512)
    assert "instance_classifiers.2.bias" in shapes and len(shapes) == 8 + 6 + 6


def test_clam_sb_dataparallel_checkpoint_loads_and_matches_reference(tmp_path: Path) -> None:
    model = randomise(ClamSB(n_classes=2, embed_dim=D))
    state = model.state_dict()
    saved = collections.OrderedDict(
        (k.replace("attention_net.", "attention_net.module.", 1), v) for k, v in state.items()
    )
    saved["instance_loss_fn.labels"] = torch.tensor([0, 1])
    ckpt = tmp_path / "s_0_checkpoint.pt"
    torch.save(saved, ckpt)

    loaded = load_model(ckpt, "clam_sb", n_classes=2, embed_dim=D, model_size="small")
    h = bag()
    out = run_attention(loaded, h)
    logits, raw = gated_reference(
        np_state(state), h.astype(np.float64), "attention_net.0", "attention_net.3", "classifiers"
    )
    np.testing.assert_allclose(out.logits, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.attention, raw, rtol=1e-5, atol=1e-5)  # raw, pre-softmax
    np.testing.assert_allclose(out.probs, softmax(logits), atol=1e-6)
    assert out.attention.dtype == np.float32 and out.attention.shape == (40,)
    assert list(out.top_ids) == list(np.argsort(-out.probs, kind="stable"))
    assert out.pred == int(np.argmax(logits))
    assert not loaded.training


@pytest.mark.parametrize("attention_dropout", [False, True])
def test_non_gated_clam_checkpoints_load(tmp_path: Path, attention_dropout: bool) -> None:
    model = randomise(
        ClamSB(n_classes=2, embed_dim=D, gate=False, attention_dropout=attention_dropout)
    )
    state = model.state_dict()
    last = (
        "attention_net.3.module.3.weight"
        if attention_dropout
        else "attention_net.3.module.2.weight"
    )
    assert last in state
    torch.save(state, tmp_path / "ck.pt")
    loaded = load_model(tmp_path / "ck.pt", "clam_sb", n_classes=2, embed_dim=D)
    np.testing.assert_allclose(
        run_attention(loaded, bag()).logits, run_attention(model, bag()).logits, atol=1e-6
    )


def test_clam_mb_uses_the_predicted_class_branch(tmp_path: Path) -> None:
    model = randomise(ClamMB(n_classes=3, embed_dim=D, size_arg="big"), seed=3)
    torch.save(model.state_dict(), tmp_path / "mb.pt")
    loaded = load_model(tmp_path / "mb.pt", "clam_mb", n_classes=3, embed_dim=D, model_size="big")
    h = bag(seed=5)
    out = run_attention(loaded, h)
    with torch.no_grad():
        a_raw = loaded(torch.from_numpy(h), attention_only=True)
    assert a_raw.shape == (3, 40)
    np.testing.assert_allclose(out.attention, a_raw[out.pred].numpy(), atol=1e-6)


def test_clam_mb_checkpoint_given_as_clam_sb_names_the_cause(tmp_path: Path) -> None:
    torch.save(ClamMB(n_classes=2, embed_dim=D).state_dict(), tmp_path / "mb.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "mb.pt", "clam_sb", n_classes=2, embed_dim=D)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'mb.pt'}: does not fit clam_sb (missing ")
    assert "unexpected classifiers.0.bias" in message
    assert message.endswith("likely cause: checkpoint is CLAM_MB; set model_type: clam_mb")


def test_embed_dim_mismatch_names_both_numbers(tmp_path: Path) -> None:
    torch.save(ClamSB(n_classes=2, embed_dim=D).state_dict(), tmp_path / "ck.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "ck.pt", "clam_sb", n_classes=2, embed_dim=1024)
    assert str(err.value) == (
        f"{tmp_path / 'ck.pt'}: does not fit clam_sb (shape mismatch attention_net.0.weight "
        "(512, 16) vs model (512, 1024)); likely cause: checkpoint expects embed_dim 16, config "
        "says 1024 (set model_arguments.embed_dim to the encoder's feature width)"
    )


def test_wrong_n_classes(tmp_path: Path) -> None:
    torch.save(ClamSB(n_classes=3, embed_dim=D).state_dict(), tmp_path / "ck.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "ck.pt", "clam_sb", n_classes=2, embed_dim=D)
    assert "unexpected instance_classifiers.2.bias" in str(err.value)
    assert str(err.value).endswith(
        "likely cause: checkpoint has 3 classes, config n_classes is 2 (set "
        "exp_arguments.n_classes and label_dict to match)"
    )


def test_wrong_model_size(tmp_path: Path) -> None:
    torch.save(ClamSB(n_classes=2, embed_dim=D, size_arg="big").state_dict(), tmp_path / "ck.pt")
    with pytest.raises(CheckpointError, match="checkpoint is model_size 'big'; set model_argu"):
        load_model(tmp_path / "ck.pt", "clam_sb", n_classes=2, embed_dim=D, model_size="small")
    loaded = load_model(tmp_path / "ck.pt", "clam_sb", n_classes=2, embed_dim=D, model_size="big")
    assert loaded.hidden == 384


class NotATensor:
    """Pickled by reference: a weights-only load must refuse it."""

    def __init__(self) -> None:
        self.value = 42


def test_pickled_non_tensor_object_is_refused(tmp_path: Path) -> None:
    state = ClamSB(n_classes=2, embed_dim=D).state_dict()
    state["extra"] = NotATensor()  # type: ignore[assignment]
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "evil.pt", "clam_sb", n_classes=2, embed_dim=D)
    message = str(err.value)
    assert message.startswith(
        f"{tmp_path / 'evil.pt'}: cannot be read as a weights-only torch checkpoint: it holds "
        "pickled Python objects"
    )
    assert message.endswith("save it with torch.save(model.state_dict(), path)")
    assert "\n" not in message


def test_whole_module_pickle_and_non_state_dicts_are_refused(tmp_path: Path) -> None:
    torch.save(ClamSB(n_classes=2, embed_dim=D), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint_state(tmp_path / "module.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        load_checkpoint_state(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint_state(tmp_path / "missing.pt")
    wrapped = {"state_dict": ClamSB(n_classes=2, embed_dim=D).state_dict(), "epoch": 3}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    assert "classifiers.weight" in load_checkpoint_state(tmp_path / "wrapped.pt")


def test_mil_lab_clam_checkpoint_loads_through_the_key_mapping(tmp_path: Path) -> None:
    model = randomise(ClamSB(n_classes=2, embed_dim=D, width=32, hidden=24), seed=4)
    renames = {
        "attention_net.0.": "model.patch_embed.0.",
        "attention_net.3.": "model.global_attn.",
        "classifiers.": "model.classifier.",
        "instance_classifiers.": "model.instance_classifiers.",
    }
    mil_lab = {}
    for key, value in model.state_dict().items():
        old = next(o for o in renames if key.startswith(o))
        mil_lab[renames[old] + key[len(old) :]] = value
    mil_lab["model.instance_loss_fn.labels"] = torch.tensor([0, 1])
    torch.save(mil_lab, tmp_path / "clam.pt")
    loaded = load_model(tmp_path / "clam.pt", "clam", n_classes=2, embed_dim=D)
    np.testing.assert_allclose(
        run_attention(loaded, bag()).logits, run_attention(model, bag()).logits, atol=1e-6
    )
    with pytest.raises(CheckpointError, match="this is a MIL-Lab checkpoint \\(it looks like clam"):
        load_model(tmp_path / "clam.pt", "clam_sb", n_classes=2, embed_dim=D)


# ============================================================================================
# inference


def test_feature_width_must_equal_embed_dim() -> None:
    model = ClamSB(n_classes=2, embed_dim=D).eval()
    with pytest.raises(FeatureError) as err:
        run_attention(model, bag(d=D + 1))
    assert str(err.value) == (
        "feature width 17 does not match model_arguments.embed_dim 16 (features come from a "
        "different encoder than the checkpoint)"
    )
    abmil = build_model("abmil", n_classes=2, embed_dim=D, **SMALL["abmil"]).eval()
    with pytest.raises(FeatureError, match="feature width 8 does not match .* 16"):
        run_attention(abmil, bag(d=8))


def test_one_forward_per_bag_under_inference_mode() -> None:
    model = ClamSB(n_classes=2, embed_dim=D).eval()
    calls: list[bool] = []
    model.register_forward_hook(lambda *_: calls.append(torch.is_inference_mode_enabled()))
    run_attention(model, bag())
    assert calls == [True]


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(CheckpointError, match="no CUDA device is available"):
            resolve_device("cuda:0")


# ============================================================================================
# MIL-Lab-style models


@pytest.mark.parametrize("name", sorted(SMALL))
def test_each_model_round_trips_strictly_with_identical_outputs(tmp_path: Path, name: str) -> None:
    model = randomise(build_model(name, n_classes=3, embed_dim=D, **SMALL[name]), seed=2)
    state = model.state_dict()
    assert all(key.startswith("model.") for key in state)
    torch.save(state, tmp_path / f"{name}.pt")
    loaded = load_model(tmp_path / f"{name}.pt", name, n_classes=3, embed_dim=D)
    assert isinstance(loaded, AttentionModel)
    for n in (1, 7, 50):
        h = bag(n, seed=n)
        expected = run_attention(model, h)
        got = run_attention(loaded, h)
        assert got.attention.shape == (n,) and got.attention.dtype == np.float32
        assert np.isfinite(got.attention).all()
        np.testing.assert_array_equal(got.logits, expected.logits)
        np.testing.assert_array_equal(got.attention, expected.attention)
        assert got.probs.shape == (3,) and abs(float(got.probs.sum()) - 1) < 1e-5


@pytest.mark.parametrize("name", ["dsmil", "ilra", "rrt"])
def test_pooling_weights_sum_to_one(name: str) -> None:
    model = randomise(build_model(name, n_classes=2, embed_dim=D, **SMALL[name]))
    out = run_attention(model, bag(33))
    assert abs(float(out.attention.sum()) - 1.0) < 1e-5 and (out.attention >= 0).all()


def test_transformer_attention_is_the_class_row_without_itself() -> None:
    model = randomise(build_model("transformer", n_classes=2, embed_dim=D, hidden_dim=32))
    out = run_attention(model, bag(20))
    assert 0 < float(out.attention.sum()) < 1 and (out.attention > 0).all()


def test_transmil_pads_to_a_square_and_slices_back() -> None:
    model = randomise(build_model("transmil", n_classes=2, embed_dim=D, **SMALL["transmil"]))
    seen: list[int] = []
    model.model.blocks[0].register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    for n, tokens in ((50, 65), (49, 50), (1, 2), (300, 325)):  # cls + ceil(sqrt(n))^2
        assert run_attention(model, bag(n)).attention.shape == (n,)
        assert seen[-1] == tokens


def test_nystrom_is_softmax_attention_when_landmark_groups_are_constant() -> None:
    """When every group of tokens a landmark averages is constant, the landmarks are the
    distinct tokens and Nystrom is exact up to the iterative pseudo-inverse: it must agree with
    plain softmax attention plus the value convolution (written out here)."""
    attn = NystromAttention(32, heads=4, dim_head=8, landmarks=16).double().eval()
    randomise(attn)
    x = torch.randn(16, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x.repeat_interleave(5, 0)  # 80 tokens, 16 landmarks of 5 equal tokens each
    with torch.no_grad():
        got = attn(x)
        q, k, v = attn.to_qkv(x).reshape(80, 3, 4, 8).permute(1, 2, 0, 3)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
        out = weights @ v + attn.res_conv(v[None])[0]
        expected = attn.to_out(out.permute(1, 0, 2).reshape(80, 32))
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()


def test_dsmil_attention_is_the_predicted_class_column() -> None:
    model = randomise(build_model("dsmil", n_classes=2, embed_dim=D, **SMALL["dsmil"]), seed=7)
    net = model.model
    assert tuple(net.classifier.weight.shape) == (2, 2, 24)  # Conv1d bag head (C, C, E)
    assert tuple(net.b_classifier.fcc.weight.shape) == (3, 3, 24)  # MIL-Lab's, unused
    h = bag(25, seed=9)
    out = run_attention(model, h)
    with torch.no_grad():
        e = net.patch_embed(torch.from_numpy(h))
        q = net.b_classifier.q(e)
        crit = q[net.i_classifier.inst_classifier(e).argmax(0)]
        a = torch.softmax(q @ crit.T / np.sqrt(q.shape[1]), dim=0)
    np.testing.assert_allclose(out.attention, a[:, out.pred].numpy(), atol=1e-6)
    with torch.no_grad():
        net.b_classifier.fcc.weight.fill_(1e3)  # never used, as in MIL-Lab
    np.testing.assert_array_equal(run_attention(model, h).logits, out.logits)


def test_abmil_is_mil_labs_layout_and_forward(tmp_path: Path) -> None:
    model = randomise(build_model("abmil", n_classes=2, embed_dim=D, **SMALL["abmil"]), seed=8)
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "model.patch_embed.0.weight": (24, D),
        "model.patch_embed.0.bias": (24,),
        "model.global_attn.attention_a.0.weight": (12, 24),
        "model.global_attn.attention_a.0.bias": (12,),
        "model.global_attn.attention_b.0.weight": (12, 24),
        "model.global_attn.attention_b.0.bias": (12,),
        "model.global_attn.attention_c.weight": (1, 12),
        "model.global_attn.attention_c.bias": (1,),
        "model.classifier.weight": (2, 24),
        "model.classifier.bias": (2,),
    }
    h = bag(30, seed=4)
    logits, raw = gated_reference(
        np_state(state),
        h.astype(np.float64),
        "model.patch_embed.0",
        "model.global_attn",
        "model.classifier",
    )
    for variant, saved in {
        "model": state,
        "module.model": {f"module.{k}": v for k, v in state.items()},
        "inner": {k[len("model.") :]: v for k, v in state.items()},
    }.items():
        torch.save(saved, tmp_path / f"{variant}.pt")
        loaded = load_model(tmp_path / f"{variant}.pt", "abmil", n_classes=2, embed_dim=D)
        out = run_attention(loaded, h)
        np.testing.assert_allclose(out.logits, logits, atol=1e-5, err_msg=variant)
        np.testing.assert_allclose(out.attention, raw, atol=1e-5, err_msg=variant)


def test_mil_lab_name_takes_in_dim_from_the_encoder(tmp_path: Path) -> None:
    model = build_model(
        "abmil.base.conch_v1.none", n_classes=2, embed_dim=512, hidden_dim=8, attn_dim=4
    )
    assert model.in_dim == ENCODER_DIM_MAPPING["conch_v1"] == 512
    torch.save(model.state_dict(), tmp_path / "a.pt")
    loaded = load_model(tmp_path / "a.pt", "abmil.base.conch_v1.none", n_classes=2, embed_dim=512)
    assert run_attention(loaded, bag(5, d=512)).attention.shape == (5,)
    with pytest.raises(ConfigError) as err:
        load_model(tmp_path / "a.pt", "abmil.base.uni_v2.none", n_classes=2, embed_dim=512)
    assert str(err.value) == (
        "model_arguments.model_type 'abmil.base.uni_v2.none': encoder 'uni_v2' gives 1536-d "
        "features but model_arguments.embed_dim is 512; set embed_dim: 1536 or fix the name"
    )


def test_parse_model_type_names_and_refusals() -> None:
    assert parse_model_type("ABMIL", embed_dim=32).in_dim == 32
    assert parse_model_type("transmil.base", embed_dim=32).name == "transmil"
    assert parse_model_type("abmil.base.uni_v1.none", embed_dim=1024).in_dim == 1024  # TRIDENT
    assert parse_model_type("clam.base_ce.uni.none", embed_dim=1024).name == "clam"  # MIL-Lab CLAM
    assert {"abmil", "transmil", "dsmil", "ilra", "rrt"} <= set(registered_models())
    assert parse_model_type("wikg.base.uni.none", embed_dim=1024).name == "wikg"  # issue #22
    assert parse_model_type("dftd.base.conch_v15.none", embed_dim=768).name == "dftd"
    with pytest.raises(ConfigError) as err:  # same keys as base, another distillation rule
        parse_model_type("dftd.base_afs.uni.none", embed_dim=1024)
    assert str(err.value) == (
        "model_arguments.model_type 'dftd.base_afs.uni.none': MIL-Lab config 'base_afs' changes "
        "how dftd runs in ways its checkpoint does not record; clam-heat runs only dftd.base "
        "(name it only for a model trained with it)"
    )
    with pytest.raises(ConfigError, match="CLAM's MIL_fc has no attention map"):
        parse_model_type("mil", embed_dim=1024)
    with pytest.raises(ConfigError, match="unknown encoder 'genbio-pathfm'.*use the bare name"):
        parse_model_type("abmil.base.genbio-pathfm.none", embed_dim=1024)
    with pytest.raises(ConfigError, match="unknown model \\(use one of clam_sb, clam_mb, clam, "):
        parse_model_type("mambamil", embed_dim=1024)


def test_registry_load_errors_name_the_cause(tmp_path: Path) -> None:
    transmil = build_model("transmil", n_classes=2, embed_dim=D, **SMALL["transmil"])
    torch.save(transmil.state_dict(), tmp_path / "t.pt")
    with pytest.raises(
        CheckpointError,
        match="likely cause: checkpoint looks like transmil, not abmil; set model_type: transmil",
    ):
        load_model(tmp_path / "t.pt", "abmil", n_classes=2, embed_dim=D)

    abmil = build_model("abmil", n_classes=3, embed_dim=D, **SMALL["abmil"])
    torch.save(abmil.state_dict(), tmp_path / "a.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "a.pt", "abmil", n_classes=3, embed_dim=32)
    assert str(err.value).endswith(
        "likely cause: checkpoint expects 16-d features, model_arguments.embed_dim gives 32"
    )
    with pytest.raises(CheckpointError, match="checkpoint has 3 classes, config n_classes is 2"):
        load_model(tmp_path / "a.pt", "abmil", n_classes=2, embed_dim=D)
    headless = {k: v for k, v in abmil.state_dict().items() if "classifier" not in k}
    torch.save(headless, tmp_path / "feather.pt")
    with pytest.raises(CheckpointError, match="no classifier head \\(e.g. FEATHER pc108-24k"):
        load_model(tmp_path / "feather.pt", "abmil", n_classes=3, embed_dim=D)
    torch.save(ClamSB(n_classes=2, embed_dim=D).state_dict(), tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="this is a CLAM checkpoint; set model_type: clam_sb"):
        load_model(tmp_path / "c.pt", "ilra", n_classes=2, embed_dim=D)


def test_bag_size_guard() -> None:
    model = build_model("transformer", n_classes=2, embed_dim=D, hidden_dim=16)
    assert model.max_bag_size == 20_000
    with pytest.raises(FeatureError) as err:
        run_attention(model, bag(12), max_bag_size=10)
    assert str(err.value) == (
        "bag has 12 patches, above the 10-patch limit for transformer (its attention cost grows "
        "with N^2); patch at a lower magnification or with larger patches"
    )
    assert run_attention(model, bag(10), max_bag_size=10).attention.shape == (10,)


class ToyMaxMIL(nn.Module):
    """A user model following the protocol: attention = per-patch score, logits from the max."""

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        self.in_dim, self.n_classes = in_dim, n_classes
        self.score = nn.Linear(in_dim, 1)
        self.head = nn.Linear(in_dim, n_classes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.score(h)[:, 0]
        return self.head(h[scores.argmax()]), scores


def test_register_a_custom_attention_model(tmp_path: Path) -> None:
    from clam_heat.models import registry

    register_model(
        "toymax",
        lambda *, in_dim, n_classes: ToyMaxMIL(in_dim, n_classes),
        key_prefix="",
    )
    try:
        model = randomise(build_model("toymax", n_classes=2, embed_dim=D))
        torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "t.pt")
        loaded = load_model(tmp_path / "t.pt", "toymax", n_classes=2, embed_dim=D)
        h = bag(9)
        out = run_attention(loaded, h)
        with torch.no_grad():
            scores = model.score(torch.from_numpy(h))[:, 0].numpy()
        np.testing.assert_allclose(out.attention, scores, atol=1e-6)
    finally:
        registry._REGISTRY.pop("toymax", None)


def test_a_model_returning_the_wrong_attention_shape_is_caught() -> None:
    class Broken(ToyMaxMIL):
        def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, scores = super().forward(h)
            return logits, scores[:-1]

    with pytest.raises(CheckpointError, match="returned 8 attention scores for a bag of 9"):
        run_attention(Broken(D, 2), bag(9))


def test_nan_weights_give_a_clear_error() -> None:
    model = build_model("abmil", n_classes=2, embed_dim=D, **SMALL["abmil"]).eval()
    with torch.no_grad():
        model.model.global_attn.attention_c.bias.fill_(float("nan"))
    with pytest.raises(CheckpointError, match="NaN/Inf attention"):
        run_attention(model, bag(5))


# ============================================================================================
# MIL-Lab's own layouts and numbers (tests/data/mil_lab/*.json)

MIL_LAB = Path(__file__).parent / "data" / "mil_lab"
MIL_LAB_MODELS = ("transmil", "dsmil", "ilra", "rrt", "transformer")
#: MIL-Lab models with no per-patch attention (drawn by gradients and occlusion): their
#: fixtures hold logits only.
NO_ATTENTION = ("wikg", "dftd")


def mil_lab_fixture(name: str) -> dict:
    return json.loads((MIL_LAB / f"{name}.json").read_text())


def fill_like_fixture(model: nn.Module, fixture: dict) -> nn.Module:
    """The fixture's ``weights_rule``: tensor j of its state-dict list gets quadratic-residue
    sines, fan-in scaled for weight matrices, around 1 for LayerNorm weights, small for biases."""
    state = model.state_dict()
    with torch.no_grad():
        for j, (key, _) in enumerate(fixture["state_dict"]):
            t = state[key]
            i = torch.arange(t.numel(), dtype=torch.int64)
            phase = ((7 * i * i + 3 * i + 11 * j) % 1009).double()
            b = torch.sin(2 * math.pi * phase / 1009).reshape(t.shape)
            if t.dim() >= 2 and key.endswith("weight"):
                value = b / math.sqrt(t.numel() / t.shape[0])
            elif t.dim() == 1 and key.endswith("weight"):
                value = 1 + 0.1 * b
            elif t.dim() == 1:
                value = 0.1 * b
            else:
                value = b
            t.copy_(value)
    return model.eval()


def fixture_bag(n: int = 50, d: int = 1024) -> np.ndarray:
    """The fixture's ``bag_rule``, float64."""
    m = np.arange(n, dtype=np.float64)[:, None]
    k = np.arange(d, dtype=np.float64)[None, :]
    return np.sin(0.05 * (m + 1) * (k % 97 + 1) + 0.3 * m)


def assert_close_to(got: np.ndarray, expected: list[float], rtol: float, what: str) -> None:
    """Equal up to ``rtol`` of the expected values' largest magnitude."""
    want = np.asarray(expected, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64).reshape(want.shape)
    error = float(np.abs(got - want).max() / np.abs(want).max())
    assert error < rtol, f"{what}: relative error {error:.2e}"


@pytest.mark.parametrize("name", [*MIL_LAB_MODELS, *NO_ATTENTION])
def test_base_model_has_mil_labs_exact_keys_and_shapes(name: str) -> None:
    """Built with no size arguments, each model is MIL-Lab's base config, key for key."""
    fixture = mil_lab_fixture(name)
    model = build_model(name, n_classes=fixture["config"]["num_classes"], embed_dim=1024)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == dict(fixture["state_dict"])


@pytest.mark.parametrize("name", MIL_LAB_MODELS)
def test_logits_and_attention_match_mil_lab(name: str) -> None:
    """Same weights, same bag: MIL-Lab's logits and per-patch attention (float64, to the
    fixture's 7 significant digits), also for a bag larger than the Nystrom landmark count."""
    fixture = mil_lab_fixture(name)
    model = build_model(name, n_classes=fixture["config"]["num_classes"], embed_dim=1024)
    fill_like_fixture(model.double(), fixture)
    for suffix, n in (("", 50), ("_m300", 300)):
        if f"logits{suffix}" not in fixture:
            continue
        with torch.no_grad():
            logits, attention = model(torch.from_numpy(fixture_bag(n)))
        assert attention.shape == (n,)
        assert_close_to(logits.numpy(), fixture[f"logits{suffix}"], 1e-6, f"{name} logits")
        assert_close_to(attention.numpy(), fixture[f"attention{suffix}"], 1e-6, f"{name} attn")


def test_mil_lab_quirks_recorded_in_the_fixtures() -> None:
    """What the fixtures say MIL-Lab returns, and how the heatmap score is taken from it."""
    transmil, dsmil = mil_lab_fixture("transmil"), mil_lab_fixture("dsmil")
    assert transmil["attention_raw_shape"] == [1, 64]  # ceil(sqrt(50))^2 tokens, padding last
    assert transmil["attention"] == transmil["attention_raw"][:50]
    assert dsmil["attention_raw_shape"] == [1, 50, 2]
    columns = np.asarray(dsmil["attention_raw"]).reshape(50, 2)
    np.testing.assert_allclose(columns.sum(axis=0), 1, atol=1e-6)
    np.testing.assert_array_equal(columns[:, dsmil["pred"]], dsmil["attention"])
    assert dsmil["pred"] == int(np.argmax(dsmil["logits"]))
    for name in ("ilra", "rrt"):
        assert abs(sum(mil_lab_fixture(name)["attention"]) - 1) < 1e-5
    transformer = mil_lab_fixture("transformer")
    assert transformer["attention_raw_shape"] == [1, 51, 51]
    # why wikg and dftd have no attention map: a neighbour graph, and pseudo-bag instances
    wikg, dftd = mil_lab_fixture("wikg"), mil_lab_fixture("dftd")
    assert wikg["attention_raw_shape"] == [1, 50, 50] and wikg["attention_row_nonzeros"] == [4]
    assert wikg["logits_raw_shape"] == [1, 3]
    assert dftd["attention_raw_shape"] == [50, 1]  # base: every patch, in shuffled order
    assert dftd["attention_raw_shape_MaxMinS_16"] == [32, 1]  # 2 top + 2 bottom x 8 pseudo-bags
    assert dftd["attention_raw_shape_AFS_4"] == [8, 1]  # one per pseudo-bag
    assert transformer["logits"] != transformer["logits_with_return_attention"]


@pytest.mark.parametrize("name", MIL_LAB_MODELS)
@pytest.mark.parametrize("prefix", ["model.", "module.model.", "module."])
def test_mil_lab_checkpoint_loads_strictly_and_infers_its_sizes(
    tmp_path: Path, name: str, prefix: str
) -> None:
    """A MIL-Lab checkpoint (float32, as saved; DataParallel or not; or saved from the inner
    network) loads through the public path with sizes read from its shapes, and scores the
    fixture bag as MIL-Lab does."""
    fixture = mil_lab_fixture(name)
    n_classes = fixture["config"]["num_classes"]
    reference = fill_like_fixture(
        build_model(name, n_classes=n_classes, embed_dim=1024).double(), fixture
    )
    state = {
        prefix + key[len("model.") :]: value.float()
        for key, value in reference.state_dict().items()
    }
    torch.save(state, tmp_path / "ckpt.pt")
    loaded = load_model(
        tmp_path / "ckpt.pt", f"{name}.base.uni.none", n_classes=n_classes, embed_dim=1024
    )
    out = run_attention(loaded, fixture_bag().astype(np.float32))
    assert out.attention.shape == (50,) and out.attention.dtype == np.float32
    assert_close_to(out.logits, fixture["logits"], 1e-4, f"{name} logits")
    assert_close_to(out.attention, fixture["attention"], 1e-4, f"{name} attention")
    assert out.pred == int(np.argmax(fixture["logits"]))


@pytest.mark.parametrize("name", NO_ATTENTION)
def test_wikg_and_dftd_logits_match_mil_lab(name: str) -> None:
    """Same weights, same bag: MIL-Lab's logits (float64, to the fixture's 7 significant
    digits) for 50 and 300 patches (WiKG: 300 > every top-k; DFTD: clam-heat's unshuffled
    pseudo-bags)."""
    fixture = mil_lab_fixture(name)
    model = build_model(name, n_classes=fixture["config"]["num_classes"], embed_dim=1024)
    fill_like_fixture(model.double(), fixture)
    m300 = "logits_m300" if name == "wikg" else "logits_m300_identity_order"
    for key, n in (("logits", 50), (m300, 300)):
        with torch.no_grad():
            logits, score = model(torch.from_numpy(fixture_bag(n)))
        assert logits.shape == (3,) and score.shape == (n,)
        assert_close_to(logits.numpy(), fixture[key], 1e-6, f"{name} {key}")


def test_dftd_base_logits_do_not_depend_on_mil_labs_shuffle_but_distilling_ones_do() -> None:
    """The fixture records MIL-Lab's DFTD under two random shuffles and under the identity
    order. Base config (0 instances per pseudo-bag: every patch reaches tier 2): all three
    agree, and clam-heat's logits do not move when the bag is permuted. Distilling variants
    (2 per pseudo-bag, or AFS): clam-heat equals MIL-Lab's identity order, which a real shuffle
    changes -- why clam-heat does not shuffle (see clam_heat.models.dftd)."""
    fixture = mil_lab_fixture("dftd")
    assert fixture["logits"] == fixture["logits_seed1"] == fixture["logits_identity_order"]
    h = torch.from_numpy(fixture_bag())
    base = fill_like_fixture(build_model("dftd", n_classes=3, embed_dim=1024).double(), fixture)
    permuted = torch.from_numpy(np.random.default_rng(0).permutation(50))
    with torch.no_grad():
        np.testing.assert_allclose(base(h[permuted])[0], base(h)[0], rtol=1e-12)
    for distill, total in (("MaxMinS", 16), ("MaxS", 16), ("AFS", 4)):
        model = build_model(
            "dftd", n_classes=3, embed_dim=1024, distill=distill, total_instance=total
        )
        fill_like_fixture(model.double(), fixture)
        with torch.no_grad():
            logits = model(h)[0].numpy()
            again = model(h)[0].numpy()
        np.testing.assert_array_equal(logits, again)  # deterministic
        expected = fixture[f"logits_{distill}_{total}_identity_order"]
        assert_close_to(logits, expected, 1e-6, f"dftd {distill}/{total}")
    assert fixture["logits_MaxMinS_16_seed0"] != fixture["logits_MaxMinS_16_identity_order"]


@pytest.mark.parametrize("name", NO_ATTENTION)
@pytest.mark.parametrize("prefix", ["model.", "module.model.", "module."])
def test_wikg_and_dftd_checkpoints_load_strictly_and_score_as_mil_lab(
    tmp_path: Path, name: str, prefix: str
) -> None:
    """A MIL-Lab checkpoint of WiKG / DFTD (float32, DataParallel or not, or saved from the
    inner network) loads through the public path under its MIL-Lab name, with sizes read from
    its shapes, and gives MIL-Lab's logits and prediction for the fixture bag."""
    fixture = mil_lab_fixture(name)
    reference = fill_like_fixture(build_model(name, n_classes=3, embed_dim=1024), fixture)
    state = {prefix + k[len("model.") :]: v.float() for k, v in reference.state_dict().items()}
    torch.save(state, tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt", f"{name}.base.uni.none", n_classes=3, embed_dim=1024)
    out = run_attention(loaded, fixture_bag().astype(np.float32))
    assert_close_to(out.logits, fixture["logits"], 1e-4, f"{name} logits")
    assert out.pred == int(np.argmax(fixture["logits"])) and out.attention.shape == (50,)
    from clam_heat.models import checkpoint_n_classes

    # the quick path reads the class count from the head (3 rows), so --num_classes is optional
    assert checkpoint_n_classes(torch.load(tmp_path / "ckpt.pt", weights_only=True)) == 3


def test_wikg_and_dftd_declare_no_attention_and_guard_as_documented() -> None:
    """No attention map (the attention method is refused for them); WiKG's N x N similarity
    gets the quadratic bag-size guard and bags smaller than its top-k still score; DFTD's
    cost is linear, so no guard, and a bag smaller than its pseudo-bag count still scores."""
    from clam_heat.models import get_model_spec

    assert not get_model_spec("wikg").has_attention and not get_model_spec("dftd").has_attention
    wikg = randomise(build_model("wikg", n_classes=2, embed_dim=D, hidden_dim=16))
    assert wikg.max_bag_size == 20_000
    with pytest.raises(FeatureError, match="above the 10-patch limit for wikg"):
        run_attention(wikg, bag(12), max_bag_size=10)
    dftd = randomise(build_model("dftd", n_classes=2, embed_dim=D, hidden_dim=16))
    assert dftd.max_bag_size is None
    for model in (wikg, dftd):
        for n in (1, 3):
            out = run_attention(model, bag(n))
            assert np.isfinite(out.logits).all() and out.attention.shape == (n,)


def test_wikg_similarity_in_row_blocks_equals_the_whole_matrix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """WiKG's top-k neighbours computed 7 rows at a time (a bag of 30: five blocks, the last
    short) give the logits and feature gradients of the whole-matrix computation, written here
    from MIL-Lab's maths (catches a block offset or a dropped last block)."""
    from clam_heat.models import wikg

    model = randomise(build_model("wikg", n_classes=2, embed_dim=D, hidden_dim=16), seed=4)
    h = torch.from_numpy(bag(30, seed=6)).requires_grad_(True)
    monkeypatch.setattr(wikg, "SIMILARITY_ROWS", 7)
    blocks = model(h)[0]
    (grad_blocks,) = torch.autograd.grad(blocks[1], h)

    def whole(head: torch.Tensor, tail: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        top = torch.topk((head @ tail.T) / math.sqrt(head.shape[1]), k=k, dim=1)
        return top.values, top.indices

    monkeypatch.setattr(wikg, "top_neighbours", whole)
    expected = model(h)[0]
    (grad,) = torch.autograd.grad(expected[1], h)
    torch.testing.assert_close(blocks, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_blocks, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "name, sizes",
    [
        ("wikg", {"hidden_dim": 32, "agg_type": "gcn"}),
        ("wikg", {"hidden_dim": 32, "agg_type": "sage"}),
        ("dftd", {"hidden_dim": 32, "attention_dim": 8, "num_residuals": 2}),
        ("dftd", {"hidden_dim": 32, "attention_dim": 8, "num_residuals": 0}),
    ],
)
def test_wikg_and_dftd_sizes_are_read_back_from_the_shapes(
    tmp_path: Path, name: str, sizes: dict
) -> None:
    """Width, attention width, residual depth and WiKG's aggregation (gcn vs sage by the
    shape of ``linear``) are recovered from a checkpoint."""
    model = randomise(build_model(name, n_classes=2, embed_dim=D, **sizes), seed=3)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt", name, n_classes=2, embed_dim=D)
    assert repr(loaded) == repr(model) and loaded.model.hparams == model.model.hparams
    h = bag(30, seed=5)
    np.testing.assert_array_equal(run_attention(loaded, h).logits, run_attention(model, h).logits)


NON_BASE = {
    "transmil": {"hidden_dim": 32, "num_heads": 8, "num_attention_layers": 3, "num_fc_layers": 2},
    "dsmil": {"hidden_dim": 24, "attn_dim": 8, "num_fc_layers": 2},
    "ilra": {"hidden_dim": 32, "topk": 5, "num_attention_layers": 3, "ln": False},
    "rrt": {
        "hidden_dim": 32,
        "num_heads": 4,
        "dim_head": 8,
        "n_layers": 3,
        "pool_dim": 12,
        "pool_gated": True,
        "pool_bias": True,
        "ffn_dim": 64,
        "pos": "peg",
        "pos_kernel": 5,
    },
    "transformer": {
        "hidden_dim": 32,
        "num_attention_layers": 3,
        "num_fc_layers": 2,
        "encoder_mlp_dim": 20,
    },
}


@pytest.mark.parametrize("name", MIL_LAB_MODELS)
def test_non_base_sizes_are_read_back_from_the_shapes(tmp_path: Path, name: str) -> None:
    """Depth, heads, widths and optional parts are recovered from a checkpoint's shapes."""
    model = randomise(build_model(name, n_classes=2, embed_dim=D, **NON_BASE[name]), seed=3)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt", name, n_classes=2, embed_dim=D)
    assert repr(loaded) == repr(model)
    h = bag(30, seed=5)
    np.testing.assert_array_equal(
        run_attention(loaded, h).attention, run_attention(model, h).attention
    )


def test_another_architectures_key_gives_a_one_line_error(tmp_path: Path) -> None:
    ilra = build_model("ilra", n_classes=2, embed_dim=D, **SMALL["ilra"])
    torch.save(ilra.state_dict(), tmp_path / "ilra.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "ilra.pt", "rrt", n_classes=2, embed_dim=D)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'ilra.pt'}: does not fit rrt (")
    assert message.endswith(
        "likely cause: checkpoint looks like ilra, not rrt; set model_type: ilra"
    )

    transmil = build_model("transmil", n_classes=2, embed_dim=D, **SMALL["transmil"]).state_dict()
    transmil["model.layer1.norm.weight"] = torch.ones(32)  # clam-heat's old TransMIL layout
    torch.save(transmil, tmp_path / "t.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "t.pt", "transmil", n_classes=2, embed_dim=D)
    assert str(err.value) == (
        f"{tmp_path / 't.pt'}: does not fit transmil (unexpected model.layer1.norm.weight); "
        "likely cause: check model_type, embed_dim and n_classes"
    )


def test_ilra_feature_width_mismatch_names_both_numbers(tmp_path: Path) -> None:
    """ILRA has no patch_embed: its first block's key projection carries the feature width."""
    ilra = build_model("ilra", n_classes=2, embed_dim=D, **SMALL["ilra"])
    torch.save(ilra.state_dict(), tmp_path / "ilra.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "ilra.pt", "ilra", n_classes=2, embed_dim=24)
    assert str(err.value).endswith(
        "likely cause: checkpoint expects 16-d features, model_arguments.embed_dim gives 24"
    )


# ============================================================================================
# attention ranks sensibly after a little training


def signal_bag(
    rng: np.random.Generator, positive: bool, n: int = 40, k: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """A bag of background patches; positive bags hide ``k`` patches shifted along 4 features."""
    x = rng.normal(size=(n, D)).astype(np.float32)
    idx = rng.choice(n, size=k, replace=False) if positive else np.array([], dtype=np.int64)
    x[idx, :4] += 3.0
    return x, idx


def train_logits(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if isinstance(model, MilLabModel):
        return model(h)[0]
    return model(h)[0][0]


@pytest.mark.parametrize("name", [*sorted(SMALL), "clam_sb", "clam_mb"])
def test_signal_patches_rank_top_after_training(tmp_path: Path, name: str) -> None:
    """300 Adam steps on one-bag batches, then the trained checkpoint is reloaded from disk and
    must put the hidden signal patches at the top of its attention.

    The seed is fixed (one thread, so deterministic): over other seeds most models pass too, but
    CLAM_MB without CLAM's instance loss, and RRT, sometimes learn the evidence as *low*
    attention (or in the other class's branch) -- a property of the training, not of inference.
    RRT (MIL-Lab's: Nystrom layers then attention pooling) ranks the signal high but less
    sharply: its signal patches must average a rank in the top quarter. It trains with 16
    Nystrom landmarks instead of MIL-Lab's fixed 256 (which the loader always uses), else this
    test alone would take minutes, and is reloaded into the same 16-landmark network.
    TransMIL's score is MIL-Lab's, each token's dot product with the class token: not a pooling
    weight, its sign is not fixed by training, and here it does not single out the signal
    patches (they drift to the lower half), so only its predictions are checked.
    """
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    extra: dict[str, int] = {"landmarks": 16} if name == "rrt" else {}
    model = build_model(name, n_classes=2, embed_dim=D, **SMALL.get(name, {}), **extra)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(300):
        label = step % 2
        h, _ = signal_bag(rng, bool(label))
        loss = nn.functional.cross_entropy(
            train_logits(model, torch.from_numpy(h))[None], torch.tensor([label])
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    torch.save(model.state_dict(), tmp_path / "trained.pt")
    if extra:
        loaded = build_model(name, n_classes=2, embed_dim=D, **SMALL[name], **extra).eval()
        loaded.load_state_dict(load_checkpoint_state(tmp_path / "trained.pt"), strict=True)
    else:
        loaded = load_model(tmp_path / "trained.pt", name, n_classes=2, embed_dim=D)
    hits, ranks, preds = [], [], []
    for _ in range(8):
        h, idx = signal_bag(rng, True)
        out = run_attention(loaded, h)
        order = np.argsort(-out.attention)
        hits.append(len(set(order[:4]) & set(idx)))
        ranks.append(float(np.mean(np.argsort(order)[idx])))  # 0 = highest attention
        preds.append(out.pred)
    negatives = [run_attention(loaded, signal_bag(rng, False)[0]).pred for _ in range(4)]
    if name == "rrt":
        assert np.mean(ranks) < 10, ranks  # of 40 patches: top quarter on average
    elif name != "transmil":
        assert np.mean(hits) >= 3, hits  # of the 4 signal patches, on average 3+ in the top 4
    assert preds.count(1) >= 7 and negatives.count(0) >= 3, (preds, negatives)


# ============================================================================================
# The registry as a plug-in point: a toy model, and the overlap pass for every model


def small_model(name: str, n_classes: int = 3, seed: int = 0) -> nn.Module:
    """A small randomised instance of a registered model (CLAM at its own sizes)."""
    torch.manual_seed(seed)
    model = build_model(name, n_classes=n_classes, embed_dim=D, **SMALL.get(name, {}))
    if name == "rrt":  # cheap landmarks; maths unchanged
        model = build_model(name, n_classes=n_classes, embed_dim=D, landmarks=4, **SMALL[name])
    return randomise(model, seed)


def forward_attention(model: nn.Module, h: np.ndarray) -> tuple[np.ndarray, int]:
    """The model's own full forward: (attention of the predicted class (N,), predicted class)."""
    with torch.no_grad():
        out = model(torch.from_numpy(h))
    if len(out) == 5:  # CLAM: (logits, Y_prob, Y_hat, A_raw (K, N), {})
        pred = int(out[2].item())
        a_raw = out[3].numpy()
        return (a_raw[pred] if a_raw.shape[0] > 1 else a_raw[0]), pred
    logits, attention = out
    return attention.numpy(), int(logits.argmax())


class ToyMIL(nn.Module):
    """A plug-in model defined only here: attention = one linear score per patch, logits from
    the attention-weighted mean (a patch's score depends on that patch alone)."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 4) -> None:
        super().__init__()
        self.in_dim, self.n_classes = in_dim, n_classes
        self.score = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.head = nn.Linear(in_dim, n_classes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.score(h)[:, 0]
        return self.head(torch.softmax(scores, dim=0) @ h), scores


@pytest.fixture
def toy_registered() -> Iterator[None]:
    from clam_heat.models import registry

    register_model(
        "toy",
        lambda *, in_dim, n_classes, hidden=4: ToyMIL(in_dim, n_classes, hidden),
        key_prefix="",
        infer_hparams=lambda state: {"hidden": int(state["score.0.weight"].shape[0])},
        per_patch=True,
    )
    yield
    registry._REGISTRY.pop("toy", None)


def test_toy_model_validates_in_a_config_and_runs_through_load_model(
    tmp_path: Path, toy_registered: None
) -> None:
    from clam_heat.config import config_from_dict

    cfg = config_from_dict({"model_arguments": {"model_type": "toy", "embed_dim": D}})
    assert cfg.model_arguments.model_type == "toy"
    assert "toy" in registered_models()
    model = randomise(ToyMIL(D, 2, hidden=5))
    torch.save(model.state_dict(), tmp_path / "toy.pt")
    loaded = load_model(tmp_path / "toy.pt", "toy", n_classes=2, embed_dim=D)
    assert loaded.score[0].out_features == 5  # hidden size read back from the checkpoint
    h = bag(7)
    out = run_attention(loaded, h)
    expected, pred = forward_attention(model, h)
    np.testing.assert_allclose(out.attention, expected, rtol=1e-6)
    assert out.pred == pred
    # the overlap pass works for it too, batch by batch (it declared per_patch)
    from clam_heat.models import attention_logits, needs_whole_bag

    assert not needs_whole_bag(loaded)
    halves = np.concatenate(
        [attention_logits(loaded, h[:3], branch=0), attention_logits(loaded, h[3:], branch=0)]
    )
    np.testing.assert_allclose(halves, expected, rtol=1e-6)


def test_unregistered_toy_is_refused_by_config_and_loader() -> None:
    from clam_heat.config import config_from_dict

    with pytest.raises(
        ConfigError, match="model_arguments.model_type = 'toy': must be one of clam_sb"
    ):
        config_from_dict({"model_arguments": {"model_type": "toy"}})
    with pytest.raises(ConfigError, match="unknown model \\(use one of clam_sb"):
        parse_model_type("toy", embed_dim=D)


@pytest.mark.parametrize("name", ["clam_sb", "clam_mb", "clam", *sorted(SMALL)])
def test_attention_logits_is_the_models_own_forward_attention(name: str) -> None:
    """Scored as one bag, attention_logits equals the attention of the model's full forward
    (CLAM: A_raw row of Y_hat; the others: their documented score); per-patch models give the
    same scores batch by batch, the others need the whole bag."""
    from clam_heat.models import attention_logits, needs_whole_bag

    model = small_model(name)
    h = bag(9)
    expected, pred = forward_attention(model, h)
    got = attention_logits(model, h, branch=pred)
    assert got.dtype == np.float32 and got.shape == (9,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run_attention(model, h).attention, expected, rtol=1e-5, atol=1e-6)
    batches = np.concatenate(
        [attention_logits(model, h[i : i + 4], branch=pred) for i in (0, 4, 8)]
    )
    if name in ("clam_sb", "clam_mb", "clam", "abmil"):
        assert not needs_whole_bag(model)
        np.testing.assert_allclose(batches, expected, rtol=1e-5, atol=1e-6)
    else:  # a batch scored alone is a different bag: the caller must pass the whole bag
        assert needs_whole_bag(model)
        assert not np.allclose(batches, expected, rtol=1e-3)


def test_every_registered_model_is_covered_by_the_overlap_test() -> None:
    from clam_heat.models import get_model_spec

    with_attention = {n for n in registered_models() if get_model_spec(n).has_attention}
    assert with_attention == {"clam_sb", "clam_mb", "clam", *SMALL}  # mil_fc: no attention


def test_attention_logits_clam_mb_branch_by_hand() -> None:
    """attention_c weights zero and bias (1, 2, 3): branch b scores every patch b + 1."""
    from clam_heat.models import attention_logits

    model = small_model("clam_mb")
    with torch.no_grad():
        model.attention_net[3].attention_c.weight.zero_()
        model.attention_net[3].attention_c.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    for branch in range(3):
        np.testing.assert_array_equal(
            attention_logits(model, bag(5), branch=branch), [branch + 1.0] * 5
        )
    with pytest.raises(CheckpointError) as err:
        attention_logits(model, bag(5), branch=3)
    assert str(err.value) == (
        "model has 3 attention branches; branch must be the predicted class in 0..2, got 3"
    )
    with pytest.raises(FeatureError, match="feature width 17 does not match .* 16"):
        attention_logits(model, bag(5, d=17), branch=0)


def test_attention_logits_dsmil_branch_is_that_class_column() -> None:
    """DSMIL's column k, recomputed in numpy: softmax over patches of q_i . q_crit(k) / sqrt(d),
    crit(k) the patch with the top instance score for class k."""
    from clam_heat.models import attention_logits

    model = small_model("dsmil")
    net = model.model
    h = bag(9)
    state = {k: v.double().numpy() for k, v in net.state_dict().items()}
    emb = np.maximum(h @ state["patch_embed.0.weight"].T + state["patch_embed.0.bias"], 0)
    inst = (
        emb @ state["i_classifier.inst_classifier.weight"].T
        + state["i_classifier.inst_classifier.bias"]
    )
    q = emb @ state["b_classifier.q.weight"].T + state["b_classifier.q.bias"]
    _, pred = forward_attention(model, h)
    for k in range(3):
        ref = softmax(q @ q[inst[:, k].argmax()] / math.sqrt(q.shape[1]))
        np.testing.assert_allclose(attention_logits(model, h, branch=k), ref, rtol=1e-4, atol=1e-6)
    with pytest.raises(CheckpointError, match="model has 3 attention branches; .* got None"):
        attention_logits(model, h, branch=None)
    assert pred in range(3)


# ============================================================================================
# checkpoints as MIL-Lab's save_pretrained writes them


def test_safetensors_file_and_save_pretrained_folder_load(tmp_path: Path) -> None:
    """A bare ``model.safetensors`` and a ``save_pretrained`` folder (config.json +
    model.safetensors) load into ABMIL with the same outputs as the reference forward."""
    from safetensors.torch import save_file

    model = randomise(build_model("abmil", n_classes=3, embed_dim=D, **SMALL["abmil"]), seed=11)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    h = bag(25, seed=6)
    logits, raw = gated_reference(
        np_state(state), h.astype(np.float64), "model.patch_embed.0", "model.global_attn",
        "model.classifier",
    )  # fmt: skip
    bare = tmp_path / "model.safetensors"
    save_file(state, str(bare))
    folder = tmp_path / "abmil.base.uni_v2.pc108-24k"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "abmil", "num_classes": 3}))
    save_file({f"module.{k}": v for k, v in state.items()}, str(folder / "model.safetensors"))
    for path in (bare, folder):
        loaded = load_model(path, "abmil", n_classes=3, embed_dim=D)
        out = run_attention(loaded, h)
        np.testing.assert_allclose(out.logits, logits, atol=1e-5, err_msg=str(path))
        np.testing.assert_allclose(out.attention, raw, atol=1e-5, err_msg=str(path))
    from clam_heat.models import checkpoint_n_classes

    assert checkpoint_n_classes(load_checkpoint_state(folder)) == 3


def test_bad_safetensors_and_empty_folder_are_one_line_errors(tmp_path: Path) -> None:
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot be read as safetensors"):
        load_checkpoint_state(junk)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty: folder without model.safetensors"):
        load_checkpoint_state(empty)
