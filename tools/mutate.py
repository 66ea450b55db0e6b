"""Mutation check of the equivalence suite: a catalogue of realistic porting mistakes, each
applied to a scratch copy of the repository, with the narrow tests that must fail on it.

    python tools/mutate.py -j 1         # baseline, then every mistake; exit 1 unless all CAUGHT
    python tools/mutate.py -j 2         # two mistakes at a time
    python tools/mutate.py --only restormer-gdfn-gelu-wrong-half --only snr-mask-fill-zero
    python tools/mutate.py --family accelerator
    python tools/mutate.py --list       # the catalogue: name, family, tests
    python tools/mutate.py --check      # only verify that every patch still applies (seconds)
    python tools/mutate.py --rev HEAD   # mutate a committed tree instead of the working tree
    python tools/mutate.py --rev HEAD --overlay tests/test_x.py   # ... with a file from the tree
    python tools/mutate.py -j 1 --doc docs/mutations.md   # and write the run as that page

What it does: copy the source tree (by default the working tree's tracked and
untracked-but-not-ignored files; with ``--rev`` the files of that commit, via ``git archive``)
into a temporary directory. Unless ``--no-baseline``, run every test node of the selected
mistakes once on that unmutated copy: a node that already fails (or skips) there would "catch"
anything (or nothing), so the run stops. Then, per mistake: copy the tree again, replace each
patch's ``old`` text by its ``new`` text (each ``old`` must occur exactly once in its file,
otherwise the mistake is STALE, a failure of the catalogue, not skipped), and run
``python -m pytest -x -q TESTS`` in that copy with ``PYTHONPATH`` pointing at it and a small
reporting plugin loaded. The working tree is never written (except the page ``--doc`` names).

A mistake is CAUGHT only when the first failing test fails on an ``AssertionError`` of the test
itself: its ``assert``, or a ``numpy.testing`` / ``torch.testing`` / ``pytest`` helper it calls
(the innermost frame outside those helpers lies in ``tests/``). A failure on anything else (an
import or collection error, a ``TypeError``, an error inside jax, an ``assert`` in library code)
is CRASHED: the mutation broke the program instead of computing a wrong number. CRASHED,
SURVIVED (the tests passed), STALE, BROKEN (node ids not found: pytest exit 4/5) and TIMEOUT are
failures of the catalogue; the exit status is 1 when any mistake ends in one of them.

Adding a mistake
----------------
Append a :class:`Mistake` to ``CATALOGUE``::

    Mistake(
        "family-short-name",                        # unique, kebab-case
        "family",                                   # one of FAMILIES
        "what a porter might plausibly get wrong, in one line",
        [("path/from/repo/root.py", "exact old text", "new text")],   # one or more patches
        ["tests/test_x.py::test_node[param]"],      # the narrowest nodes that must catch it
    )

* ``old`` must be unique in its file: include enough surrounding text (a whole line, its
  neighbours) to make it so; ``python tools/mutate.py --check`` says at once if it is not.
  Others edit the tree too: prefer ``old`` text that is unlikely to move.
* The new code must still import and run: the mistake is a wrong number, not a crash (a crash
  is reported CRASHED, not CAUGHT). Compute quietly wrong values: swapped halves, a wrong axis,
  constant, sign, layout, dtype, reduction, order.
* Choose test nodes as narrow as will catch it (a block test before a network test), and check
  with ``--only NAME`` that it is CAUGHT and how long it takes; the whole catalogue, baseline
  included, must stay under 30 minutes with ``-j 1`` on 2 cores. If no narrow node catches a
  real mistake, add a small test (and say so in its docstring) rather than naming a broad one.
* Every path the users run needs mistakes. Family ``accelerator``: the ``default=`` side of a
  ``lowering.per_platform`` call (what TPUs and GPUs compile) or library code only that side
  reaches; its nodes must run that path (``[accelerator-path-...]`` parametrisations of
  ``both_lowerings`` tests, or tests/test_accelerator_path.py; tests/test_lowering_targets.py
  computes no numbers). Family ``xla_cpu``: flaxrestore/xla_cpu/; its nodes must run the CPU
  lowering (not ``accelerator-path``). ``catalogue_problems`` enforces both before any run.
* Then re-run the catalogue with ``--doc docs/mutations.md`` (the page is generated).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import fnmatch
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAMILIES = ("restormer", "mprnet", "darkir", "snr", "aecrnet", "accelerator", "xla_cpu",
            "restore", "converter", "train", "data")
# test files whose every test runs the accelerator path (no cpu-lowering parametrisation)
ACCELERATOR_FILES = ("tests/test_accelerator_path.py",)


@dataclasses.dataclass(frozen=True)
class Mistake:
    name: str
    family: str
    what: str
    patches: list  # [(path, old, new), ...]
    tests: list  # pytest node ids
    timeout: int = 900


M = Mistake
R = "flaxrestore/models/restormer.py"
MP = "flaxrestore/models/mprnet.py"
D = "flaxrestore/models/darkir.py"
S = "flaxrestore/models/snr.py"
A = "flaxrestore/models/aecrnet.py"
L = "flaxrestore/layers.py"
C = "porting/convert.py"

CATALOGUE: list[Mistake] = [
    # ------------------------------------------------------------------------- Restormer
    M("restormer-gdfn-gelu-wrong-half", "restormer",
      "GDFN gate: GELU applied to the second half of the split instead of the first",
      [(R, "return self.project_out(layers.gelu(x1) * x2)",
        "return self.project_out(x1 * layers.gelu(x2))")],
      ["tests/test_restormer.py::test_block_forward[cpu-lowering-FeedForward]"]),
    M("restormer-attention-softmax-axis", "restormer",
      "MDTA: attention softmax normalised over the query-channel axis instead of the key axis",
      [(R, "attn = jax.nn.softmax(attn, axis=-1)", "attn = jax.nn.softmax(attn, axis=-2)")],
      ["tests/test_restormer.py::test_block_forward[cpu-lowering-Attention]"]),
    M("restormer-attention-no-temperature", "restormer",
      "MDTA: the learnable temperature divides the logits instead of multiplying them",
      [(R, "attn = attn * self.temperature[...].astype(q.dtype)",
        "attn = attn / self.temperature[...].astype(q.dtype)")],
      ["tests/test_restormer.py::test_block_forward[cpu-lowering-Attention]"]),
    M("restormer-layernorm-eps", "restormer",
      "WithBias/BiasFree LayerNorm eps 1e-6 (Flax's default) instead of the original's 1e-5",
      [(R, "layers.ChannelLayerNorm(dim, eps=1e-5,", "layers.ChannelLayerNorm(dim, eps=1e-6,")],
      ["tests/test_restormer.py::test_block_forward[cpu-lowering-LayerNorm-WithBias]"]),
    M("layers-biasfree-layernorm-centred", "restormer",
      "BiasFree LayerNorm written as a centred LN without bias (it divides the uncentred x)",
      [(L, "num = x - mu if self.center else x", "num = x - mu")],
      ["tests/test_restormer.py::test_block_forward[cpu-lowering-LayerNorm-BiasFree]"]),
    M("layers-pixel-unshuffle-channel-order", "restormer",
      "pixel_unshuffle in TF space_to_depth order (channel fastest) instead of torch's",
      [(L, "return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // r, w // r, c * r * r)",
        "return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // r, w // r, c * r * r)")],
      ["tests/test_restormer.py::test_block_forward[cpu-lowering-Downsample]"]),
    M("layers-pixel-shuffle-channel-order", "restormer",
      "pixel_shuffle in TF depth_to_space order (channel fastest) instead of torch's",
      [(L, "x = x.reshape(b, h, w, c // (r * r), r, r)\n"
           "    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * r, w * r, c // (r * r))",
        "x = x.reshape(b, h, w, r, r, c // (r * r))\n"
        "    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * r, w * r, c // (r * r))")],
      ["tests/test_restormer.py::test_block_forward[cpu-lowering-Upsample]"]),
    # --------------------------------------------------------------------------- MPRNet
    M("mprnet-sam-residual", "mprnet",
      "SAM: the gated features added to conv1(x) instead of to the input features x",
      [(MP, "return x1 * x2 + x, img", "return x1 * x2 + x1, img")],
      ["tests/test_mprnet.py::test_block_forward[cpu-lowering-SAM]"]),
    M("mprnet-csff-swapped", "mprnet",
      "cross-stage feature fusion: the encoder's and decoder's features swapped at level 1",
      [(MP, "enc1 = enc1 + self.csff_enc1(encoder_outs[0]) + self.csff_dec1(decoder_outs[0])",
        "enc1 = enc1 + self.csff_enc1(decoder_outs[0]) + self.csff_dec1(encoder_outs[0])")],
      ["tests/test_mprnet.py::test_block_forward[cpu-lowering-Encoder-csff]"]),
    M("mprnet-quadrant-order", "mprnet",
      "stage 1: the right quadrants' features glued on the left of the halves",
      [(MP, "top = jnp.concatenate([f_lt, f_rt], axis=2)",
        "top = jnp.concatenate([f_rt, f_lt], axis=2)")],
      ["tests/test_mprnet.py::test_variant_forward[mprnet:deraining]"]),
    M("mprnet-downsample-align-corners", "mprnet",
      "the x0.5 bilinear resize with align_corners=True",
      [(MP, "return layers.resize_bilinear(x, scale_factor=0.5, align_corners=False)",
        "return layers.resize_bilinear(x, scale_factor=0.5, align_corners=True)")],
      ["tests/test_mprnet.py::test_block_forward[cpu-lowering-DownSample]"]),
    M("losses-charbonnier-eps-not-squared", "mprnet",
      "MPRNet's Charbonnier with eps (1e-3) not squared inside the root",
      [("flaxrestore/losses.py", "return jnp.mean(jnp.sqrt(d * d + eps * eps))",
        "return jnp.mean(jnp.sqrt(d * d + eps))")],
      ["tests/test_mprnet.py::test_charbonnier[shape0]"]),
    # --------------------------------------------------------------------------- DarkIR
    M("darkir-fft-norm-ortho", "darkir",
      "FreMLP: rfft2/irfft2 with norm='ortho' instead of torch's default 'backward'",
      [(D, ", axes=(1, 2))\n        re, im = jnp.real(z), jnp.imag(z)",
        ", axes=(1, 2), norm=\"ortho\")\n        re, im = jnp.real(z), jnp.imag(z)"),
       (D, "return jnp.fft.irfft2(z, s=(h, w), axes=(1, 2)).astype(x.dtype)",
        "return jnp.fft.irfft2(z, s=(h, w), axes=(1, 2), norm=\"ortho\").astype(x.dtype)")],
      ["tests/test_darkir.py::test_block_forward[cpu-lowering-FreMLP-hw1]"]),
    M("darkir-fft-real-imag-swapped", "darkir",
      "FreMLP: the recombined spectrum with real and imaginary parts swapped",
      [(D, "z = jax.lax.complex(mag * cos, mag * sin)", "z = jax.lax.complex(mag * sin, mag * cos)")],
      ["tests/test_darkir.py::test_block_forward[cpu-lowering-FreMLP-hw1]"]),
    M("darkir-layernorm-eps", "darkir",
      "LayerNorm2d eps 1e-5 (torch's LayerNorm default) instead of DarkIR's 1e-6",
      [(D, "return layers.ChannelLayerNorm(channels, eps=1e-6)",
        "return layers.ChannelLayerNorm(channels, eps=1e-5)")],
      ["tests/test_darkir.py::test_block_forward[cpu-lowering-LayerNorm2d-hw0]"]),
    M("darkir-pad-top-left", "darkir",
      "the network's own padding to a multiple of 8 put at the top/left instead of bottom/right",
      [(D, "x = layers.pad2d(x, (0, (p - h % p) % p, 0, (p - w % p) % p))  # zeros, bottom/right",
        "x = layers.pad2d(x, ((p - h % p) % p, 0, (p - w % p) % p, 0))")],
      ["tests/test_darkir.py::test_padding_is_zeros_bottom_right"]),
    M("darkir-gamma-beta-swapped", "darkir",
      "EBlock: the SpAM branch scaled by gamma and the FreMLP branch by beta",
      [(D, "        y = inp + self.beta[...] * x\n        x = y * self.freq(self.norm2(y))\n"
           "        return y + x * self.gamma[...]",
        "        y = inp + self.gamma[...] * x\n        x = y * self.freq(self.norm2(y))\n"
        "        return y + x * self.beta[...]")],
      ["tests/test_darkir.py::test_block_forward[cpu-lowering-EBlock-hw2]"]),
    # ------------------------------------------------------------------------ SNR-Aware
    M("snr-mask-threshold-inverted", "snr",
      "transformer key mask: patches with mean SNR below 0.5 attended to instead of above",
      [(S, "return p > MASK_THRESHOLD", "return p < MASK_THRESHOLD")],
      ["tests/test_snr.py::test_forward_full_width_mixed_and_fully_masked"]),
    M("snr-mask-fill-zero", "snr",
      "masked keys filled with logit 0 (masked_fill(mask, 0)) instead of -1e9",
      [(S, "MASK_FILL = -1e9", "MASK_FILL = 0.0")],
      ["tests/test_snr.py::test_attention_full_width_with_masks[cpu-lowering-attention]"]),
    M("snr-blend-swapped", "snr",
      "the SNR map blends the branches the wrong way round (high SNR -> transformer)",
      [(S, "fea = fea_global * (1 - mask_q) + fea_light * mask_q",
        "fea = fea_global * mask_q + fea_light * (1 - mask_q)")],
      ["tests/test_snr.py::test_forward_full_width_mixed_and_fully_masked"]),
    M("snr-unfold-order", "snr",
      "patch tokens ordered (ky, kx, channel) instead of torch unfold's (channel, ky, kx)",
      [(S, "return t.transpose(0, 1, 3, 5, 2, 4).reshape(b, hp * wp, c * PATCH * PATCH)",
        "return t.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp * wp, c * PATCH * PATCH)")],
      ["tests/test_snr.py::test_patch_tokens_match_unfold_and_fold"]),
    # ------------------------------------------------------------------------- AECR-Net
    M("aecrnet-mix-without-sigmoid", "aecrnet",
      "adaptive mixup weight used raw instead of through a sigmoid",
      [(A, "f = jax.nn.sigmoid(self.w[...]).astype(fea1.dtype)", "f = self.w[...].astype(fea1.dtype)")],
      ["tests/test_aecrnet.py::test_mix"]),
    M("layers-dcn-offset-order", "aecrnet",
      "deformable conv offsets read as (dx, dy) pairs instead of DCNv2's (dy, dx)",
      [(L, "py = base_y[None, :, None, None, :].astype(x.dtype) + off[..., 0]",
        "py = base_y[None, :, None, None, :].astype(x.dtype) + off[..., 1]"),
       (L, "px = base_x[None, None, :, None, :].astype(x.dtype) + off[..., 1]",
        "px = base_x[None, None, :, None, :].astype(x.dtype) + off[..., 0]")],
      ["tests/test_aecrnet.py::test_deform_conv_matches_grid_sample"]),
    M("layers-conv-transpose-output-padding-side", "aecrnet",
      "transposed conv: output_padding added before the input instead of after (one-pixel shift)",
      [(L, "pads = tuple((d * (k - 1) - p, d * (k - 1) - p + op) for k, p, op, d in",
        "pads = tuple((d * (k - 1) - p + op, d * (k - 1) - p) for k, p, op, d in")],
      ["tests/test_aecrnet.py::test_conv_transpose[cfg0]"]),
    M("layers-fastdeconv-eps", "aecrnet",
      "FastDeconv's covariance regulariser eps 1e-3 instead of 1e-5",
      [(L, "dilation=1, groups: int = 1, bias: bool = True, eps: float = 1e-5,",
        "dilation=1, groups: int = 1, bias: bool = True, eps: float = 1e-3,")],
      ["tests/test_aecrnet.py::test_fastdeconv_known_answers"]),
    M("aecrnet-reflect-pad-replicate", "aecrnet",
      "the 7x7 convs' ReflectionPad2d(3) written as replicate (edge) padding",
      [(A, 'return layers.pad2d(x, 3, "reflect")  # torch ReflectionPad2d(3): no edge repeat',
        'return layers.pad2d(x, 3, "replicate")')],
      ["tests/test_aecrnet.py::test_network_forward_and_gradients_eval_full_width"]),
    # ------------------------------------------------ XLA:CPU lowerings (what CPU programs run)
    M("xla-cpu-winograd-kernel-transform-sign", "xla_cpu",
      "Winograd F(2x2, 3x3): a sign flipped in the kernel transform G's third row",
      [("flaxrestore/xla_cpu/convs.py", "(0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))",
        "(0.5, 0.5, 0.5), (0.5, -0.5, -0.5), (0.0, 0.0, 1.0))")],
      ["tests/test_layers.py::test_winograd_conv3x3_matches_torch[1-hw0-5-7-1]"]),
    M("xla-cpu-dilated-branch-grad-offsets", "xla_cpu",
      "DarkIR's fused dilated depthwise branches: the hand-written input gradient reads dy at "
      "the taps' offsets instead of the negated ones (forward unchanged)",
      [("flaxrestore/xla_cpu/depthwise.py", "neg = tuple((-dy, -dx) for dy, dx in offsets)",
        "neg = tuple((dy, dx) for dy, dx in offsets)")],
      ["tests/test_released_grads.py::test_gradients_at_released_width_match_torch_float64[darkir]"]),
    # --------------------------------------------------------------- restore (tiles, ensemble)
    M("restore-ensemble-inverse-order", "restore",
      "x8 ensemble: the inverse transform undoes the rotation before the flip",
      [("flaxrestore/restore.py", "    if k >= 4:\n        a = a[:, :, ::-1]\n    return np.rot90(a, -(k % 4), axes=(1, 2))",
        "    a = np.rot90(a, -(k % 4), axes=(1, 2))\n    return a[:, :, ::-1] if k >= 4 else a")],
      ["tests/test_restore.py::test_tiles_and_ensemble_on_real_networks_match_torch[restormer]"]),
    M("restore-ensemble-snr-map-untransformed", "restore",
      "x8 ensemble: SNR-Aware's map passed untransformed next to the transformed image",
      [("flaxrestore/restore.py", "[_transform(e, k) for e in extras]", "list(extras)")],
      ["tests/test_restore.py::test_tiles_and_ensemble_on_real_networks_match_torch[snr]"]),
    M("restore-tile-blend-no-margin", "restore",
      "tile blending without the zero margin at shared tile edges (tile borders lack context)",
      [("flaxrestore/restore.py", "    margin = overlap // 4\n    rise = overlap - 2 * margin\n    d = np.arange",
        "    margin = 0\n    rise = overlap - 2 * margin\n    d = np.arange")],
      ["tests/test_restore.py::test_tiles_and_ensemble_on_real_networks_match_torch[restormer]"]),
    # ------------------------------------------------------------------------ converter
    M("convert-dcn-kernel-hw-swapped", "converter",
      "converter: the deformable conv's OIHW -> HWIO rule transposes H and W (one layer type)",
      [(C, 'RULES[layers.ModulatedDeformConv2d] = {"kernel": OIHW_TO_HWIO}',
        'RULES[layers.ModulatedDeformConv2d] = {"kernel": Rule("weight", _t(3, 2, 1, 0), '
        '_t(3, 2, 1, 0))}')],
      ["tests/test_aecrnet.py::test_block_forward[cpu-lowering-DCNBlock]"]),
    M("convert-conv-transpose-not-flipped", "converter",
      "converter: ConvTranspose2d's kernel swapped to HWIO but not flipped spatially",
      [(C, "CONV_TRANSPOSE_FLIP = Rule(\"weight\", lambda a: np.transpose(a[:, :, ::-1, ::-1], (2, 3, 0, 1)),\n"
           "                           lambda a: np.transpose(a[::-1, ::-1], (2, 3, 0, 1)))",
        "CONV_TRANSPOSE_FLIP = Rule(\"weight\", lambda a: np.transpose(a, (2, 3, 0, 1)),\n"
        "                           lambda a: np.transpose(a, (2, 3, 0, 1)))")],
      ["tests/test_aecrnet.py::test_conv_transpose[cfg0]"]),
    M("convert-conv-kernel-flipped", "converter",
      "converter: every Conv2d kernel flipped spatially (cross-correlation vs convolution)",
      [(C, 'OIHW_TO_HWIO = Rule("weight", _t(2, 3, 1, 0), _t(3, 2, 0, 1))',
        'OIHW_TO_HWIO = Rule("weight", lambda a: np.transpose(a, (2, 3, 1, 0))[::-1, ::-1],\n'
        '                    lambda a: np.transpose(a[::-1, ::-1], (3, 2, 0, 1)))')],
      ["tests/test_convert.py::test_conv_layout"]),
    # ---------------------------------------------------------------------------- train
    M("train-adam-no-bias-correction", "train",
      "the trainer's Adam without bias correction of the moments",
      [("train/schedules.py",
        "def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:",
        "def _adam_uncorrected(b1, b2, eps):\n"
        "    def init(params):\n"
        "        z = jax.tree.map(jnp.zeros_like, params)\n"
        "        return (z, z)\n\n"
        "    def update(g, state, params=None):\n"
        "        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state[0], g)\n"
        "        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state[1], g)\n"
        "        return jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), m, v), (m, v)\n\n"
        "    return optax.GradientTransformation(init, update)\n\n\n"
        "def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:"),
       ("train/schedules.py",
        "            parts.append(optax.add_decayed_weights(cfg.weight_decay))  # coupled L2\n"
        "        parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))",
        "            parts.append(optax.add_decayed_weights(cfg.weight_decay))  # coupled L2\n"
        "        parts.append(_adam_uncorrected(cfg.b1, cfg.b2, cfg.eps))")],
      ["tests/test_schedules.py::test_optimizer_matches_torch[adam-0.0-0.0]"]),
    M("train-adamw-decay-coupled", "train",
      "AdamW's weight decay added to the gradient before Adam (coupled) instead of decoupled",
      [("train/schedules.py",
        "        parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))\n"
        "        if cfg.weight_decay:\n"
        "            parts.append(optax.add_decayed_weights(cfg.weight_decay))  # decoupled, times lr below",
        "        if cfg.weight_decay:\n"
        "            parts.append(optax.add_decayed_weights(cfg.weight_decay))\n"
        "        parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))")],
      ["tests/test_schedules.py::test_optimizer_matches_torch[adamw-0.1-0.0]"]),
    M("train-cosine-restart-off-by-one", "train",
      "CosineAnnealingRestartCyclicLR evaluated one iteration late (e = count + 1)",
      [("train/schedules.py", "        e = jnp.asarray(count, jnp.float32)\n"
                              "        # index of the first cycle",
        "        e = jnp.asarray(count + 1, jnp.float32)\n"
        "        # index of the first cycle")],
      ["tests/test_schedules.py::test_restormer_cosine_restart_matches_formula_and_spec_values"]),
    M("train-step-update-sign", "train",
      "the train step subtracts optax's updates (which already carry the minus sign)",
      [("train/step.py", 'params = optax.apply_updates(state["params"], updates)',
        'params = optax.apply_updates(state["params"], jax.tree.map(lambda u: -u, updates))')],
      ["tests/test_train_step.py::test_remat_step_gradients_match_torch_and_recompute_survives"]),
    # ===================================== accelerator path: what TPUs and GPUs run (default=)
    M("acc-materialize-stops-gradient", "accelerator",
      "materialize on TPU/GPU written as lax.stop_gradient (a 'barrier' that also cuts the "
      "gradient): every residual sum SNR-Aware's transformer materialises loses its gradient",
      [(L, "lowering.per_platform(cpu=lambda: xla_remat.materialize(x), default=lambda: x)",
        "lowering.per_platform(cpu=lambda: xla_remat.materialize(x),\n"
        "                                 default=lambda: jax.lax.stop_gradient(x))")],
      ["tests/test_layers.py::test_materialize_is_an_exact_identity[accelerator-path-shape0-float32]"]),
    M("acc-remat-weights-stop-gradient", "accelerator",
      "jax.checkpoint remat: the block's weights passed in through stop_gradient (as constants "
      "to recompute from): remat blocks' parameters get no gradient on TPU/GPU",
      [(L, "default=lambda: jax.checkpoint(pure)(state, *args))",
        "default=lambda: jax.checkpoint(pure)(jax.lax.stop_gradient(state), *args))")],
      ["tests/test_layers.py::test_rematerialize_keeps_values_and_gradients[accelerator-path]"]),
    M("acc-conv-kernel-hwoi", "accelerator",
      "Conv2d's library conv told the kernel is HWOI: a square conv's in/out axes swapped, "
      "which no shape check sees",
      [(L, 'dimension_numbers=("NHWC", "HWIO", "NHWC"),\n                feature_group_count=self.groups)',
        'dimension_numbers=("NHWC", "HWOI", "NHWC"),\n                feature_group_count=self.groups)')],
      ["tests/test_layers.py::test_conv_gradients_match_torch[accelerator-path-eager-6-6-3-1-1-1-hw1]"]),
    M("acc-conv-same-padding", "accelerator",
      "Conv2d's library conv with padding='SAME' (TF's rule: the odd pixel of a strided conv "
      "padded at the bottom/right) instead of torch's explicit symmetric padding",
      [(L, "x, kernel, window_strides=self.stride, padding=((ph, ph), (pw, pw)),",
        'x, kernel, window_strides=self.stride, padding="SAME",')],
      ["tests/test_layers.py::test_conv_gradients_match_torch[accelerator-path-eager-4-6-3-2-1-1-hw7]"]),
    M("acc-concat-call-reversed", "accelerator",
      "Conv2d.concat_call on TPU/GPU concatenates its pieces last-first (the CPU split path "
      "takes the kernel's input slices in order)",
      [(L, "y = lowering.per_platform(cpu=cpu, default=lambda: whole(False))",
        "y = lowering.per_platform(cpu=cpu, default=lambda: self._conv(\n"
        "            jnp.concatenate(xs[::-1], axis=-1).astype(dtype), kernel, cpu=False))")],
      ["tests/test_layers.py::test_conv_concat_call_matches_torch_cat_conv[accelerator-path-3-1-sizes0-7]"]),
    M("acc-dilated-branches-chained", "accelerator",
      "DarkIR's parallel dilated depthwise branches applied one after the other on TPU/GPU "
      "(their Sequential called as a chain) instead of summed",
      [(L, "    def default():\n        y = chain(False)\n"
           "        return sum(conv.apply(y, cpu=False) for conv in branches)",
        "    def default():\n        y = chain(False)\n"
        "        for conv in branches:  # the branches' Sequential called as one chain\n"
        "            y = conv.apply(y, cpu=False)\n        return y")],
      ["tests/test_darkir.py::test_block_forward[accelerator-path-DBlock-hw4]"]),
    M("acc-conv-transpose-padding-swapped", "accelerator",
      "ConvTranspose2d on TPU/GPU: the library conv's (low, high) padding pairs given high first, "
      "so output_padding's extra row/column lands at the top/left",
      [(L, "x, kernel, window_strides=(1, 1), padding=pads, lhs_dilation=self.stride,",
        "x, kernel, window_strides=(1, 1), padding=tuple((hi, lo) for lo, hi in pads),\n"
        "                lhs_dilation=self.stride,")],
      ["tests/test_layers.py::test_conv_transpose_compiled_matches_torch[accelerator-path-6-4-3-2-1-1]"]),
    M("acc-dcn-gather-border-clamped", "accelerator",
      "the deformable conv's gather (the library path TPUs/GPUs run): neighbours outside the "
      "image read the clamped border pixel instead of DCNv2's zero",
      [(L, "ok = inside & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)",
        "ok = inside  # (outside neighbours: the clamped index's border value)")],
      ["tests/test_aecrnet.py::test_dcn_module_forward_and_gradients[accelerator-path-cfg0]"]),
    M("acc-valid-conv-kernel-whio", "accelerator",
      "AECR-Net's reflect-padded 7x7 convs on TPU/GPU: the kernel declared WHIO (its spatial "
      "axes transposed; a square 7x7 hides it from every shape check)",
      [(L, 'padding=((0, 0), (0, 0)), rhs_dilation=dilation,\n'
           '            dimension_numbers=("NHWC", "HWIO", "NHWC")))',
        'padding=((0, 0), (0, 0)), rhs_dilation=dilation,\n'
        '            dimension_numbers=("NHWC", "WHIO", "NHWC")))')],
      ["tests/test_layers.py::test_narrow_valid_conv_matches_torch[accelerator-path-6-3-1]"]),
    M("acc-maxpool-ties-split", "accelerator",
      "max-pool on TPU/GPU as a max over a (2, 2) reshape instead of reduce_window: autodiff "
      "splits a window's gradient among tied maxima (ReLU zeros), torch gives it to the first",
      [(L, "default=lambda: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1),\n"
           "                                              (1, 2, 2, 1), \"VALID\"))",
        "default=lambda: jnp.max(x[:, :x.shape[1] // 2 * 2, :x.shape[2] // 2 * 2].reshape(\n"
        "            x.shape[0], x.shape[1] // 2, 2, x.shape[2] // 2, 2, x.shape[3]), axis=(2, 4)))")],
      ["tests/test_vgg.py::test_max_pool_value_and_gradient_match_torch[accelerator-path-shape0]"]),
    M("acc-clip-global-norm-mean-squares", "accelerator",
      "gradient clipping on TPU/GPU: the global norm from each tensor's MEAN square (jnp.mean "
      "where clip_grad_norm_ sums), so far smaller norms are compared with max_norm",
      [("train/schedules.py",
        "return optax.global_norm(jax.tree.map(lambda g: g.astype(dtype), tree))",
        "return jnp.sqrt(sum(jnp.mean(jnp.square(g.astype(dtype))) for g in leaves))")],
      ["tests/test_schedules.py::test_clip_grad_norm_matches_torch_on_several_tensors[accelerator-path-0.001]"]),
    # ============================================ activations, norms, attention, per family
    M("layers-gelu-tanh", "restormer",
      "GELU with jax's default tanh approximation instead of torch's exact erf form",
      [(L, "gelu = functools.partial(jax.nn.gelu, approximate=False)",
        "gelu = functools.partial(jax.nn.gelu, approximate=True)")],
      ["tests/test_restormer.py::test_block_forward[cpu-lowering-FeedForward]"]),
    M("restormer-attention-heads-interleaved", "restormer",
      "MDTA: heads interleaved over channels (channel = i * heads + head, einops' '(c head)' "
      "for the original's '(head c)'): the same shapes, other channels per head",
      [(R, "q, k, v = (t.reshape(b, h * w, self.num_heads, c // self.num_heads) for t in (q, k, v))",
        "q, k, v = (t.reshape(b, h * w, c // self.num_heads, self.num_heads).swapaxes(2, 3)\n"
        "                   for t in (q, k, v))"),
       (R, 'out = jnp.einsum("bhcd,bnhd->bnhc", attn, v).reshape(b, h, w, c)',
        'out = jnp.einsum("bhcd,bnhd->bnhc", attn, v).swapaxes(2, 3).reshape(b, h, w, c)')],
      ["tests/test_restormer.py::test_block_forward[cpu-lowering-Attention-bias]"]),
    M("layers-prelu-fixed-slope", "mprnet",
      "MPRNet's shared nn.PReLU() ported as LeakyReLU(0.25), its initial value: the learned "
      "slope is loaded but never read",
      [(L, "return jnp.where(x >= 0, x, a * x)",
        "return jax.nn.leaky_relu(x, 0.25)  # nn.PReLU()'s initial slope")],
      ["tests/test_mprnet.py::test_block_forward[cpu-lowering-CAB]"]),
    M("darkir-fremlp-leaky-default-slope", "darkir",
      "FreMLP's LeakyReLU(0.1) written with jax's default slope (0.01)",
      [(D, "return jax.nn.leaky_relu(x, negative_slope=0.1)", "return jax.nn.leaky_relu(x)")],
      ["tests/test_darkir.py::test_block_forward[cpu-lowering-FreMLP-hw1]"]),
    M("snr-lrelu-slope", "snr",
      "SNR-Aware's LeakyReLU(0.1) written with BasicSR's usual slope 0.2",
      [(S, "    return jax.nn.leaky_relu(x, 0.1)", "    return jax.nn.leaky_relu(x, 0.2)")],
      ["tests/test_snr.py::test_forward_quarter_size_not_multiple_of_4"]),
    M("snr-layernorm-eps", "snr",
      "the attention's pre-LayerNorm with torch's default eps 1e-5 instead of the original's 1e-6",
      [(S, "self.layer_norm = layers.ChannelLayerNorm(d_model, eps=1e-6)",
        "self.layer_norm = layers.ChannelLayerNorm(d_model, eps=1e-5)")],
      # (survived the full-width attention test on unit-variance tokens: that test added)
      ["tests/test_snr.py::test_layer_norms_on_low_variance_tokens[attention]"]),
    M("snr-ffn-layernorm-eps", "snr",
      "the feed-forward's pre-LayerNorm with torch's default eps 1e-5 instead of 1e-6",
      [(S, "self.layer_norm = layers.ChannelLayerNorm(d_in, eps=1e-6)",
        "self.layer_norm = layers.ChannelLayerNorm(d_in, eps=1e-5)")],
      ["tests/test_snr.py::test_layer_norms_on_low_variance_tokens[feed_forward]"]),
    M("snr-attention-scale-full-width", "snr",
      "attention logits scaled by 1/sqrt(n_head * d_k) (the whole width) instead of 1/sqrt(d_k)",
      [(S, 'logits = jnp.einsum("bqhd,bkhd->bhqk", q / (self.d_k ** 0.5), k)',
        'logits = jnp.einsum("bqhd,bkhd->bhqk", q / ((self.n_head * self.d_k) ** 0.5), k)')],
      ["tests/test_snr.py::test_attention_full_width_with_masks[cpu-lowering-attention]"]),
    M("layers-dcn-mask-without-sigmoid", "aecrnet",
      "DCNv2's modulation mask used raw instead of through a sigmoid",
      [(L, "offset, mask = om[..., :n_off], jax.nn.sigmoid(om[..., n_off:])",
        "offset, mask = om[..., :n_off], om[..., n_off:]")],
      ["tests/test_aecrnet.py::test_dcn_module_forward_and_gradients[cpu-lowering-cfg0]"]),
    M("aecrnet-mix-weights-swapped", "aecrnet",
      "adaptive mixup: sigmoid(w) weighs the upsampled branch and 1 - sigmoid(w) the skip",
      [(A, "return fea1 * f + fea2 * (1 - f)", "return fea1 * (1 - f) + fea2 * f")],
      ["tests/test_aecrnet.py::test_mix"]),
    # ----------------------------------------------------- layouts no shape check can see
    M("convert-square-conv-in-out-swapped", "converter",
      "converter: a Conv2d kernel's in/out axes swapped only where the shapes demand it (the "
      "'fix the shape errors' rule): every square C -> C conv loads transposed",
      [(C, 'OIHW_TO_HWIO = Rule("weight", _t(2, 3, 1, 0), _t(3, 2, 0, 1))',
        'OIHW_TO_HWIO = Rule(\n    "weight",\n'
        '    lambda a: np.transpose(a, (2, 3, 1, 0) if a.shape[0] != a.shape[1] else (2, 3, 0, 1)),\n'
        '    lambda a: np.transpose(a, (3, 2, 0, 1) if a.shape[2] != a.shape[3] else (2, 3, 0, 1)))')],
      ["tests/test_mprnet.py::test_block_forward[cpu-lowering-CAB]"]),
    # ------------------------------------------------------------- losses: reductions, weights
    M("losses-snr-charbonnier-mean", "snr",
      "SNR-Aware's Charbonnier reduced by a mean (MPRNet's form) instead of its sum",
      [("flaxrestore/losses.py", "return jnp.sum(jnp.sqrt(d * d + eps))",
        "return jnp.mean(jnp.sqrt(d * d + eps))")],
      ["tests/test_snr.py::test_losses_match_torch"]),
    M("losses-contrastive-weights-reversed", "aecrnet",
      "contrastive regularisation's per-layer weights reversed (1 on relu1_1, 1/32 on relu5_1)",
      [("flaxrestore/losses.py", "CR_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)",
        "CR_WEIGHTS = (1.0, 1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32)")],
      ["tests/test_aecrnet.py::test_contrastive_regularization"]),
    M("losses-laplacian-upsample-without-x4", "mprnet",
      "edge loss: the Laplacian pyramid's zero-inserting upsample without its x4 gain",
      [("flaxrestore/losses.py",
        "up = jnp.zeros_like(filtered).at[:, ::2, ::2, :].set(filtered[:, ::2, ::2, :] * 4)",
        "up = jnp.zeros_like(filtered).at[:, ::2, ::2, :].set(filtered[:, ::2, ::2, :])")],
      ["tests/test_mprnet.py::test_edge_loss[shape0]"]),
    M("train-loss-term-weight-ignored", "train",
      "the trainer adds each loss term unweighted (MPRNet's 0.05 edge, DarkIR's 50 Laplacian ...)",
      [("train/step.py", "            total = total + t.weight * value",
        "            total = total + value")],
      ["tests/test_train_recipes.py::test_mprnet_losses[mprnet_deblurring]"]),
    M("train-contrastive-positive-negative-swapped", "train",
      "the trainer's contrastive term gets the hazy input as positive and the clear image as "
      "negative",
      [("train/step.py", "p, g, lq, vgg, **kw), True", "p, lq, g, vgg, **kw), True")],
      ["tests/test_train_recipes.py::test_aecrnet_loss"]),
    # -------------------------------------------------- data: augmentations of pairs
    M("data-augment-input-only", "data",
      "the geometric augmentation applied to the degraded input only (the target not flipped)",
      [("train/data/transforms.py", "        return {k: apply_ops(v, ops) for k, v in sample.items()}",
        '        return {k: apply_ops(v, ops) if k == "lq" else v for k, v in sample.items()}')],
      ["tests/test_data.py::test_augment_applied_identically"]),
    M("data-augment-drawn-per-image", "data",
      "a fresh random augmentation drawn for each image of the pair instead of one for both",
      [("train/data/transforms.py",
        "        ops = transform_ops(self.mode, rng)\n"
        "        return {k: apply_ops(v, ops) for k, v in sample.items()}",
        "        return {k: apply_ops(v, transform_ops(self.mode, rng)) for k, v in sample.items()}")],
      ["tests/test_data.py::test_augment_applied_identically"]),
    M("data-rot90-clockwise", "data",
      "augmentation rotations clockwise (rot90 over axes (1, 0)) where the recipes' torch.rot90 "
      "/ np.rot90 turn counter-clockwise",
      [("train/data/transforms.py", "img = np.rot90(img, op[1], axes=(0, 1))",
        "img = np.rot90(img, op[1], axes=(1, 0))")],
      ["tests/test_data.py::test_augment_tables"]),
    # ------------------------------------------------------------- EMA, clipping, bfloat16
    M("train-ema-decay-swapped", "train",
      "EMA update with its weights swapped: 0.1 x the average + 0.9 x the new weights",
      [("train/step.py",
        "ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)",
        "ema = jax.tree.map(lambda e, p: (1.0 - ema_decay) * e + ema_decay * p, ema, params)")],
      ["tests/test_train_step.py::test_ema_follows_the_weights_after_the_update"]),
    M("train-ema-of-weights-before-update", "train",
      "EMA updated with the weights before this step's update (one step behind)",
      [("train/step.py",
        "ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)",
        'ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema,\n'
        '                               state["params"])')],
      ["tests/test_train_step.py::test_ema_follows_the_weights_after_the_update"]),
    M("train-clip-without-eps", "train",
      "clipping scale max_norm / norm as optax.clip_by_global_norm, without clip_grad_norm_'s "
      "+ 1e-6 (it matters at Restormer's max_norm 0.01)",
      [("train/schedules.py", "scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))",
        "scale = jnp.minimum(1.0, max_norm / norm)")],
      ["tests/test_schedules.py::test_clip_grad_norm_matches_torch_on_several_tensors[cpu-lowering-0.001]"]),
    M("train-clip-per-tensor", "train",
      "gradient clipping by each tensor's own norm instead of one global norm over all of them",
      [("train/schedules.py",
        "        norm = global_norm(updates)\n"
        "        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))\n"
        "        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state",
        "        def clip(g):  # each tensor by its own norm\n"
        "            scale = jnp.minimum(1.0, max_norm / (global_norm(g) + 1e-6))\n"
        "            return (g * scale).astype(g.dtype)\n\n"
        "        return jax.tree.map(clip, updates), state")],
      ["tests/test_schedules.py::test_clip_grad_norm_matches_torch_on_several_tensors[cpu-lowering-0.001]"]),
    M("train-clip-after-adam", "train",
      "clipping placed after Adam in the optax chain: it clips Adam's direction, not the raw "
      "gradient (clip_grad_norm_ runs before optimizer.step())",
      [("train/schedules.py",
        "    if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:\n"
        "        parts.append(clip_grad_norm_torch(cfg.grad_clip_norm))\n"
        "    if cfg.name == \"adam\":",
        "    if cfg.name == \"adam\":"),
       ("train/schedules.py", "    parts.append(optax.scale_by_learning_rate(sched))",
        "    if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:\n"
        "        parts.append(clip_grad_norm_torch(cfg.grad_clip_norm))\n"
        "    parts.append(optax.scale_by_learning_rate(sched))")],
      ["tests/test_schedules.py::test_optimizer_matches_torch[adamw-0.0001-0.01]"]),
    M("layers-add-bias-in-bfloat16", "train",
      "the bias added in the activation's dtype: in bfloat16 its gradient, a sum over every "
      "batch and pixel position, is accumulated in bfloat16 and stalls",
      [(L, "    if y.dtype == jnp.float32:\n        return y + bias.astype(y.dtype)\n"
           "    return (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(y.dtype)",
        "    return y + bias.astype(y.dtype)")],
      ["tests/test_layers.py::test_add_bias_sums_a_bfloat16_gradient_in_float32"]),
    M("layers-layernorm-bfloat16-statistics", "train",
      "ChannelLayerNorm computes mean and variance in the input's dtype: bfloat16 statistics "
      "of a residual stream with a large offset",
      [(L, "        x = x.astype(jnp.float32)\n        mu = jnp.mean(x, axis=-1, keepdims=True)",
        "        mu = jnp.mean(x, axis=-1, keepdims=True)")],
      ["tests/test_layers.py::test_channel_layer_norm_of_bfloat16_computes_its_statistics_in_float32"]),
]


# --------------------------------------------------------------------------------------------
# checks of the catalogue itself


def catalogue_problems(catalogue: list[Mistake]) -> list[str]:
    """What is wrong with the catalogue's entries, independently of any tree: duplicate names,
    unknown families, accelerator-path mistakes judged by nodes that do not run that path, and
    XLA:CPU mistakes judged by nodes that never run the CPU lowering."""
    problems = []
    names = [m.name for m in catalogue]
    for n in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"duplicate mistake name {n!r}")
    for m in catalogue:
        if m.family not in FAMILIES:
            problems.append(f"{m.name}: unknown family {m.family!r} (one of {', '.join(FAMILIES)})")
        if not m.tests:
            problems.append(f"{m.name}: no test nodes")
        for t in m.tests:
            if m.family == "accelerator" and not runs_accelerator_path(t):
                problems.append(f"{m.name}: {t} does not run the accelerator path (name an "
                                f"'accelerator-path' parametrisation or a node of "
                                f"{' / '.join(ACCELERATOR_FILES)})")
            if m.family == "xla_cpu" and "accelerator-path" in t:
                problems.append(f"{m.name}: {t} never runs the XLA:CPU lowering")
    return problems


def runs_accelerator_path(node: str) -> bool:
    """Whether a test node executes the code TPUs and GPUs run: an ``accelerator-path``
    parametrisation of a ``both_lowerings`` test, or a test of a file that works in accelerator
    mode throughout (not tests/test_lowering_targets.py: it lowers, it computes no numbers)."""
    return "[accelerator-path" in node or node.split("::")[0] in ACCELERATOR_FILES


# --------------------------------------------------------------------------------------------
# the scratch trees


def _git(*args: str, cwd: str = REPO) -> bytes:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True).stdout


def make_base(dest: str, rev: str | None) -> None:
    """The source tree to mutate: ``rev``'s files (git archive) or the working tree's tracked
    and untracked-not-ignored files, as they are on disk (nothing under .git, nothing ignored)."""
    if rev:
        with tarfile.open(fileobj=io.BytesIO(_git("archive", rev)), mode="r:") as tar:
            tar.extractall(dest, filter="data")
        return
    names = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split(b"\0")
    for raw in names:
        if not raw:
            continue
        rel = raw.decode()
        src = os.path.join(REPO, rel)
        if not os.path.isfile(src):  # deleted in the working tree
            continue
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copy2(src, out)


def patch_problems(root: str, mistake: Mistake) -> list[str]:
    """Why ``mistake``'s patches do not apply to the tree at ``root`` (empty: they all do)."""
    problems = []
    for path, old, new in mistake.patches:
        full = os.path.join(root, path)
        if not os.path.isfile(full):
            problems.append(f"{path}: file not found")
            continue
        with open(full, encoding="utf-8") as f:
            n = f.read().count(old)
        if n != 1:
            problems.append(f"{path}: old text found {n} times (must be exactly once): "
                            f"{old.splitlines()[0].strip()[:70]!r}")
        if old == new:
            problems.append(f"{path}: old and new text are equal")
    return problems


def apply_patches(root: str, mistake: Mistake) -> None:
    for path, old, new in mistake.patches:
        full = os.path.join(root, path)
        with open(full, encoding="utf-8") as f:
            text = f.read()
        os.unlink(full)  # never write through a shared inode
        with open(full, "w", encoding="utf-8") as f:
            f.write(text.replace(old, new, 1))


def _copy_tree(base: str, dest: str) -> None:
    shutil.copytree(base, dest, copy_function=shutil.copy2)


# --------------------------------------------------------------------------------------------
# running pytest, and how each failure happened

# A pytest plugin (written next to the scratch trees, loaded with -p): one JSON line per failed
# test phase or collection, with what was raised and whether it is an assertion of the test.
# An AssertionError counts when the innermost frame that is not an assertion helper (numpy /
# torch testing, pytest) lies in the tree's tests/ directory: an `assert` inside jax or inside
# the project's own code is a crash, not a check that saw a wrong value.
PLUGIN = r'''
import json, os

import pytest

_OUT = os.environ["MUTATE_REPORT"]
_TESTS = os.path.join(os.path.realpath(os.getcwd()), "tests") + os.sep
_HELPERS = (os.sep + "numpy" + os.sep + "testing" + os.sep,
            os.sep + "torch" + os.sep + "testing" + os.sep,
            os.sep + "_pytest" + os.sep, os.sep + "pytest" + os.sep,
            os.sep + "unittest" + os.sep)


def _write(rec):
    with open(_OUT, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def _origin(excinfo):
    """(file:line of the innermost non-helper frame, whether it is in tests/)."""
    for entry in reversed(list(excinfo.traceback)):
        path = os.path.realpath(str(entry.path))
        if any(h in path for h in _HELPERS):
            continue
        where = f"{os.path.relpath(path, os.path.dirname(_TESTS.rstrip(os.sep)))}:{entry.lineno + 1}"
        return where, path.startswith(_TESTS)
    return "?", False


def _message(excinfo):
    text = str(excinfo.value).strip().splitlines()
    return (text[0] if text else "")[:200]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.passed and call.when == "call":
        _write({"node": item.nodeid, "when": "call", "outcome": "passed"})
    if rep.skipped:
        _write({"node": item.nodeid, "when": call.when, "outcome": "skipped"})
    if not rep.failed:
        return
    exc = call.excinfo
    rec = {"node": item.nodeid, "when": call.when, "outcome": "failed", "type": None,
           "assertion": False, "where": "?", "message": ""}
    if exc is not None:
        where, in_tests = _origin(exc)
        rec.update(type=exc.typename, where=where, message=_message(exc),
                   assertion=bool(exc.errisinstance(AssertionError) and in_tests
                                  and call.when == "call"))
    _write(rec)


def pytest_collectreport(report):
    if report.failed:
        text = str(report.longrepr).strip().splitlines()
        _write({"node": report.nodeid or "(collection)", "when": "collect", "outcome": "failed",
                "type": "collection error", "assertion": False, "where": "?",
                "message": (text[-1] if text else "")[:200]})
'''


def write_plugin(directory: str) -> str:
    """Writes the reporting plugin into ``directory`` (put on PYTHONPATH); returns its module name."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "mutate_report.py"), "w", encoding="utf-8") as f:
        f.write(PLUGIN)
    return "mutate_report"


@dataclasses.dataclass
class Run:
    rc: int | None  # None: timed out
    out: str
    seconds: float
    records: list  # the plugin's records, in order


def pytest_env(root: str, plugin_dir: str, report: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "tests"), plugin_dir]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["MUTATE_REPORT"] = report
    env.pop("CI", None)  # a skip is not a failure here: the node must fail on an assertion
    return env


def run_pytest(root: str, tests: list[str], timeout: int, python: str, plugin_dir: str,
               stop_first: bool = True) -> Run:
    fd, report = tempfile.mkstemp(prefix="mutate-report-", suffix=".jsonl")
    os.close(fd)
    cmd = [python, "-m", "pytest", *(["-x"] if stop_first else []), "-q", "-rfE",
           "-p", "no:cacheprovider", "-p", "no:randomly", "-p", "mutate_report", *tests]
    t0 = time.monotonic()
    try:
        try:
            proc = subprocess.run(cmd, cwd=root, env=pytest_env(root, plugin_dir, report),
                                  capture_output=True, text=True, timeout=timeout)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout or b""
            rc, out = None, out.decode(errors="replace") if isinstance(out, bytes) else out
        secs = time.monotonic() - t0
        with open(report, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    finally:
        os.unlink(report)
    return Run(rc, out, secs, records)


@dataclasses.dataclass
class Result:
    mistake: Mistake
    status: str  # CAUGHT SURVIVED CRASHED STALE BROKEN TIMEOUT
    caught_by: str  # the failing node ("-" if none)
    seconds: float
    detail: str = ""  # CAUGHT: where the assertion is; otherwise why it is not CAUGHT


def classify(mistake: Mistake, run: Run) -> Result:
    """CAUGHT only when the first failure is an assertion of a test (see PLUGIN); a failure on
    anything else (an import, collection, a TypeError, an assert inside a library) is CRASHED."""
    failed = [r for r in run.records if r.get("outcome") == "failed"]
    if run.rc is None:
        return Result(mistake, "TIMEOUT", "-", run.seconds, f"after {mistake.timeout} s")
    if failed:
        first = failed[0]
        if first["assertion"]:
            return Result(mistake, "CAUGHT", first["node"], run.seconds,
                          f"AssertionError at {first['where']}")
        return Result(mistake, "CRASHED", first["node"], run.seconds,
                      f"{first['type']} ({first['when']}) at {first['where']}: {first['message']}")
    if run.rc == 0:
        passed = sum(r.get("outcome") == "passed" for r in run.records)
        return Result(mistake, "SURVIVED", "-", run.seconds, f"{passed} test(s) passed")
    tail = " | ".join(run.out.strip().splitlines()[-3:])
    return Result(mistake, "BROKEN", "-", run.seconds, f"pytest exit {run.rc}: {tail}")


def run_one(base: str, mistake: Mistake, python: str, keep: bool, plugin_dir: str) -> Result:
    problems = patch_problems(base, mistake)
    if problems:
        return Result(mistake, "STALE", "-", 0.0, "; ".join(problems))
    work = tempfile.mkdtemp(prefix=f"mutate-{mistake.name}-")
    try:
        root = os.path.join(work, "repo")
        _copy_tree(base, root)
        apply_patches(root, mistake)
        return classify(mistake, run_pytest(root, list(mistake.tests), mistake.timeout, python,
                                            plugin_dir))
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def select(args) -> list[Mistake]:
    chosen = CATALOGUE
    if args.only:
        wanted = [p for o in args.only for p in o.split(",") if p]
        chosen = [m for m in CATALOGUE if any(fnmatch.fnmatch(m.name, w) for w in wanted)]
        unknown = [w for w in wanted if not any(fnmatch.fnmatch(m.name, w) for m in CATALOGUE)]
        if unknown:
            raise SystemExit(f"no mistake matches {unknown}; see --list")
    if args.family:
        chosen = [m for m in chosen if m.family in args.family]
    return chosen


# --------------------------------------------------------------------------------------------
# the machine, its load, the report


class LoadSampler:
    """The 1-minute load average every ``every`` seconds while a run lasts (other people's jobs
    share the machine: the times of a run say little without it)."""

    def __init__(self, every: float = 15.0):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        s = self.samples or [float("nan")]
        return (f"1-minute load average {min(s):.1f}-{max(s):.1f}, mean {sum(s) / len(s):.1f} "
                f"({len(s)} samples)")


def machine() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores{f' ({model})' if model else ''}, {platform.system()}"


def source_description(rev: str | None, overlays: list[str]) -> str:
    head = _git("rev-parse", "--short", "HEAD").decode().strip()
    if rev:
        sha = _git("rev-parse", "--short", rev).decode().strip()
        extra = f" with {', '.join(overlays)} from the working tree" if overlays else ""
        return f"commit {sha} (`--rev {rev}`){extra}"
    dirty = [line for line in _git("status", "--porcelain").decode().splitlines() if line.strip()]
    return (f"the working tree at {head}"
            + (f" ({len(dirty)} paths changed or untracked, others' work in progress)"
               if dirty else " (clean)"))


def table(results: list[Result]) -> str:
    rows = [("mistake", "family", "result", "caught by (first failing node)", "where / why",
             "time")]
    for r in results:
        rows.append((r.mistake.name, r.mistake.family, r.status, r.caught_by,
                     r.detail if r.status in ("CAUGHT", "CRASHED") else (r.detail or "-"),
                     f"{r.seconds:.0f} s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def counts(results: list[Result]) -> str:
    by = {}
    for r in results:
        by[r.status] = by.get(r.status, 0) + 1
    order = ["CAUGHT", "CRASHED", "SURVIVED", "STALE", "BROKEN", "TIMEOUT"]
    return ", ".join(f"{by[s]} {s.lower()}" for s in order if by.get(s))


DOC_INTRO = """\
# Mutation check: porting mistakes the suite must catch

`tools/mutate.py` holds a catalogue of realistic porting mistakes ({n}: {acc} of them in the
accelerator path, the code TPUs and GPUs run). Each mistake is a small text patch applied to a
scratch copy of the repository (the working tree is never written), followed by the narrow
test nodes that must fail on it. It is not part of `make test`.

```
.venv/bin/python tools/mutate.py -j 1        # baseline, then every mistake; exit 1 unless all CAUGHT
.venv/bin/python tools/mutate.py --check     # only: does every patch still apply (seconds)
.venv/bin/python tools/mutate.py --only 'darkir-*' --no-baseline   # a subset (also --family, --list)
.venv/bin/python tools/mutate.py -j 1 --doc docs/mutations.md      # ... and rewrite this page
```

**Baseline first.** By default every test node of the selected mistakes first runs once on the
unmutated copy; a node that fails there would "catch" anything, so a failing baseline stops the
run (`--no-baseline` skips it, for quick iterations on one mistake).

**CAUGHT means an assertion.** A mistake is CAUGHT only when the first failing test fails on an
`AssertionError` raised by the test itself (its `assert`, or `numpy.testing` / `pytest` helpers
it calls; the innermost frame outside those helpers lies in `tests/`). A failure on anything
else (an import or collection error, a `TypeError`, a shape error inside jax, an `assert` inside
a library) is CRASHED: the mutation broke the program instead of computing a wrong number, so it
tests nothing. CRASHED, SURVIVED (the tests passed), STALE (a patch no longer applies exactly
once), BROKEN (node ids not found) and TIMEOUT are failures of the catalogue.

**Every path.** Mistakes of family `accelerator` sit on the `default=` side of a
`lowering.per_platform(cpu=..., default=...)` call (or in library code only that side reaches:
`jax.checkpoint` remat, `reduce_window` pooling, the library conv's padding and layout, the
deformable convolution's gather, the global norm of gradient clipping). They must name nodes
that execute that path: the `accelerator-path` parametrisations of `both_lowerings` tests or
`tests/test_accelerator_path.py` (`tests/test_lowering_targets.py` lowers programs and computes
no numbers); `xla_cpu` mistakes must name nodes that run the CPU lowering. The runner refuses a
catalogue that breaks these rules.

How to add a mistake: see "Adding a mistake" in the module docstring of
[`tools/mutate.py`](../tools/mutate.py); run it with `--only NAME`, then re-run the whole
catalogue with `--doc docs/mutations.md`.

## What it found

- Every `accelerator-path` variant of a `both_lowerings` test ran the CPU lowering: conftest's
  fixture that enters accelerator mode was shadowed by the parametrisation of the same name and
  never ran, so all 11 accelerator mistakes SURVIVED at first. An autouse fixture now enters the
  mode (`tests/test_accelerator_path.py::test_both_lowerings_variants_run_in_their_mode` pins
  it); all 78 such nodes pass on the real accelerator path.
- `snr-layernorm-eps` SURVIVED `test_attention_full_width_with_masks`: on unit-variance tokens
  an eps of 1e-5 instead of 1e-6 moves the output by less than its 1e-5 bound. Caught since by
  `tests/test_snr.py::test_layer_norms_on_low_variance_tokens` (std 1e-3 tokens), with its
  feed-forward twin.
- No narrow test pinned gradient clipping over several tensors (nor its accelerator-path
  global norm), bfloat16's float32 bias-gradient sums and LayerNorm statistics, or the EMA
  update: `tests/test_schedules.py::test_clip_grad_norm_matches_torch_on_several_tensors`,
  `tests/test_layers.py::test_add_bias_sums_a_bfloat16_gradient_in_float32`,
  `tests/test_layers.py::test_channel_layer_norm_of_bfloat16_computes_its_statistics_in_float32`
  and `tests/test_train_step.py::test_ema_follows_the_weights_after_the_update` do now (the EMA
  was checked only inside the 8-device command-line test).
"""


def write_doc(path: str, results: list[Result], header: list[str]) -> None:
    n_acc = sum(m.family == "accelerator" for m in CATALOGUE)
    parts = [DOC_INTRO.format(n=len(CATALOGUE), acc=n_acc), "## Last run", ""]
    parts += [f"- {h}" for h in header]
    parts += ["", "```", table(results), "```", "", "## The mistakes", ""]
    parts += [f"- `{m.name}` ({m.family}): {m.what}" for m in CATALOGUE]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", help="mistake name or glob (repeatable, or a,b)")
    p.add_argument("--family", action="append", help="only this family (repeatable)")
    p.add_argument("--list", action="store_true", help="print the catalogue and exit")
    p.add_argument("--check", action="store_true",
                   help="only verify that every patch applies exactly once; exit 1 if any is stale")
    p.add_argument("-j", "--jobs", type=int, default=1, help="mistakes run at the same time")
    p.add_argument("--rev", help="mutate this commit's files (git archive) instead of the working tree")
    p.add_argument("--overlay", action="append", default=[],
                   help="with --rev: copy this working-tree file over the commit's (repeatable)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the run of every selected test node on the unmutated tree")
    p.add_argument("--doc", metavar="PATH",
                   help="write the run (command, commit, machine load, table) as markdown to PATH")
    p.add_argument("--keep", action="store_true", help="keep the scratch copies (debugging)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs pytest")
    args = p.parse_args(argv)

    bad = catalogue_problems(CATALOGUE)
    if bad:
        print("the catalogue breaks its own rules:\n  " + "\n  ".join(bad))
        return 1
    chosen = select(args)
    if args.list:
        for m in chosen:
            print(f"{m.name}  [{m.family}]  {m.what}\n    tests: {' '.join(m.tests)}")
        n_acc = sum(m.family == "accelerator" for m in chosen)
        print(f"{len(chosen)} mistakes ({n_acc} in the accelerator path)")
        return 0

    interpreter = os.path.relpath(args.python, REPO) if args.python.startswith(REPO) else "python"
    command = f"{interpreter} tools/mutate.py" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    t0 = time.monotonic()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()
    base_dir = tempfile.mkdtemp(prefix="mutate-base-")
    try:
        base = os.path.join(base_dir, "repo")
        os.makedirs(base)
        make_base(base, args.rev)
        for rel in args.overlay:
            os.makedirs(os.path.dirname(os.path.join(base, rel)) or base, exist_ok=True)
            shutil.copy2(os.path.join(REPO, rel), os.path.join(base, rel))
        if args.check:
            n_bad = 0
            for m in chosen:
                problems = patch_problems(base, m)
                print(f"{'ok   ' if not problems else 'STALE'} {m.name}"
                      + ("".join(f"\n      {q}" for q in problems)))
                n_bad += bool(problems)
            print(f"{len(chosen) - n_bad}/{len(chosen)} apply")
            return 1 if n_bad else 0
        plugin_dir = os.path.join(base_dir, "plugin")
        write_plugin(plugin_dir)
        header = [f"Command: `{command}` (niceness {os.nice(0)}), started {started}",
                  f"Source: {source_description(args.rev, args.overlay)}",
                  f"Machine: {machine()}; load average at the start "
                  f"{load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f} (1 / 5 / 15 min)"]
        with LoadSampler() as load:
            if not args.no_baseline:
                nodes = list(dict.fromkeys(t for m in chosen for t in m.tests))
                print(f"baseline: {len(nodes)} test nodes on the unmutated tree ...", flush=True)
                run = run_pytest(base, nodes, 3600, args.python, plugin_dir, stop_first=False)
                failed = [r for r in run.records if r.get("outcome") == "failed"]
                skipped = [r["node"] for r in run.records if r.get("outcome") == "skipped"]
                if skipped:  # a node that skips catches nothing
                    print("baseline: these nodes SKIP (they would let any mistake survive):\n  "
                          + "\n  ".join(skipped))
                if run.rc != 0 or failed or skipped:
                    print(run.out[-4000:])
                    for r in failed:
                        print(f"  {r['node']} ({r['when']}): {r['type']} at {r['where']}: "
                              f"{r['message']}")
                    print(f"baseline FAILED (pytest exit {run.rc}, {run.seconds:.0f} s): these "
                          f"nodes fail without any mistake; fix them (or mutate a committed tree "
                          f"with --rev HEAD) first")
                    return 1
                passed = sum(r.get("outcome") == "passed" for r in run.records)
                print(f"baseline: {passed} nodes passed in {run.seconds:.0f} s", flush=True)
                header.append(f"Baseline: all {passed} test nodes passed on the unmutated tree "
                              f"({run.seconds / 60:.1f} min)")
            else:
                header.append("Baseline: skipped (`--no-baseline`)")
            results: list[Result] = []
            with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                futures = {pool.submit(run_one, base, m, args.python, args.keep, plugin_dir): m
                           for m in chosen}
                for fut in cf.as_completed(futures):
                    r = fut.result()
                    results.append(r)
                    print(f"{r.status:8s} {r.mistake.name}  {r.caught_by}  {r.seconds:.0f} s"
                          + (f"  ({r.detail})" if r.detail else ""), flush=True)
        order = {m.name: i for i, m in enumerate(CATALOGUE)}
        results.sort(key=lambda r: order[r.mistake.name])
        total = time.monotonic() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_min = ((cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)) / 60
        n_acc = sum(r.mistake.family == "accelerator" for r in results)
        acc_caught = sum(r.mistake.family == "accelerator" and r.status == "CAUGHT"
                         for r in results)
        summary = (f"{counts(results)} of {len(results)} mistakes ({acc_caught}/{n_acc} of the "
                   f"accelerator path caught); {total / 60:.1f} min wall, {cpu_min:.1f} CPU-min "
                   f"in the test processes, {args.jobs} at a time")
        header += [f"Load while it ran: {load.summary()}", f"Result: {summary}"]
        print()
        print(table(results))
        print()
        print(summary)
        print(load.summary())
        if args.doc:
            write_doc(args.doc, results, header)
            print(f"wrote {args.doc}")
        return 0 if all(r.status == "CAUGHT" for r in results) else 1
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
