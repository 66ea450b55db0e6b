"""Mutation check of the equivalence suite: a catalogue of realistic porting mistakes, each
applied to a scratch copy of the repository, with the narrow tests that must fail on it.

    python tools/mutate.py              # every mistake, -j 1; table, exit 1 if any survives
    python tools/mutate.py -j 2         # two mistakes at a time
    python tools/mutate.py --only restormer-gdfn-gelu-wrong-half --only snr-mask-fill-zero
    python tools/mutate.py --family darkir
    python tools/mutate.py --list       # the catalogue: name, family, tests
    python tools/mutate.py --check      # only verify that every patch still applies (seconds)
    python tools/mutate.py --rev HEAD   # mutate a committed tree instead of the working tree
    python tools/mutate.py --rev HEAD --overlay tests/test_x.py   # ... with a file from the tree

What it does, per mistake: copy the source tree (by default the working tree's tracked and
untracked-but-not-ignored files; with ``--rev`` the files of that commit, via ``git archive``)
into a temporary directory, replace each patch's ``old`` text by its ``new`` text there (each
``old`` must occur exactly once in its file, otherwise the mistake is reported STALE, a failure
of the catalogue, not skipped), and run ``python -m pytest -x -q -p no:cacheprovider TESTS``
in that copy with ``PYTHONPATH`` pointing at it. The working tree is never written. A mistake is
CAUGHT when pytest reports a failing test (exit status 1); the table names the first failing
node and what it raised (AssertionError: a wrong value, the evidence wanted; anything else: the
mutation crashed). SURVIVED (the tests passed), STALE (a patch does not apply), BROKEN (the
tests could not be collected or were not found: exit 2-5, i.e. the mutation or the node ids are
wrong) and TIMEOUT are failures; the exit status is 1 when any mistake ends in one of them.

``--baseline`` first runs every test node of the selected mistakes once on the unmutated copy:
a node that already fails there would "catch" anything, so a failing baseline stops the run.

Adding a mistake
----------------
Append a :class:`Mistake` to ``CATALOGUE``::

    Mistake(
        "family-short-name",                        # unique, kebab-case
        "family",                                   # restormer|mprnet|darkir|snr|aecrnet|xla_cpu|restore|converter|train
        "what a porter might plausibly get wrong, in one line",
        [("path/from/repo/root.py", "exact old text", "new text")],   # one or more patches
        ["tests/test_x.py::test_node[param]"],      # the narrowest nodes that must catch it
    )

* ``old`` must be unique in its file: include enough surrounding text (a whole line, its
  neighbours) to make it so; ``python tools/mutate.py --check`` says at once if it is not.
* The new code must still import and run: the mistake is a wrong number, not a crash. A mistake
  that raises is still reported CAUGHT if a test fails on it, so prefer mistakes that compute
  quietly wrong values (swapped halves, wrong axis, wrong constant, wrong sign).
* Choose test nodes as narrow as will catch it (a block test before a network test), and check
  with ``--only NAME`` that it is CAUGHT and how long it takes; the whole catalogue must stay
  under 30 minutes on 2 cores. Then add its row to docs/mutations.md.
* Prefer targets that are not platform lowerings: the torch-semantics code in models/,
  porting/, losses, schedules and the torch-semantics primitives of flaxrestore/layers.py. A
  mistake in flaxrestore/xla_cpu/ (family ``xla_cpu``) must name a ``cpu-lowering`` node or a
  test that runs the CPU lowering (the ``accelerator-path`` nodes never execute it).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import fnmatch
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mistake:
    name: str
    family: str
    what: str
    patches: list  # [(path, old, new), ...]
    tests: list  # pytest node ids (or files)
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
]


# --------------------------------------------------------------------------------------------


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


@dataclasses.dataclass
class Result:
    mistake: Mistake
    status: str  # CAUGHT SURVIVED STALE BROKEN TIMEOUT
    caught_by: str
    seconds: float
    detail: str = ""


_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)
# the last line of a failure's traceback, "path.py:LINE: ExceptionType" (the short summary's
# message is cut to the terminal's width)
_RAISED = re.compile(r"^\S+\.py:\d+: ([\w.]+)\s*$", re.M)


def pytest_env(root: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "tests")]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_pytest(root: str, tests: list[str], timeout: int, python: str):
    cmd = [python, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", "-p",
           "no:randomly", *tests]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=root, env=pytest_env(root), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        return None, out, time.monotonic() - t0
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def run_one(base: str, mistake: Mistake, python: str, keep: bool) -> Result:
    problems = patch_problems(base, mistake)
    if problems:
        return Result(mistake, "STALE", "-", 0.0, "; ".join(problems))
    work = tempfile.mkdtemp(prefix=f"mutate-{mistake.name}-")
    try:
        root = os.path.join(work, "repo")
        _copy_tree(base, root)
        apply_patches(root, mistake)
        rc, out, secs = run_pytest(root, list(mistake.tests), mistake.timeout, python)
        if rc is None:
            return Result(mistake, "TIMEOUT", "-", secs, f"after {mistake.timeout} s")
        if rc == 1:
            m = _FAILED.search(out)
            # how it failed: AssertionError (a wrong value) is the evidence wanted; an exception
            # means the mistake crashed, which the catalogue should avoid
            raised = _RAISED.search(out)
            how = raised.group(1).rsplit(".", 1)[-1] if raised else "?"
            return Result(mistake, "CAUGHT", m.group(1) if m else "(a test failed)", secs, how)
        if rc == 0:
            return Result(mistake, "SURVIVED", "-", secs, out.strip().splitlines()[-1] if out.strip() else "")
        tail = " | ".join(out.strip().splitlines()[-3:])
        return Result(mistake, "BROKEN", "-", secs, f"pytest exit {rc}: {tail}")
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def select(args) -> list[Mistake]:
    names = [m.name for m in CATALOGUE]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise SystemExit(f"duplicate mistake names: {sorted(dupes)}")
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


def table(results: list[Result], total: float) -> str:
    rows = [("mistake", "family", "result", "caught by", "failure", "time")]
    for r in results:
        rows.append((r.mistake.name, r.mistake.family, r.status, r.caught_by,
                     r.detail if r.status == "CAUGHT" else "-", f"{r.seconds:.0f} s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n_caught = sum(r.status == "CAUGHT" for r in results)
    lines.append(f"\n{n_caught}/{len(results)} caught; wall time {total / 60:.1f} min")
    for r in results:
        if r.status != "CAUGHT" and r.detail:
            lines.append(f"{r.status} {r.mistake.name}: {r.detail}")
    return "\n".join(lines)


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
    p.add_argument("--baseline", action="store_true",
                   help="first run every selected test node on the unmutated tree")
    p.add_argument("--keep", action="store_true", help="keep the scratch copies (debugging)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs pytest")
    args = p.parse_args(argv)

    chosen = select(args)
    if args.list:
        for m in chosen:
            print(f"{m.name}  [{m.family}]  {m.what}\n    tests: {' '.join(m.tests)}")
        print(f"{len(chosen)} mistakes")
        return 0

    t0 = time.monotonic()
    base_dir = tempfile.mkdtemp(prefix="mutate-base-")
    try:
        base = os.path.join(base_dir, "repo")
        os.makedirs(base)
        make_base(base, args.rev)
        for rel in args.overlay:
            os.makedirs(os.path.dirname(os.path.join(base, rel)) or base, exist_ok=True)
            shutil.copy2(os.path.join(REPO, rel), os.path.join(base, rel))
        if args.check:
            bad = 0
            for m in chosen:
                problems = patch_problems(base, m)
                print(f"{'ok   ' if not problems else 'STALE'} {m.name}"
                      + ("".join(f"\n      {q}" for q in problems)))
                bad += bool(problems)
            print(f"{len(chosen) - bad}/{len(chosen)} apply")
            return 1 if bad else 0
        if args.baseline:
            nodes = sorted({t for m in chosen for t in m.tests})
            print(f"baseline: {len(nodes)} test nodes on the unmutated tree ...", flush=True)
            rc, out, secs = run_pytest(base, nodes, 1800, args.python)
            if rc != 0:
                print(out[-4000:])
                print(f"baseline FAILED (pytest exit {rc}, {secs:.0f} s): fix the tests first")
                return 1
            print(f"baseline passed in {secs:.0f} s", flush=True)
        results: list[Result] = []
        with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(run_one, base, m, args.python, args.keep): m for m in chosen}
            for fut in cf.as_completed(futures):
                r = fut.result()
                results.append(r)
                print(f"{r.status:8s} {r.mistake.name}  {r.caught_by}  {r.seconds:.0f} s"
                      + (f"  ({r.detail})" if r.detail else ""),
                      flush=True)
        order = {m.name: i for i, m in enumerate(CATALOGUE)}
        results.sort(key=lambda r: order[r.mistake.name])
        print()
        print(table(results, time.monotonic() - t0))
        return 0 if all(r.status == "CAUGHT" for r in results) else 1
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
