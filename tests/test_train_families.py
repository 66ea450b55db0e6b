"""Every family's demo recipe through the trainer's own step (``train.step.make_train_step``), on
a batch from the recipe's data pipeline, against the torch reference computed in float64 on the
same weights (``porting.flax_to_torch``) and batch:

* the loss the step reports equals torch's loss of the recipe: Restormer's L1, MPRNet's
  Charbonnier + 0.05 edge summed over the three stages, DarkIR's L1 + 0.01 VGG + 50
  Laplacian-MSE + 0.8 L1 + 0.01 VGG of the x2-upsampled side output (the LOLBlur recipe), SNR-Aware's Charbonnier (sum) of the network fed the
  reference's SNR map + 0.1 VGG perceptual (sum), AECR-Net's L1 + 0.1 contrastive
  regularisation with the hazy input as the negative; the VGG19 is read by the trainer from an
  .npz of (random) torchvision-keyed weights, the same weights torch uses;
* its gradients (read from Adam's first moment, ``mu = (1 - b1) g``) equal torch's;
* one step of the recipe's optimizer (Adam / AdamW, clipping, the schedule's first lr) moves
  the weights where ``torch.optim`` moves torch's: above the float32 gradient noise the step
  agrees to 1% of lr (a wrong sign is 2 lr off); AECR-Net's FastDeconv running statistics,
  updated by the training forward into ``model_state``, equal torch's buffers;
* bfloat16 (``dtype='bfloat16'``): the same step's loss and gradient against float32 (figures
  printed; README's Training section), with parameters, optimizer and model state still float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import porting  # noqa: E402
from porting import convert, reference  # noqa: E402
from porting.reference import losses as TL  # noqa: E402
from porting.reference import snr as TS  # noqa: E402
from porting.reference.vgg import VGG19Features  # noqa: E402
from train import checkpointing, schedules  # noqa: E402
from train import recipe as recipe_lib  # noqa: E402
from train import step as step_lib  # noqa: E402
from train.recipe import LossTerm  # noqa: E402
from conftest import TINY_RECIPES  # noqa: E402

FAMILIES = TINY_RECIPES

FAST_COMPILE = {"xla_backend_optimization_level": 0}

# bfloat16 vs float32, same weights and batch. Bounds: loss within 1%, gradient cosine >= 0.99,
# every tensor carrying >= 1% of the squared gradient norm within 10% in norm and cosine >= 0.98
# (a bias gradient summed in bfloat16 over every pixel came out at 0.25 of its norm before
# layers.add_bias; DarkIR's rfft refused bfloat16 before FreMLP upcast its input).


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    """Random VGG19 weights with torchvision's keys in an .npz (what --set vgg_weights reads),
    and the torch module holding them (float64).

    The biases are torch's default initialisation scaled by 0.1. With full-size random biases
    the deep features are nearly input-independent: at relu5_1 (1 x 1 for a 16-pixel crop) the
    restored, clean and hazy images' features (mean 3.6e-3) differed by 5e-8, below float32's
    rounding of them, so the signs of AECR-Net's contrastive L1 were noise and torch's own
    float32 gradients came out 2.2e-3 (of the largest) from float64 (measured; Flax's
    2.2e-4..1.3e-3 depending on the CPU's instruction set and XLA's optimisation level). A
    pretrained VGG's features follow the image; so do these (torch float32 within 4.3e-7 of
    float64 for AECR-Net's loss).
    """
    torch.manual_seed(0)
    tv = VGG19Features(num_layers=30)
    with torch.no_grad():
        for name, p in tv.named_parameters():
            if name.endswith("bias"):
                p.mul_(0.1)
    path = tmp_path_factory.mktemp("vgg") / "vgg19_random.npz"
    np.savez(path, **{k: v.numpy() for k, v in tv.state_dict().items()})
    return str(path), tv.double().eval()


def _recipe(family, vgg_path, dtype="float32"):
    name, patch, sets = FAMILIES[family]
    recipe = recipe_lib.load(name, [*sets, "batch_size=2", "stages=()", f"data.patch_size={patch}",
                                    "mixup.kind='none'", f"vgg_weights='{vgg_path}'",
                                    f"dtype='{dtype}'"])
    if family == "snr":  # the LOL v2 real recipe's perceptual term (the demo leaves it off)
        recipe = dataclasses.replace(recipe, losses=(
            *recipe.losses, LossTerm("perceptual", 0.1, options={"reduction": "sum"})))
    return recipe


def _batch(recipe):
    """The first batch of the recipe's own pipeline (train.data, demo images)."""
    cfg = recipe_lib.data_config(recipe, recipe.data)
    item = next(recipe_lib.data_module(recipe).make_train_iterator(cfg, batch_size=recipe.batch_size,
                                                             seed=recipe.seed))
    return {k: np.asarray(item[k], np.float32) for k in ("lq", "gt")}


def _adam_mu(opt_state):
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "mu"))
             if hasattr(s, "mu")]
    assert len(found) == 1
    return found[0].mu


def run_step(recipe, batch):
    """One trainer step on one device: (initial params, new state, metrics, model, gradient)."""
    mesh = step_lib.make_mesh(jax.devices()[:1])
    model = step_lib.build_model(recipe)
    tx = schedules.make_optimizer(recipe.optimizer)
    state = step_lib.replicate(mesh, step_lib.init_state(model, tx, False))
    before = jax.device_get(state)
    vgg_graph, frozen = None, {}
    if step_lib.needs_vgg(recipe):
        vgg_graph, vgg_params = step_lib.load_vgg(recipe.vgg_weights)
        frozen = {"vgg": step_lib.replicate(mesh, vgg_params)}
    step = step_lib.make_train_step(recipe, model, tx, mesh, vgg_graph)
    args = (state, step_lib.global_batch(mesh, batch), frozen)
    # LLVM optimisation off: these tiny programs compile ~1.5x faster
    compiled = step.lower(*args).compile(compiler_options=FAST_COMPILE)
    new, metrics = jax.device_get(compiled(*args))
    assert bool(metrics["finite"]) and int(new["step"]) == 1
    grads = jax.tree.map(lambda m: m / (1.0 - recipe.optimizer.b1), _adam_mu(new["opt_state"]))
    return before, new, metrics, model, grads


def _nchw(a):
    return torch.from_numpy(np.asarray(a, np.float64)).permute(0, 3, 1, 2)


def torch_loss(family, ref, vgg_t, lq, gt):
    """The recipe's loss written with the torch reference and porting.reference.losses."""
    if family == "restormer":
        return TL.l1(ref(lq), gt)
    if family == "mprnet":
        return TL.mprnet_loss(ref(lq), gt, edge_weight=0.05)
    if family == "darkir":
        side, out = ref(lq, side_loss=True)
        return TL.darkir_loss(side, out, gt, vgg_t, perceptual_weight=0.01,
                              side_perceptual_weight=0.01, scale=gt.shape[2] // side.shape[2])
    if family == "snr":
        return TL.snr_loss(ref(lq, TS.snr_map(lq)), gt, vgg_t, vgg_weight=0.1)
    if family == "aecrnet":
        out = ref(lq)
        return TL.l1(out, gt) + 0.1 * TL.ContrastLoss(vgg_t)(out, gt, lq)
    raise KeyError(family)


def torch_step(recipe, family, module, vgg_t, batch):
    """torch float64: the loss, gradients and one torch.optim step of the recipe's optimizer."""
    ref = reference.build(recipe.model, **dict(recipe.model_overrides))
    ref.load_state_dict(porting.flax_to_torch(module))
    ref = ref.double().train()
    lq, gt = _nchw(batch["lq"]), _nchw(batch["gt"])
    opt = recipe.optimizer
    lr = float(schedules.learning_rate(opt)(0))  # the schedule's lr of the first update
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[opt.name]
    optimizer = cls(ref.parameters(), lr=lr, betas=(opt.b1, opt.b2), eps=opt.eps,
                    weight_decay=opt.weight_decay)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the losses' own constants (edge kernels) too
    try:
        loss = torch_loss(family, ref, vgg_t, lq, gt)
    finally:
        torch.set_default_dtype(default)
    optimizer.zero_grad()
    loss.backward()
    if opt.grad_clip_norm:
        torch.nn.utils.clip_grad_norm_(ref.parameters(), opt.grad_clip_norm)
    grads = {k: p.grad.numpy().copy() for k, p in ref.named_parameters()}
    optimizer.step()
    after = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    # every state_dict key -> its parameter's name (MPRNet's shared PReLU has several keys), or
    # None for a buffer
    names = {id(p): k for k, p in ref.named_parameters()}
    owner = {k: names.get(id(v)) for k, v in ref.state_dict(keep_vars=True).items()}
    return loss.item(), grads, after, lr, owner


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


def _floating_dtypes(tree):
    return {np.dtype(a.dtype) for a in jax.tree.leaves(tree)
            if jnp.issubdtype(np.asarray(a).dtype, jnp.floating)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_step_matches_torch_and_bfloat16(family, vgg):
    vgg_path, vgg_t = vgg
    recipe = _recipe(family, vgg_path)
    batch = _batch(recipe)
    before, new, metrics, model, grads = run_step(recipe, batch)
    module0 = model.module(before["params"], before["model_state"], train=True)
    loss_t, grads_t, after_t, lr, owner = torch_step(recipe, family, module0, vgg_t, batch)
    before_t = convert.flax_to_numpy(module0)

    # the loss
    loss = float(metrics["loss"])
    # float32 vs float64: measured 1e-7..1e-6 relative
    assert abs(loss - loss_t) <= 1e-5 * abs(loss_t), (loss, loss_t)
    print(f"{family}: loss {loss:.6g}, torch float64 {loss_t:.6g}, relative difference "
          f"{abs(loss - loss_t) / abs(loss_t):.1e}")

    # the gradients
    grads_f = convert.state_to_torch_layout(module0, grads)
    assert set(grads_t) <= set(grads_f)
    # per tensor, relative to its largest entry, with a floor of 1e-5 of the largest gradient
    # overall
    g_scale = max(float(np.abs(g).max()) for g in grads_t.values())
    floor = 1e-5
    worst = 0.0
    for k, g_t in grads_t.items():
        err = float(np.abs(grads_f[k] - g_t).max())
        worst = max(worst, err / g_scale)
        assert err <= 1e-4 * float(np.abs(g_t).max()) + floor * g_scale, (k, err / g_scale)
    print(f"{family}: gradients within {worst:.1e} of the largest")

    # the updated weights and (AECR-Net) running statistics
    after_f = convert.flax_to_numpy(model.module(new["params"], new["model_state"], train=True))
    assert set(after_f) == set(after_t)
    resolved = []
    for key, w_t in after_t.items():
        step_f, step_t = after_f[key] - before_t[key], w_t - before_t[key]
        k = owner[key]
        if k is None:  # a buffer the training forward updates
            assert np.abs(step_t).max() > 0, key
            assert np.abs(after_f[key] - w_t).max() <= 1e-5 * max(1.0, np.abs(w_t).max()), key
            continue
        g = np.abs(grads_t[k])
        # Adam's first step is about lr * sign(g): where the float32 gradient resolves g (above
        # its noise: 1e-3 of the tensor's largest and within half of g of torch's float64 one)
        # the two steps agree to 1% of lr; elsewhere the sign is noise (at most 2 lr apart)
        sure = (g > 1e-3 * g.max()) & (np.abs(grads_f[k] - grads_t[k]) < 0.5 * g)
        # (zero gradients, e.g. of a branch whose output is scaled by a zero-initialised
        # parameter, leave the weight in place in both: not counted)
        resolved += [int(sure.sum()), int(np.sum(g > 0)),
                     int(np.sum(np.abs(step_t[sure]) > 0.1 * lr))]
        err = float(np.abs(step_f - step_t)[sure].max(initial=0.0))
        assert err <= 1e-2 * lr, (key, err / lr)
        assert np.abs(step_f - step_t).max() <= 2 * lr * (1 + 1e-3), key
    share = sum(resolved[0::3]) / sum(resolved[1::3])
    moved = sum(resolved[2::3]) / sum(resolved[0::3])
    print(f"{family}: the step checked to 1% of lr on {100 * share:.1f}% of the weights with a "
          f"non-zero gradient ({sum(resolved[1::3])} of {sum(g.size for g in grads_t.values())}), "
          f"{100 * moved:.1f}% of those moved by more than lr / 10")
    assert share >= 0.75, share
    # most moved by about lr (less where |g| is near Adam's eps), so a step of the wrong sign
    # lands ~2 lr from torch's there
    assert moved >= 0.5, moved
    buffers = {k for k, v in owner.items() if v is None}
    assert bool(buffers) == (family == "aecrnet"), buffers

    # bfloat16: the same step computed in bfloat16
    recipe16 = dataclasses.replace(recipe, dtype="bfloat16")
    _, new16, metrics16, _, grads16 = run_step(recipe16, batch)
    for part in ("params", "opt_state", "model_state"):
        assert _floating_dtypes(new16[part]) <= {np.dtype(np.float32)}, part
    assert _floating_dtypes(checkpointing.host_state(new16)) == {np.dtype(np.float32)}  # checkpointed
    rel = abs(float(metrics16["loss"]) - loss) / abs(loss)
    a, b = _flat(grads16), _flat(grads)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    # per tensor, for those carrying >= 1% of the gradient's squared norm: a reduction run in
    # bfloat16 shows as a norm ratio far from 1 even where the overall cosine hides it
    problems, worst = [], (1.0, 1.0, "")
    total = float(b @ b)
    for (path, g32), g16 in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads16)):
        x, y = np.ravel(np.asarray(g16, np.float64)), np.ravel(np.asarray(g32, np.float64))
        if y @ y < 1e-2 * total:
            continue
        ratio = float(np.linalg.norm(x) / np.linalg.norm(y))
        cos = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
        name = jax.tree_util.keystr(path)
        if abs(np.log(ratio)) > abs(np.log(worst[0])):
            worst = (ratio, cos, name)
        if not (0.9 <= ratio <= 1.1 and cos >= 0.98):
            problems.append(f"{name}: norm ratio {ratio:.3f}, cosine {cos:.4f}")
    print(f"bfloat16 {family}: loss relative difference {rel:.2e}, gradient cosine {cosine:.5f}, "
          f"worst tensor norm ratio {worst[0]:.3f} ({worst[2]})")
    if not (rel <= 1e-2 and cosine >= 0.99):
        problems.append(f"loss relative difference {rel:.2e}, gradient cosine {cosine:.5f}")
    assert rel > 0 and cosine < 1  # it did compute in bfloat16
    assert not problems, problems
