"""flaxrestore.vgg.VGG19 against a torch VGG19 features stack in torchvision's layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx

from flaxrestore import vgg
from porting.convert import ConversionError, expected_shapes, flax_to_torch, load_state_dict
from porting.reference.vgg import VGG19Features, load_torchvision_vgg19

# torchvision vgg19().features: indices of the ReLUs after the first conv of each block, of the
# convs and of the pools (written out by hand from torchvision's cfg "E").
TV_RELU_X_1 = {"relu1_1": 1, "relu2_1": 6, "relu3_1": 11, "relu4_1": 20, "relu5_1": 29}
TV_CONVS = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
TV_POOLS = [4, 9, 18, 27, 36]


def _torch_model(num_layers=vgg.NUM_LAYERS, seed=0):
    torch.manual_seed(seed)
    ref = VGG19Features(num_layers).eval()
    return ref


def _flax_from(ref, num_layers=vgg.NUM_LAYERS):
    # abstract, then filled: an eager random init of 16 convs costs many seconds of compiling
    model = nnx.eval_shape(lambda: vgg.VGG19(rngs=nnx.Rngs(1), num_layers=num_layers))
    load_state_dict(model, ref.state_dict())
    return model


def test_layer_names_match_torchvision_indices():
    assert vgg.NUM_LAYERS == 37
    for name, i in TV_RELU_X_1.items():
        assert vgg.LAYER_NAMES[i] == name
    assert [i for i, n in enumerate(vgg.LAYER_NAMES) if n.startswith("conv")] == TV_CONVS
    assert [i for i, n in enumerate(vgg.LAYER_NAMES) if n.startswith("pool")] == TV_POOLS
    assert vgg.LAYER_NAMES[35] == "relu5_4"


def test_state_dict_keys_and_shapes():
    model = nnx.eval_shape(lambda: vgg.VGG19(rngs=nnx.Rngs(0)))
    shapes = expected_shapes(model)
    ref = {k: tuple(v.shape) for k, v in VGG19Features().state_dict().items()}
    assert shapes == ref
    assert len(shapes) == 32
    assert shapes["features.0.weight"] == (64, 3, 3, 3)
    assert shapes["features.5.weight"] == (128, 64, 3, 3)
    assert shapes["features.19.weight"] == (512, 256, 3, 3)
    assert shapes["features.34.weight"] == (512, 512, 3, 3)
    assert shapes["features.34.bias"] == (512,)
    short = expected_shapes(nnx.eval_shape(lambda: vgg.VGG19(rngs=nnx.Rngs(0), num_layers=30)))
    assert max(int(k.split(".")[1]) for k in short) == 28


@pytest.mark.parametrize("normalize", [False, True])
def test_forward_matches_torch(normalize):
    ref = _torch_model()
    model = _flax_from(ref)
    rng = np.random.default_rng(0)
    x = rng.random((2, 37, 45, 3), dtype=np.float32)  # odd sizes: pools floor
    layers = ["relu5_1", "relu1_1", "relu2_1", 11, "relu4_1", "pool5"]
    outs = model(x, layers, normalize=normalize)
    with torch.no_grad():
        touts = ref(torch.from_numpy(x).permute(0, 3, 1, 2), layers, normalize=normalize)
    assert len(outs) == len(layers)
    for o, t in zip(outs, touts):
        t = t.permute(0, 2, 3, 1).numpy()
        assert o.shape == t.shape
        scale = max(1.0, float(np.abs(t).max()))
        assert float(np.abs(np.asarray(o) - t).max()) / scale <= 1e-5
    assert outs[-1].shape == (2, 1, 1, 512)


def test_input_gradient_matches_torch():
    ref = _torch_model(num_layers=12)
    model = _flax_from(ref, num_layers=12)
    rng = np.random.default_rng(1)
    x = rng.random((1, 20, 18, 3), dtype=np.float32)
    w = rng.standard_normal((1, 5, 4, 256)).astype(np.float32)

    import jax

    g = jax.grad(lambda v: (model(v, ["relu3_1"])[0] * w).sum())(x)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    (ref(xt, ["relu3_1"])[0] * torch.from_numpy(w).permute(0, 3, 1, 2)).sum().backward()
    gt = xt.grad.permute(0, 2, 3, 1).numpy()
    assert float(np.abs(np.asarray(g) - gt).max()) / max(1.0, float(np.abs(gt).max())) <= 1e-5


def test_stops_after_last_requested_layer():
    model = vgg.VGG19(rngs=nnx.Rngs(0), num_layers=2)
    x = np.zeros((1, 8, 8, 3), np.float32)
    (out,) = model(x, ["relu1_1"])
    assert out.shape == (1, 8, 8, 64)
    with pytest.raises(ValueError, match="num_layers=2"):
        model(x, ["relu2_1"])
    with pytest.raises(KeyError, match="relu9_9"):
        model(x, ["relu9_9"])


def test_round_trip_bit_exact():
    ref = _torch_model()
    model = _flax_from(ref)
    back = flax_to_torch(model)
    sd = ref.state_dict()
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def _assert_same_features(model, ref, seed):
    x = np.random.default_rng(seed).random((1, 32, 32, 3), dtype=np.float32)
    outs = model(x)
    with torch.no_grad():
        touts = ref(torch.from_numpy(x).permute(0, 3, 1, 2))
    for o, t in zip(outs, touts):
        t = t.permute(0, 2, 3, 1).numpy()
        assert float(np.abs(np.asarray(o) - t).max()) / max(1.0, float(np.abs(t).max())) <= 1e-5


def test_load_torchvision_file(tmp_path):
    ref = _torch_model(seed=3)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    # a torchvision file also holds the classifier; tiny stand-ins keep the test light (they are
    # dropped by name, whatever their shape)
    sd["classifier.0.weight"] = torch.zeros(4, 8)
    sd["classifier.0.bias"] = torch.zeros(4)
    sd["classifier.6.weight"] = torch.zeros(2, 4)
    path = tmp_path / "vgg19.pth"
    torch.save(sd, path)

    model = load_torchvision_vgg19(path, num_layers=30)
    _assert_same_features(model, ref, seed=2)

    del sd["features.10.bias"]
    sd["head.weight"] = torch.zeros(1)  # only classifier.* (and layers past num_layers) are dropped
    torch.save(sd, path)
    with pytest.raises(ConversionError) as e:
        load_torchvision_vgg19(path)
    assert "features.10.bias" in str(e.value) and "head.weight" in str(e.value)


def test_vgg19_command_writes_weights_the_trainer_reads(tmp_path):
    """`python -m porting vgg19 IN.pth OUT.safetensors` -> train.step.load_vgg gives the same
    features as the torch model the file came from."""
    from porting.__main__ import main
    from train import step

    ref = _torch_model(num_layers=30, seed=4)
    sd = dict(ref.state_dict())
    sd["classifier.0.weight"] = torch.zeros(4, 8)
    src, out = tmp_path / "vgg19.pth", tmp_path / "w" / "vgg19.safetensors"
    torch.save(sd, src)
    assert main(["vgg19", str(src), str(out)]) == 0
    graph, params = step.load_vgg(str(out))
    model = nnx.merge(graph, params)  # as the train step does
    _assert_same_features(model, ref, seed=5)
    assert main(["vgg19", str(src), str(tmp_path / "x.pth")]) == 2  # not a .safetensors


@pytest.mark.parametrize("shape", [(2, 8, 10, 5), (1, 7, 9, 3)])
@pytest.mark.both_lowerings
def test_max_pool_value_and_gradient_match_torch(shape):
    """The CPU max-pool (a reshape with its own gradient) against torch's MaxPool2d(2, 2):
    ties (ReLU zeros, repeated values) send the whole gradient to the first maximum of the
    window in row-major order, odd trailing rows/columns get none."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    x = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)  # many all-zero windows
    x[0, 0, :4] = 1.0  # a window with four equal maxima, another with two
    x[0, 1, 2] = 1.0
    g = rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3])).astype(np.float32)
    y, vjp = jax.vjp(vgg.max_pool_2x2, jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(g))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    yt = torch.nn.functional.max_pool2d(xt, 2)
    (dxt,) = torch.autograd.grad(yt, xt, torch.from_numpy(g.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(dx), dxt.numpy().transpose(0, 2, 3, 1))
    # and against XLA's own reduce_window gradient (select-and-scatter)
    rw = lambda a: jax.lax.reduce_window(a, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                         "VALID")
    np.testing.assert_array_equal(np.asarray(dx),
                                  np.asarray(jax.vjp(rw, jnp.asarray(x))[1](jnp.asarray(g))[0]))
