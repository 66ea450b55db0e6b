"""Golden files written by the ORIGINAL code of each family, for tests/test_goldens.py.

    .venv/bin/python tools/make_goldens.py --official DIR [--out tests/goldens] [--only CASE ...]
                                           [--commit REPO=SHA ...]

``DIR`` holds local checkouts of the original repositories, one folder per repository, named as
the repository: ``DIR/Restormer`` (swz30/Restormer), ``DIR/MPRNet`` (swz30/MPRNet), ``DIR/DarkIR``
(cidautai/DarkIR), ``DIR/SNR-Aware-Low-Light-Enhance`` (dvlab-research/SNR-Aware-Low-Light-Enhance)
and ``DIR/AECR-Net`` (GlassyWu/AECR-Net). A ``git clone`` or an extracted ``git archive`` both do;
the commit is read with ``git rev-parse HEAD`` or given with ``--commit AECR-Net=d046d0f...``.
Whoever runs the tool fetches them; nothing of them is copied into the project: their network
modules are imported from ``DIR`` at run time, and what this tool writes is numbers.

``porting/reference/`` is the project's own rewrite of the five networks; these files are what
makes a misreading shared by that rewrite and the Flax port visible.

For every case below (each released variant's STRUCTURE: Restormer's channel counts, dual-pixel
skip and LayerNorm flavours, the three MPRNet task folders, DarkIR m and l, SNR-Aware, AECR-Net in
eval and train mode) the tool

1. builds the official network class from ``DIR`` at reduced widths and one block per stage
   where the constructor takes block counts (the released structure otherwise; one compiled
   Flax program per case costs seconds), with torch's default initialisation after
   ``torch.manual_seed(seed)``, then
   randomises every constant tensor (norm weights of ones, zero biases and gammas, temperatures,
   PReLU slopes, mix weights; zero-initialised weight matrices get torch's default conv init) and
   every floating buffer, so that a transposed or swapped parameter cannot hide behind a uniform
   value;
2. saves the weights in the container of the released files (``<case>.pth``: Restormer and DarkIR
   ``{'params': sd}``, MPRNet ``{'state_dict': sd}``, SNR-Aware a bare state dict, AECR-Net
   ``{'model': sd, 'epoch': ..., ...}`` with the release's ``mix4``/``mix5`` names);
3. runs it in float64 and in float32 (the float32 weights cast exactly) on the same input, computes
   the fixed loss ``sum_i mean(output_i * w_i)`` (``w_i`` stored) and its gradients, and writes
   ``<case>.safetensors``: the inputs, loss weights, every output and the gradient for every
   input in float64 and float32, the selected parameters' gradients in float64, and for each of
   them ``.../err32``: torch float32's own max |error| against float64, the largest over the run
   on the input and two runs on the input nudged by one float32 step per pixel (one run can be
   right by luck on a sum of cancelling terms). Arrays are in torch's layout (NCHW). The file's
   metadata names the original repository and commit;
4. writes ``manifest.json``: repositories and commits, and per case the original class and its
   constructor keywords (which are the Flax config's fields), the registry name, the released
   variants it stands for, the call, the shims and stand-ins (``SHIMS``).

Shims, all applied at run time to the imported modules (the checkouts are never edited):

* Restormer, MPRNet: none. MPRNet's three task folders hold one file each named ``MPRNet.py``;
  each is imported under its own module name.
* DarkIR: ``archs/__init__.py`` imports ptflops (a FLOP counter, not installed); ``DarkIR.py`` and
  ``arch_model.py`` are imported from ``archs/`` directly, which their own ``try`` imports allow.
  ``LayerNormFunction.backward`` reads ``ctx.saved_variables``, an alias of ``saved_tensors``
  that torch 2 removed: the alias is put back on torch's backward context class.
* SNR-Aware: ``low_light_transformer.py`` imports cv2 without using it: an empty stub module.
  Its forward moves a grid it never uses to the GPU with ``.cuda()``: ``Tensor.cuda`` returns the
  tensor itself while the network runs. The class hard-codes the transformer (model width 1024,
  FFN 2048, 8 heads of 64) and the decoder (64 channels), which only fit ``nf = 64`` and would
  make a 150 MB file: every such number is scaled by ``nf / 64`` (transformer built by the
  original ``Encoder_patch66`` with d_model 16*nf, d_inner 32*nf, d_k = d_v = nf; ``upconv2``,
  ``HRconv`` and ``conv_last`` rebuilt as the original's ``nn.Conv2d`` with nf for 64), as the
  Flax port and porting/reference do. The tool checks that at nf = 64 the scaled network's
  state_dict is key for key and shape for shape the unscaled original's.
* AECR-Net: ``models/DCNv2.zip`` (CharlesShang/DCNv2, a CUDA extension) is missing from the
  repository: :class:`DCN` below is a STAND-IN with the DCNv2 ``DCN`` interface and key names
  (``weight``, ``bias``, ``conv_offset_mask``), its sampling written with plain torch ops
  (bilinear, DCNv2's zero-outside rule); everything else is the original code. ``DCNBlock``
  calls ``.cuda()``: the stand-in stays on the CPU. ``Dehaze`` hard-codes the DCN to 256 channels
  (only ngf = 64 runs): ``dcn_block`` is rebuilt as the original ``DCNBlock(4*ngf, 4*ngf)``,
  checked like SNR-Aware's at ngf = 64. ``FastDeconv`` uses a deprecated ``torch.addmm``
  overload that torch 2.13 still accepts (its warning is silenced). The released file names the
  mixes ``mix4``/``mix5`` where the published code says ``mix1``/``mix2``: the weights are saved
  under the release's names, gradients too.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import types
import warnings
import zlib

import numpy as np

REPOS = {
    "Restormer": "https://github.com/swz30/Restormer",
    "MPRNet": "https://github.com/swz30/MPRNet",
    "DarkIR": "https://github.com/cidautai/DarkIR",
    "SNR-Aware-Low-Light-Enhance": "https://github.com/dvlab-research/SNR-Aware-Low-Light-Enhance",
    "AECR-Net": "https://github.com/GlassyWu/AECR-Net",
}

# float32 runs on the input nudged by one float32 step per pixel, besides the run on the input
NUDGES = 2


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    repo: str
    source: str  # the file the class comes from, inside the repository
    cls: str
    kwargs: dict  # the original constructor's keywords (= the Flax config's fields)
    registry: str  # the flaxrestore name whose family/variant this is
    covers: tuple  # released variants with this structure
    shape: tuple  # (batch, height, width) of the image input
    train: bool = False  # module.train() (AECR-Net's FastDeconv uses batch statistics)
    call: dict = dataclasses.field(default_factory=dict)  # keywords of the forward call
    grads: tuple = ()  # parameter gradients stored besides the automatic selection (see _select)
    seed: int = 0  # torch.manual_seed before the build; the weights' randomisation
    weights: str = ""  # the weights file's stem, when cases share one (default: the case name)
    notes: str = ""


_RESTORMER_SMALL = dict(dim=4, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                        heads=[1, 2, 4, 8], ffn_expansion_factor=2.66, bias=False)
_RESTORMER = "basicsr/models/archs/restormer_arch.py"
_DARKIR = "archs/DarkIR.py"
_DARKIR_COMMON = dict(img_channel=3, dilations=[1, 4, 9], extra_depth_wise=True,
                      middle_blk_num_enc=1, middle_blk_num_dec=1, enc_blk_nums=[1, 1, 1],
                      dec_blk_nums=[1, 1, 1])
# reduction 2 (released: 4) keeps two or more channels in every channel-attention squeeze, where
# a single ReLU channel can be dead for a whole batch and zero a gradient
_MPRNET_SMALL = dict(in_c=3, out_c=3, n_feat=6, scale_unetfeats=3, scale_orsnetfeats=2,
                     num_cab=1, kernel_size=3, reduction=2, bias=False)

CASES = [
    Case("restormer_withbias", "Restormer", _RESTORMER, "Restormer",
         dict(inp_channels=3, out_channels=3, **_RESTORMER_SMALL, LayerNorm_type="WithBias",
              dual_pixel_task=False),
         "restormer:motion_deblurring",
         ("restormer:motion_deblurring", "restormer:single_image_defocus_deblurring",
          "restormer:deraining"), (2, 16, 24),
         grads=("encoder_level1.0.attn.temperature", "output.weight")),
    Case("restormer_dual_pixel", "Restormer", _RESTORMER, "Restormer",
         dict(inp_channels=6, out_channels=3, **_RESTORMER_SMALL, LayerNorm_type="WithBias",
              dual_pixel_task=True),
         "restormer:dual_pixel_defocus_deblurring",
         ("restormer:dual_pixel_defocus_deblurring",), (2, 16, 16), seed=1,
         grads=("skip_conv.weight", "patch_embed.proj.weight")),
    Case("restormer_biasfree", "Restormer", _RESTORMER, "Restormer",
         dict(inp_channels=3, out_channels=3, **_RESTORMER_SMALL, LayerNorm_type="BiasFree",
              dual_pixel_task=False),
         "restormer:real_denoising",
         ("restormer:gaussian_color_denoising", "restormer:real_denoising"), (2, 24, 16), seed=2,
         grads=("latent.0.attn.qkv_dwconv.weight", "output.weight")),
    Case("restormer_gray", "Restormer", _RESTORMER, "Restormer",
         dict(inp_channels=1, out_channels=1, **_RESTORMER_SMALL, LayerNorm_type="BiasFree",
              dual_pixel_task=False),
         "restormer:gaussian_gray_denoising", ("restormer:gaussian_gray_denoising",),
         (2, 16, 16), seed=3, grads=("patch_embed.proj.weight", "output.weight")),
    # the three task folders differ only in their default widths: one reduced width for all
    # three (one compiled program in the tests), each built from its own folder's file; seeds
    # where no channel-attention squeeze (bias-free, 3 ReLU channels) is dead for the batch
    Case("mprnet_deblurring", "MPRNet", "Deblurring/MPRNet.py", "MPRNet", _MPRNET_SMALL,
         "mprnet:deblurring", ("mprnet:deblurring",), (2, 16, 24), seed=16,
         grads=("shallow_feat1.0.weight", "tail.weight", "sam23.conv3.weight")),
    Case("mprnet_deraining", "MPRNet", "Deraining/MPRNet.py", "MPRNet", _MPRNET_SMALL,
         "mprnet:deraining", ("mprnet:deraining",), (2, 16, 24), seed=50,
         grads=("shallow_feat3.0.weight", "tail.weight", "sam12.conv1.weight")),
    Case("mprnet_denoising", "MPRNet", "Denoising/MPRNet.py", "MPRNet", _MPRNET_SMALL,
         "mprnet:denoising", ("mprnet:denoising",), (2, 16, 24), seed=70,
         grads=("shallow_feat2.0.weight", "tail.weight", "concat23.weight")),
    Case("darkir_m", "DarkIR", _DARKIR, "DarkIR",
         dict(**_DARKIR_COMMON, width=4),
         "darkir:m", ("darkir:m",), (1, 20, 28), call={"side_loss": True}, seed=7,
         grads=("intro.weight", "ending.weight", "side_out.weight",
                "encoders.0.modules_list.0.freq.process1.0.weight"),
         notes="width 4 (m: 32), one block per stage (m and l have the released [1, 2, 3], 2, "
               "2, [3, 1, 1]: repeats of the same blocks); H, W not multiples of 8, so the "
               "network's own zero padding runs; side_loss=True (the training call) gives "
               "(side output, image)"),
    Case("darkir_l", "DarkIR", _DARKIR, "DarkIR",
         dict(**_DARKIR_COMMON, width=8),
         "darkir:l", ("darkir:l",), (2, 13, 19), call={"side_loss": True}, seed=8,
         grads=("intro.weight", "ending.weight", "side_out.weight"),
         notes="twice darkir_m's width, as l is twice m's (64 vs 32); side_loss=True"),
    Case("snr", "SNR-Aware-Low-Light-Enhance", "models/archs/low_light_transformer.py",
         "low_light_transformer",
         dict(nf=4, nframes=5, groups=8, front_RBs=1, back_RBs=1, center=None, predeblur=True,
              HR_in=True, w_TSA=True),
         "snr", ("snr",), (2, 32, 32), seed=9,
         grads=("conv_first_1.weight", "conv_last.weight",
                "transformer.layer_stack.0.slf_attn.w_qs.weight",
                "transformer.layer_stack.5.pos_ffn.w_1.bias"),
         notes="the released config (front_RBs 1, back_RBs 1, predeblur, HR_in) at nf 4 with "
               "the hard-coded widths scaled by nf/64 (shim); inputs (image, SNR map), the map "
               "made of 16x16 blocks well away from the 0.5 threshold"),
    Case("aecrnet_eval", "AECR-Net", "models/AECRNet.py", "Dehaze",
         dict(input_nc=3, output_nc=3, ngf=8),
         "aecrnet", ("aecrnet",), (2, 24, 24), seed=10, weights="aecrnet",
         grads=("deconv.weight", "down1.1.weight", "dcn_block.dcn.weight",
                "dcn_block.dcn.conv_offset_mask.weight", "up1.0.weight", "up3.1.weight"),
         notes="eval mode, as the official test loop (FastDeconv uses its running buffers, "
               "randomised); DCN: STAND-IN (see the tool's docstring); DCN width 4*ngf (shim)"),
    Case("aecrnet_train", "AECR-Net", "models/AECRNet.py", "Dehaze",
         dict(input_nc=3, output_nc=3, ngf=8),
         "aecrnet", ("aecrnet",), (2, 24, 24), train=True, seed=10, weights="aecrnet",
         grads=("deconv.weight", "down1.1.weight", "dcn_block.dcn.weight",
                "dcn_block.dcn.conv_offset_mask.weight", "up2.0.weight", "up3.1.weight"),
         notes="the weights of aecrnet_eval; train mode: FastDeconv whitens with the batch's "
               "statistics (Newton-Schulz) and updates its running buffers, stored after the "
               "call as buffer_after/...; DCN: STAND-IN; DCN width 4*ngf (shim)"),
]

# what ran differently from the checkout, per repository (recorded in each golden's metadata)
SHIMS = {
    "Restormer": [],
    "MPRNet": ["each task folder's MPRNet.py imported under its own module name"],
    "DarkIR": ["archs/DarkIR.py imported without the archs package (its __init__ imports "
               "ptflops)", "ctx.saved_variables (removed in torch 2) aliased to saved_tensors"],
    "SNR-Aware-Low-Light-Enhance": [
        "cv2 (imported, unused) stubbed", "Tensor.cuda a no-op during the call (an unused grid)",
        "hard-coded widths scaled by nf/64: Encoder_patch66(d_model 16*nf, d_inner 32*nf, "
        "d_k = d_v = nf), upconv2/HRconv/conv_last rebuilt with nf for 64 (the released "
        "structure at nf = 64, checked)"],
    "AECR-Net": [
        "DCN: pure-torch STAND-IN for CharlesShang/DCNv2's DCN (the extension is missing from "
        "the repository)", "dcn_block rebuilt as DCNBlock(4*ngf, 4*ngf) for the hard-coded "
        "256 (the released structure at ngf = 64, checked)",
        "mix1/mix2 saved as the release's mix4/mix5"],
}

# the container each family's released files use (porting/reference/*.py RELEASE_KEY)
CONTAINERS = {"Restormer": "params", "MPRNet": "state_dict", "DarkIR": "params",
              "SNR-Aware-Low-Light-Enhance": None, "AECR-Net": "model"}
# AECR-Net's released files name the mixes as an internal variant of the code did
AECR_RELEASE_NAMES = {"mix1.w": "mix4.w", "mix2.w": "mix5.w"}


# ----------------------------------------------------------------------------- the DCN stand-in

def _make_dcn_module():
    """A module ``DCNv2.dcn_v2`` with classes ``DCNv2`` and ``DCN``: the interface, parameter names
    and initialisation of CharlesShang/DCNv2's Python wrapper, the sampling in plain torch.

    ``DCN(in, out, kernel_size, stride, padding, dilation=1, deformable_groups=1)`` has ``weight``
    (out, in, kh, kw), ``bias`` (out) and ``conv_offset_mask``, an ordinary conv with
    3*G*kh*kw outputs initialised to zero. Its forward splits that conv's output in three
    channel chunks, (o1, o2, m); the offsets are cat(o1, o2), read per deformable group as
    interleaved (dy, dx) pairs per tap k = i*kw + j; the modulation is sigmoid(m), channel k for
    tap k. A tap samples the input bilinearly at (y*s - p + i*d + dy, x*s - p + j*d + dx): zero
    when the point is at or beyond one pixel outside the image, otherwise each of its four integer
    neighbours that lies outside contributes zero.
    """
    import torch
    from torch import nn

    def sample(x, py, px):
        """x (N, C, H, W) at float positions py, px (N, T, Ho, Wo): (N, C, T, Ho, Wo)."""
        n, c, h, w = x.shape
        inside = ((py > -1) & (py < h) & (px > -1) & (px < w)).to(x.dtype)
        y0, x0 = torch.floor(py), torch.floor(px)
        ly, lx = py - y0, px - x0
        y0, x0 = y0.long(), x0.long()
        flat = x.reshape(n, c, h * w)
        total = 0
        for yy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
            for xx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
                ok = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)).to(x.dtype)
                idx = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).reshape(n, 1, -1)
                got = torch.gather(flat, 2, idx.expand(n, c, idx.shape[-1]))
                total = total + got.reshape(n, c, *py.shape[1:]) * (wy * wx * ok * inside)[:, None]
        return total

    def dcn_v2_conv(x, offset, mask, weight, bias, stride, padding, dilation, groups):
        n, c, h, w = x.shape
        o, _, kh, kw = weight.shape
        ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        taps = kh * kw
        base_y = (torch.arange(ho, dtype=x.dtype) * stride[0] - padding[0]).view(1, 1, ho, 1)
        base_x = (torch.arange(wo, dtype=x.dtype) * stride[1] - padding[1]).view(1, 1, 1, wo)
        ki = torch.arange(kh, dtype=x.dtype).repeat_interleave(kw) * dilation[0]
        kj = torch.arange(kw, dtype=x.dtype).repeat(kh) * dilation[1]
        cols = []
        cg = c // groups
        for g in range(groups):
            off = offset[:, g * 2 * taps:(g + 1) * 2 * taps]
            py = base_y + ki.view(1, taps, 1, 1) + off[:, 0::2]
            px = base_x + kj.view(1, taps, 1, 1) + off[:, 1::2]
            m = mask[:, g * taps:(g + 1) * taps]
            cols.append(sample(x[:, g * cg:(g + 1) * cg], py, px) * m[:, None])
        col = torch.cat(cols, 1)  # (N, C, taps, Ho, Wo)
        out = torch.einsum("nctyx,oct->noyx", col, weight.reshape(o, c, taps))
        return out + bias.view(1, o, 1, 1)

    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    class DCNv2(nn.Module):
        def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation=1,
                     deformable_groups=1):
            super().__init__()
            self.in_channels, self.out_channels = in_channels, out_channels
            self.kernel_size, self.stride = pair(kernel_size), pair(stride)
            self.padding, self.dilation = pair(padding), pair(dilation)
            self.deformable_groups = deformable_groups
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
            self.bias = nn.Parameter(torch.empty(out_channels))
            self.reset_parameters()

        def reset_parameters(self):  # DCNv2's: U(-1/sqrt(fan_in), +), bias zero
            bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
            with torch.no_grad():
                self.weight.uniform_(-bound, bound)
                self.bias.zero_()

        def cuda(self, *args, **kwargs):  # the stand-in stays on the CPU
            return self

    class DCN(DCNv2):
        def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation=1,
                     deformable_groups=1):
            super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                             deformable_groups)
            taps = self.kernel_size[0] * self.kernel_size[1]
            self.conv_offset_mask = nn.Conv2d(in_channels, deformable_groups * 3 * taps,
                                              self.kernel_size, self.stride, self.padding,
                                              bias=True)
            with torch.no_grad():
                self.conv_offset_mask.weight.zero_()
                self.conv_offset_mask.bias.zero_()

        def forward(self, x):
            o1, o2, m = torch.chunk(self.conv_offset_mask(x), 3, dim=1)
            return dcn_v2_conv(x, torch.cat((o1, o2), dim=1), torch.sigmoid(m), self.weight,
                               self.bias, self.stride, self.padding, self.dilation,
                               self.deformable_groups)

    mod = types.ModuleType("DCNv2.dcn_v2")
    mod.DCNv2, mod.DCN, mod.dcn_v2_conv = DCNv2, DCN, dcn_v2_conv
    mod.__doc__ = "flaxrestore tools/make_goldens.py: pure-torch STAND-IN for CharlesShang/DCNv2"
    return mod


def check_dcn_stand_in(dcn_mod) -> None:
    """The stand-in against plain convolutions, float64: zero offsets are a conv at half
    strength (sigmoid(0)), an offset of exactly (+1, -1) pixels on every tap is the conv read
    one row down and one column left (zero outside the image), and a fractional offset is the
    blend of the two integer ones."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    d = dcn_mod.DCN(4, 5, (3, 3), 1, 1).double()
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
    want = 0.5 * F.conv2d(x, d.weight, d.bias * 2, padding=1)  # 0.5 * (conv + 2 b) = half conv + b
    got = d(x)
    assert torch.allclose(got, want, atol=1e-12), float((got - want).abs().max())
    taps = 9

    def with_offset(dy, dx):
        off = torch.zeros(2, 2 * taps, 7, 9, dtype=torch.float64)
        off[:, 0::2], off[:, 1::2] = dy, dx
        mask = torch.ones(2, taps, 7, 9, dtype=torch.float64)
        return dcn_mod.dcn_v2_conv(x, off, mask, d.weight, d.bias, (1, 1), (1, 1), (1, 1), 1)

    # tap (i, j) of output (y, x) reads x[y + i - 1 + dy, x + j - 1 + dx], zero outside
    full = F.conv2d(F.pad(x, (2, 2, 2, 2)), d.weight, d.bias)  # full[u, v]: x[u + i - 2, ...]
    want = full[:, :, 2:2 + 7, 0:9]  # u = y + 1 + dy, v = x + 1 + dx
    assert torch.allclose(with_offset(1.0, -1.0), want, atol=1e-12)
    blend = 0.25 * with_offset(1.0, -1.0) + 0.75 * with_offset(0.0, -1.0)
    assert torch.allclose(with_offset(0.25, -1.0), blend, atol=1e-12)


# ----------------------------------------------------------------------------- loading originals

def _load_file(path: pathlib.Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = mod
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def _on_path(*dirs):
    for d in reversed(dirs):
        sys.path.insert(0, str(d))
    try:
        yield
    finally:
        for d in dirs:
            sys.path.remove(str(d))


@contextlib.contextmanager
def _cuda_is_cpu():
    """SNR-Aware's forward calls ``.cuda()`` on a grid it never uses: a no-op while it runs."""
    import torch

    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = saved


@functools.lru_cache(maxsize=None)
def _module(official: str, case_repo: str, source: str):
    """The original module defining a case's class (each file imported once)."""
    root = pathlib.Path(official) / case_repo
    path = root / source
    if not path.exists():
        raise SystemExit(f"{path} not found: is {root} a checkout of {REPOS[case_repo]}?")
    if case_repo == "Restormer":
        return _load_file(path, "official_restormer_arch")
    if case_repo == "MPRNet":
        return _load_file(path, "official_mprnet_" + source.split("/")[0].lower())
    if case_repo == "DarkIR":
        # ctx.saved_variables: removed from torch 2, read by LayerNormFunction.backward
        from torch.autograd.function import BackwardCFunction

        if not hasattr(BackwardCFunction, "saved_variables"):
            BackwardCFunction.saved_variables = property(lambda ctx: ctx.saved_tensors)
        with _on_path(root / "archs"):  # not the package: its __init__ imports ptflops
            return _load_file(path, "official_darkir")
    if case_repo == "SNR-Aware-Low-Light-Enhance":
        sys.modules.setdefault("cv2", types.ModuleType("cv2"))  # imported, never used
        with _on_path(root):
            return importlib.import_module("models.archs.low_light_transformer")
    if case_repo == "AECR-Net":
        dcn = _make_dcn_module()
        check_dcn_stand_in(dcn)
        pkg = types.ModuleType("DCNv2")
        pkg.__path__ = []
        pkg.dcn_v2 = dcn
        sys.modules["DCNv2"], sys.modules["DCNv2.dcn_v2"] = pkg, dcn
        with _on_path(root / "models"):
            return _load_file(path, "official_aecrnet")
    raise KeyError(case_repo)


def _build_raw(official: str, case: Case):
    """The original class built with the case's keywords and the width shims (torch's default
    initialisation)."""
    mod = _module(official, case.repo, case.source)
    cls = getattr(mod, case.cls)
    if case.repo == "SNR-Aware-Low-Light-Enhance":
        return _build_snr(mod, case.kwargs)
    if case.repo == "AECR-Net":
        return _build_aecrnet(mod, case.kwargs)
    return cls(**case.kwargs)


def _build_snr(mod, kwargs):
    """low_light_transformer with its hard-coded widths scaled by nf / 64 (module docstring)."""
    from torch import nn

    nf = kwargs["nf"]
    original = mod.Encoder_patch66

    def scaled_encoder(d_model, d_inner, n_layers, **rest):
        return original(d_model=d_model * nf // 64, d_inner=d_inner * nf // 64, n_layers=n_layers,
                        d_k=64 * nf // 64, d_v=64 * nf // 64, **rest)

    mod.Encoder_patch66 = scaled_encoder
    try:
        net = mod.low_light_transformer(**kwargs)
    finally:
        mod.Encoder_patch66 = original
    # assigning an existing attribute keeps its place in the state_dict order
    net.upconv2 = nn.Conv2d(nf * 2, nf * 4, 3, 1, 1, bias=True)  # 64 * 4 -> nf * 4
    net.HRconv = nn.Conv2d(nf * 2, nf, 3, 1, 1, bias=True)  # 64 * 2, 64 -> nf * 2, nf
    net.conv_last = nn.Conv2d(nf, 3, 3, 1, 1, bias=True)  # 64 -> nf
    return net


def _build_aecrnet(mod, kwargs):
    """Dehaze with its DCN built for 4 * ngf channels instead of the hard-coded 256."""
    ngf = kwargs.get("ngf", 64)
    net = mod.Dehaze(**kwargs)
    net.dcn_block = mod.DCNBlock(4 * ngf, 4 * ngf)
    return net


def check_width_shims(official: str) -> None:
    """At the released width the shimmed SNR-Aware and AECR-Net builds are the originals
    unchanged: same state_dict keys, order and shapes (on the meta device: no memory)."""
    import torch

    for case in CASES:
        if case.repo not in ("SNR-Aware-Low-Light-Enhance", "AECR-Net") or case.train:
            continue
        release = dict(case.kwargs, **({"nf": 64} if "nf" in case.kwargs else {"ngf": 64}))
        mod = _module(official, case.repo, case.source)
        with torch.device("meta"):
            plain = getattr(mod, case.cls)(**release).state_dict()
            shimmed = _build_raw(official, dataclasses.replace(case, kwargs=release)).state_dict()
        got = [(k, tuple(v.shape)) for k, v in shimmed.items()]
        want = [(k, tuple(v.shape)) for k, v in plain.items()]
        if got != want:
            raise AssertionError(f"{case.name}: the width shim changes the released structure")


# ----------------------------------------------------------------------------- weights

def randomise(net, seed: int) -> None:
    """Every constant parameter and every floating buffer given random values, in place.

    A parameter whose entries are all equal (ones, zeros, 0.25, a temperature, a mix weight)
    becomes ``value + 0.3 * N(0, 1)``, except a zero-initialised weight matrix (DCN's offset conv),
    which gets torch's default conv/linear init (kaiming-uniform, a = sqrt(5)) so that the offsets
    it makes stay around a pixel. Floating buffers (AECR-Net's running mean and whitening matrix)
    get ``+ 0.1 * N(0, 1)``.
    """
    import torch

    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            flat = p.reshape(-1)
            if not bool((flat == flat[0]).all()):
                continue
            if name.endswith("weight") and p.dim() >= 2 and bool((flat == 0).all()):
                fan_in = p[0].numel()
                bound = 1.0 / math.sqrt(fan_in)  # = kaiming_uniform_(a=sqrt(5))'s bound
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
            else:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        for _, b in net.named_buffers():
            if b.is_floating_point():
                b.add_(0.1 * torch.randn(b.shape, generator=g))


def release_state(case: Case, state: dict) -> dict:
    """The state dict under the released files' names (AECR-Net's mixes)."""
    if case.repo == "AECR-Net":
        return {AECR_RELEASE_NAMES.get(k, k): v for k, v in state.items()}
    return dict(state)


def release_container(case: Case, state: dict):
    key = CONTAINERS[case.repo]
    if key is None:
        return state
    if case.repo == "AECR-Net":  # the training script's checkpoint dict (optimizer state omitted)
        return {"epoch": 0, "step": 0, "max_psnr": 0.0, "max_ssim": 0.0, "ssims": [],
                "psnrs": [], "losses": [], "model": state}
    return {key: state}


# ----------------------------------------------------------------------------- inputs and runs

def make_inputs(case: Case, rng: np.random.Generator) -> list[np.ndarray]:
    b, h, w = case.shape
    if case.repo == "SNR-Aware-Low-Light-Enhance":
        x = (0.05 + 0.3 * rng.random((b, 3, h, w))).astype(np.float32)  # dim image
        # the SNR map: 16x16 blocks (one transformer patch each) at 0.05..0.35 or 0.65..0.95,
        # with a little pixel noise: every patch mean is far from the 0.5 threshold
        gh, gw = -(-h // 16), -(-w // 16)
        high = rng.random((b, gh, gw)) < 0.5
        high.reshape(b, -1)[:, 0], high.reshape(b, -1)[:, -1] = True, False
        level = np.where(high, 0.65, 0.05) + 0.3 * rng.random((b, gh, gw))
        blocks = np.repeat(np.repeat(level, 16, 1), 16, 2)[:, None, :h, :w]
        mask = np.clip(blocks + 0.03 * rng.standard_normal(blocks.shape), 0, 1)
        return [x, mask.astype(np.float32)]
    channels = case.kwargs.get("inp_channels", case.kwargs.get("in_c", case.kwargs.get(
        "img_channel", case.kwargs.get("input_nc", 3))))
    return [rng.random((b, channels, h, w), dtype=np.float32)]


def nudge(x: np.ndarray, seed: int) -> np.ndarray:
    """``x`` moved one float32 step up or down per element, at random."""
    up = np.random.default_rng(seed).random(x.shape) < 0.5
    return np.where(up, np.nextafter(x, np.float32(np.inf)),
                    np.nextafter(x, np.float32(-np.inf))).astype(np.float32)


def run(net, inputs, weights, dtype, call):
    """Outputs, input gradients, parameter gradients and buffers after one call of ``net``."""
    import torch

    xs = [torch.from_numpy(a).to(dtype).requires_grad_(True) for a in inputs]
    net.zero_grad(set_to_none=True)
    with _cuda_is_cpu(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FastDeconv's deprecated addmm overload
        out = net(*xs, **call)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        loss = sum((o * torch.from_numpy(w).to(dtype)).mean() for o, w in zip(outs, weights))
        loss.backward()
    grads = {k: p.grad.detach().numpy().copy() for k, p in net.named_parameters()
             if p.grad is not None}
    buffers = {k: b.detach().numpy().copy() for k, b in net.named_buffers()
               if b.is_floating_point()}
    return ([o.detach().numpy().copy() for o in outs], [x.grad.numpy().copy() for x in xs],
            grads, buffers)


def _select(case: Case, grads: dict) -> list[str]:
    """The parameter gradients stored: every tensor of at most 64 entries (biases, norm
    parameters, temperatures, PReLU slopes, gammas, mix weights: one or more per block, and the
    small tensors whose gradients are sums of many cancelling terms) and the case's named ones
    (first and last convs, attention projections, the DCN and FastDeconv kernels)."""
    keys = [k for k, g in grads.items() if g.size <= 64]
    for k in case.grads:
        if k not in grads:
            raise KeyError(f"{case.name}: no gradient for {k}; have {sorted(grads)[:8]}...")
        if k not in keys:
            keys.append(k)
    return keys


def make_case(official: str, case: Case, out_dir: pathlib.Path, commit: str) -> dict:
    import torch

    from safetensors.numpy import save_file

    torch.manual_seed(case.seed)
    net = _build_raw(official, case).float()
    randomise(net, case.seed)
    net.train(case.train)
    # the weights before any call (a train-mode call updates AECR-Net's buffers)
    state = release_state(case, net.state_dict())
    weights_path = out_dir / f"{case.weights or case.name}.pth"
    torch.save(release_container(case, state), weights_path)

    rng = np.random.default_rng(zlib.crc32(case.name.encode()))  # inputs, loss weights
    inputs = make_inputs(case, rng)
    net64 = copy.deepcopy(net).double()
    twins = [copy.deepcopy(net) for _ in range(NUDGES)]
    # the outputs' shapes, from a throwaway copy (a train-mode call updates buffers)
    with torch.no_grad(), _cuda_is_cpu(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = copy.deepcopy(net64)(*[torch.from_numpy(a).double() for a in inputs],
                                     **case.call)
    probe = list(probe) if isinstance(probe, (list, tuple)) else [probe]
    loss_w = [rng.standard_normal(tuple(p.shape)).astype(np.float32) for p in probe]

    o64, i64, g64, b64 = run(net64, inputs, loss_w, torch.float64, case.call)
    o32, i32, g32, b32 = run(net, inputs, loss_w, torch.float32, case.call)
    nudged = [run(t, [nudge(inputs[0], 100 + j)] + inputs[1:], loss_w, torch.float32, case.call)
              for j, t in enumerate(twins)]

    def err(ref, runs):
        return np.array(max(float(np.abs(np.asarray(r, np.float64) - ref).max()) for r in runs))

    rename = AECR_RELEASE_NAMES if case.repo == "AECR-Net" else {}
    arrays: dict[str, np.ndarray] = {}
    for i, a in enumerate(inputs):
        arrays[f"input/{i}"] = a
    for i, w in enumerate(loss_w):
        arrays[f"loss_weight/{i}"] = w
    for i in range(len(o64)):
        arrays[f"output/{i}/f64"], arrays[f"output/{i}/f32"] = o64[i], o32[i]
        arrays[f"output/{i}/err32"] = err(o64[i], [o32[i]] + [n[0][i] for n in nudged])
    for i in range(len(i64)):
        arrays[f"grad_input/{i}/f64"], arrays[f"grad_input/{i}/f32"] = i64[i], i32[i]
        arrays[f"grad_input/{i}/err32"] = err(i64[i], [i32[i]] + [n[1][i] for n in nudged])
    selected = _select(case, g64)
    for k in selected:
        name = rename.get(k, k)
        arrays[f"grad/{name}/f64"] = g64[k]  # (float32 values: only their error, for size)
        arrays[f"grad/{name}/err32"] = err(g64[k], [g32[k]] + [n[2][k] for n in nudged])
    dead = [k[:-4] for k in arrays if k.endswith("/f64") and not np.abs(arrays[k]).max() > 0]
    if dead:  # a dead ReLU channel or an unused path: nothing to compare there
        raise AssertionError(f"{case.name}: all-zero reference tensors {dead}; change the "
                             "case's widths or seed")
    if case.train:
        for k in b64:
            arrays[f"buffer_after/{k}/f64"], arrays[f"buffer_after/{k}/f32"] = b64[k], b32[k]
            arrays[f"buffer_after/{k}/err32"] = err(b64[k], [b32[k]] + [n[3][k] for n in nudged])

    meta = {
        "case": case.name, "repository": REPOS[case.repo], "commit": commit,
        "source": case.source, "class": case.cls, "kwargs": case.kwargs,
        "registry": case.registry, "covers": list(case.covers), "train": case.train,
        "call": case.call, "seed": case.seed, "layout": "NCHW (torch)",
        "weights": weights_path.name, "container": CONTAINERS[case.repo],
        "loss": "sum_i mean(output_i * loss_weight_i) over the outputs in the original's order",
        "err32": f"max |float32 - float64| over the run on the input and {NUDGES} runs on the "
                 "input nudged by one float32 step per pixel",
        "torch": torch.__version__,
        "stand_in": ("DCN (DCNv2's deformable conv) is a pure-torch STAND-IN written for this "
                     "tool; the rest is the original code") if case.repo == "AECR-Net" else None,
        "shims": SHIMS[case.repo],
        "notes": case.notes,
    }
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()},
              str(out_dir / f"{case.name}.safetensors"), metadata={"golden": json.dumps(meta)})
    n_params = sum(p.numel() for p in net.parameters())
    worst = max(float(arrays[k]) / max(1e-30, float(np.abs(arrays[k[:-5] + 'f64']).max()))
                for k in arrays if k.endswith("/err32"))
    print(f"{case.name:<22} {n_params:>8,} params, {len(o64)} output(s), {len(selected):>3} "
          f"parameter gradients; torch float32 worst relative error {worst:.2e}", flush=True)
    return dict(meta, golden=f"{case.name}.safetensors", parameters=n_params,
                grads=[rename.get(k, k) for k in selected])


def _commit(root: pathlib.Path, given: dict) -> str:
    if root.name in given:
        return given[root.name]
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        raise SystemExit(f"{root} is not a git checkout: give its commit with "
                         f"--commit {root.name}=SHA") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, type=pathlib.Path,
                        help="folder with one checkout per original repository")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parents[1] / "tests" / "goldens")
    parser.add_argument("--only", nargs="*", help="case names (default: all)")
    parser.add_argument("--commit", action="append", default=[], metavar="REPO=SHA",
                        help="the commit of a checkout that is not a git work tree")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    given = dict(c.split("=", 1) for c in args.commit)
    cases = [c for c in CASES if not args.only or c.name in args.only]
    unknown = set(args.only or ()) - {c.name for c in CASES}
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; known: {[c.name for c in CASES]}")
    official = str(args.official.resolve())
    commits = {r: _commit(args.official / r, given) for r in sorted({c.repo for c in cases})}
    check_width_shims(official) if any(c.repo in ("SNR-Aware-Low-Light-Enhance", "AECR-Net")
                                       for c in cases) else None
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.setdefault("cases", {})
    for case in cases:
        manifest["cases"][case.name] = make_case(official, case, args.out, commits[case.repo])
    manifest["about"] = ("Written by tools/make_goldens.py from the ORIGINAL repositories' code "
                         "(see its docstring for the shims and AECR-Net's DCN stand-in); "
                         "judged by tests/test_goldens.py")
    manifest["repositories"] = {
        **manifest.get("repositories", {}),
        **{r: {"url": REPOS[r], "commit": commits[r]} for r in commits}}
    manifest["cases"] = {c.name: manifest["cases"][c.name] for c in CASES
                         if c.name in manifest["cases"]}
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    total = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"wrote {len(cases)} case(s) to {args.out} ({total / 1e6:.2f} MB in the folder)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
