"""Models (shapes, seeding, per-sample gradients) and parameter conversion (models/params)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from murmur.models.nets import (
    MODEL_NAMES,
    MultimodalNet,
    build_model,
    count_parameters,
    pack_multimodal,
)
from murmur.models.params import (
    flatten,
    get_state,
    model_spec,
    set_state,
    state_sha256,
    unflatten,
)
from torch import nn
from torch.func import functional_call, grad, vmap

CLINICAL = 5
CASES = {  # name -> (input_shape, params, a function making a batch of B inputs)
    "logreg": ((13,), {}, lambda g, b: torch.randn(b, 13, generator=g)),
    "mlp": ((13,), {}, lambda g, b: torch.randn(b, 13, generator=g)),
    "cox": ((39,), {}, lambda g, b: torch.randn(b, 39, generator=g)),
    "cnn": ((1, 28, 28), {}, lambda g, b: torch.rand(b, 1, 28, 28, generator=g)),
    "cnn_gn": ((1, 28, 28), {}, lambda g, b: torch.rand(b, 1, 28, 28, generator=g)),
    "resnet18": ((1, 28, 28), {}, lambda g, b: torch.rand(b, 1, 28, 28, generator=g)),
    "resnet18_25m": ((1, 28, 28), {}, lambda g, b: torch.rand(b, 1, 28, 28, generator=g)),
    "multimodal": (
        (1, 28, 28),
        {"clinical_features": CLINICAL},
        lambda g, b: pack_multimodal(
            torch.rand(b, 1, 28, 28, generator=g), torch.randn(b, CLINICAL, generator=g)
        ),
    ),
}


def make(name: str, seed: int = 0) -> nn.Module:
    shape, params, _ = CASES[name]
    return build_model(name, shape, seed, **params)


def batch(name: str, size: int = 6) -> torch.Tensor:
    return CASES[name][2](torch.Generator().manual_seed(1), size)


def test_every_model_name_is_covered() -> None:
    from murmur.node.config_learning import MODEL_NAMES as CONFIG_MODEL_NAMES

    assert set(CASES) == set(MODEL_NAMES)
    assert set(CONFIG_MODEL_NAMES) == set(MODEL_NAMES)  # a node config accepts every model


def test_resnet18_sizes() -> None:
    """ResNet-18 has its 11.2M parameters (torchvision's, less BatchNorm's affine ones and
    with a 1-channel stem and one logit); the 25M configuration is the same net 1.5x wide."""
    assert count_parameters(make("resnet18")) == 11_158_593
    assert 24_000_000 <= count_parameters(make("resnet18_25m")) <= 26_000_000
    assert not any(isinstance(m, nn.GroupNorm) and m.affine for m in make("resnet18").modules())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_one_logit_per_sample(name: str) -> None:
    out = make(name)(batch(name, 7))
    assert out.shape == (7,) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_seeding_is_deterministic_and_leaves_global_rng_alone(name: str) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = make(name, seed=5), make(name, seed=5), make(name, seed=6)
    np.testing.assert_array_equal(flatten(get_state(a)), flatten(get_state(b)))
    if name == "cox":  # starts at the null model, beta = 0, whatever the seed
        assert not flatten(get_state(c)).any()
    else:
        assert not np.array_equal(flatten(get_state(a)), flatten(get_state(c)))
    torch.testing.assert_close(torch.rand(3), expected_next)


def test_sizes_match_the_documented_architectures() -> None:
    assert count_parameters(make("logreg")) == 14
    assert count_parameters(make("mlp")) == 13 * 64 + 64 + 64 * 32 + 32 + 33  # 3,009
    assert 15_000 <= count_parameters(make("cnn")) <= 25_000
    wide = build_model("mlp", (13,), 0, hidden=(8,))
    assert count_parameters(wide) == 13 * 8 + 8 + 9


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_no_batch_statistics_and_per_sample_gradients_work(name: str) -> None:
    """DP-SGD takes per-sample gradients with torch.func.vmap(grad): they must equal the
    gradients of each sample on its own (BatchNorm would break this)."""
    model = make(name)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x, y = batch(name, 4), torch.tensor([0.0, 1.0, 1.0, 0.0])
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logit = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.binary_cross_entropy_with_logits(logit, yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(y)):
        model.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(x[i : i + 1]), y[i : i + 1]).backward()
        for key, parameter in model.named_parameters():
            torch.testing.assert_close(per_sample[key][i], parameter.grad, rtol=1e-4, atol=1e-6)


def test_multimodal_accepts_pair_dict_and_packed_inputs() -> None:
    model = make("multimodal")
    g = torch.Generator().manual_seed(2)
    images, clinical = torch.rand(3, 1, 28, 28, generator=g), torch.randn(3, CLINICAL, generator=g)
    packed = model(pack_multimodal(images, clinical))
    torch.testing.assert_close(model((images, clinical)), packed)
    torch.testing.assert_close(model({"image": images, "clinical": clinical}), packed)
    with pytest.raises(ValueError, match="packed"):
        model(torch.zeros(3, 10))


def test_multimodal_learns_from_both_modalities() -> None:
    """Synthetic pairs only (no real paired data exists): the label depends on a bright blob
    in the image and on one clinical feature. Shuffling either input across patients at test
    time must cost accuracy, so the fusion model uses both encoders."""
    g = torch.Generator().manual_seed(0)
    n = 600
    image_signal, clinical_signal = torch.randn(n, generator=g), torch.randn(n, generator=g)
    images = 0.1 * torch.rand(n, 1, 28, 28, generator=g)
    images[:, :, 10:18, 10:18] += 0.5 + 0.2 * image_signal[:, None, None, None]
    clinical = torch.randn(n, CLINICAL, generator=g)
    clinical[:, 0] = clinical_signal
    labels = (image_signal + clinical_signal > 0).float()
    train, test = slice(0, 400), slice(400, n)

    model = build_model("multimodal", (1, 28, 28), 0, clinical_features=CLINICAL)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        optimiser.zero_grad()
        logits = model((images[train], clinical[train]))
        nn.functional.binary_cross_entropy_with_logits(logits, labels[train]).backward()
        optimiser.step()

    def accuracy(imgs: torch.Tensor, clin: torch.Tensor) -> float:
        with torch.no_grad():
            return float(((model((imgs, clin)) > 0).float() == labels[test]).float().mean())

    shuffle = torch.randperm(n - 400, generator=g)
    both = accuracy(images[test], clinical[test])
    without_image = accuracy(images[test][shuffle], clinical[test])
    without_clinical = accuracy(images[test], clinical[test][shuffle])
    assert both > 0.85
    assert without_image < both - 0.1
    assert without_clinical < both - 0.1


@pytest.mark.parametrize(
    ("name", "shape", "params", "message"),
    [
        ("resnet", (13,), {}, "unknown model"),
        ("logreg", (13,), {"hidden": (4,)}, "does not take"),
        ("cnn", (13,), {}, "image input_shape"),
        ("multimodal", (1, 28, 28), {}, "clinical_features"),
        ("mlp", (0,), {}, "input_shape"),
        ("mlp", (13,), {"hidden": ()}, "hidden sizes"),
    ],
)
def test_bad_model_requests_are_clear_errors(name, shape, params, message) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        build_model(name, shape, 0, **params)


# --- models/params ------------------------------------------------------------------------


def test_get_state_returns_independent_little_endian_float32_copies() -> None:
    model = make("mlp")
    state = get_state(model)
    assert list(state) == [name for name, _ in model.state_dict().items()]
    for array in state.values():
        assert array.dtype.str == "<f4" and array.flags.c_contiguous and array.flags.owndata
    before = flatten(state).copy()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    np.testing.assert_array_equal(flatten(state), before)  # the model moved, the copy did not


def test_set_state_round_trip_changes_the_model_outputs() -> None:
    source, target = make("cnn", seed=1), make("cnn", seed=2)
    x = batch("cnn")
    assert not torch.allclose(source(x), target(x))
    set_state(target, get_state(source))
    torch.testing.assert_close(source(x), target(x))


def test_set_state_rejects_mismatches_and_non_finite_values() -> None:
    model = make("logreg")
    state = get_state(model)
    with pytest.raises(ValueError, match="missing"):
        set_state(model, {k: v for k, v in state.items() if k != "linear.bias"})
    with pytest.raises(ValueError, match="shape"):
        set_state(model, state | {"linear.weight": np.zeros((1, 12), np.float32)})
    with pytest.raises(ValueError, match="NaN"):
        set_state(model, state | {"linear.bias": np.array([np.nan], np.float32)})


def test_flatten_unflatten_round_trip_and_spec() -> None:
    state = get_state(make("multimodal"))
    vector = flatten(state)
    assert vector.shape == (sum(a.size for a in state.values()),) and vector.dtype == np.float32
    back = unflatten(vector * 2, state)
    assert list(back) == list(state)
    for name in state:
        np.testing.assert_array_equal(back[name], state[name] * 2)
    assert model_spec(back) == model_spec(state)
    assert model_spec(state)["fusion_head.2.bias"] == ((1,), "<f4")
    with pytest.raises(ValueError, match="does not fit"):
        unflatten(vector[:-1], state)


def test_state_sha256_follows_its_documented_format() -> None:
    state = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([0.5], dtype=np.float32),
    }
    expected = hashlib.sha256()
    for name, array in state.items():
        expected.update(len(name).to_bytes(4, "little") + name.encode())
        expected.update((3).to_bytes(4, "little") + b"<f4")
        expected.update(len(array.shape).to_bytes(4, "little"))
        expected.update(b"".join(d.to_bytes(8, "little") for d in array.shape))
        expected.update(array.astype("<f4").tobytes())
    assert state_sha256(state) == expected.hexdigest()
    # The identity depends on values, names, shapes and order, not on memory layout.
    assert (
        state_sha256({"w": np.asfortranarray(state["w"]), "b": state["b"]}) == expected.hexdigest()
    )
    assert state_sha256({"b": state["b"], "w": state["w"]}) != expected.hexdigest()
    assert state_sha256({"w": state["w"].reshape(3, 2), "b": state["b"]}) != expected.hexdigest()
    assert state_sha256(state | {"b": np.array([0.25], np.float32)}) != expected.hexdigest()


def test_multimodal_class_is_exported_for_input_docs() -> None:
    assert isinstance(make("multimodal"), MultimodalNet)
