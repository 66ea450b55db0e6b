"""Primitives shared by several models, each with PyTorch semantics.

Everything here is channels-last (NHWC). Where JAX/Flax and PyTorch differ by default, the
difference is settled in one place in this file, with a one-line comment saying how.

Parameter naming convention (the converter relies on it, see ``porting/convert.py``):
a conv's weight is ``kernel`` in HWIO layout, its bias ``bias``; a norm's weight is ``scale``.
Every other parameter keeps the torch attribute name.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxrestore import native

# nnx.Sequential is used as-is; the converter treats its `layers` list as torch's child indices.
Sequential = nnx.Sequential

# torch.nn.functional.gelu defaults to the exact erf form; jax.nn.gelu defaults to tanh.
gelu = functools.partial(jax.nn.gelu, approximate=False)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def torch_uniform(fan_in: int):
    """PyTorch's default conv/linear init: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        if isinstance(key, jax.core.Tracer):  # under jit / eval_shape
            return jax.random.uniform(key, shape, dtype, -bound, bound)
        # Eagerly, every new shape would compile its own XLA program; numpy seeded by the key
        # draws the same kind of numbers without compiling (deterministic given the key).
        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
        values = np.random.default_rng(seed).uniform(-bound, bound, shape)
        return jnp.asarray(values, dtype=dtype)

    return init


# numpy's pad-mode names for torch's padding_mode / F.pad modes.
_PAD_MODES = {"zeros": "constant", "constant": "constant", "reflect": "reflect",
              "replicate": "edge", "circular": "wrap"}


def pad2d(x: jax.Array, pad: Sequence[int] | int, mode: str = "zeros") -> jax.Array:
    """Pads H and W of an NHWC array. ``pad`` is (top, bottom, left, right) or one int.

    ``mode`` takes torch's names: zeros/constant, reflect (no edge repeat), replicate, circular.
    """
    if isinstance(pad, int):
        pad = (pad, pad, pad, pad)
    t, b, l, r = pad
    if mode not in _PAD_MODES:
        raise ValueError(f"unknown padding mode {mode!r}; expected one of {sorted(_PAD_MODES)}")
    return jnp.pad(x, ((0, 0), (t, b), (l, r), (0, 0)), mode=_PAD_MODES[mode])


def _use_shifted_depthwise() -> bool:
    # XLA:CPU lowers feature_group_count=C convs slowly (see DESIGN.md); shifted multiply-adds
    # match torch to float rounding and are several times faster there. GPU/TPU use the library conv.
    return jax.default_backend() == "cpu"


def _use_cpu_conv_grads() -> bool:
    # XLA:CPU computes a conv's kernel gradient (a conv with batch and feature roles swapped) about
    # 10x slower than the forward (4x128x128x96, 3x3: 1.7 s vs 0.2 s); per-tap 2-D matmuls took
    # 0.6 s. GPU/TPU keep the library gradient.
    return jax.default_backend() == "cpu"


CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def prefer_memory_saving_cpu_scheduler() -> None:
    """Adds :data:`CPU_SCHEDULER_FLAG` to ``XLA_FLAGS`` unless the user set that flag.

    XLA:CPU's concurrency-optimized scheduler (on by default) keeps many more activations alive
    at once: Restormer's training step at 4x128x128 planned 40 GB of temporaries with it and ran
    out of memory; a one-block-per-level Restormer gradient needed 9.3 GB with it, 3.4 GB
    without. XLA reads the flag when the backend starts, so call this before the first jax
    computation (the trainer and the benchmarks do, at import). Per-jit ``compiler_options``
    are accepted but do not reach this pass (jax 0.10).
    """
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + CPU_SCHEDULER_FLAG).strip()


def _turned_off(env_var: str) -> bool:
    """True when the environment variable says 0 / false / no / off (unset: on)."""
    import os

    return os.environ.get(env_var, "1").strip().lower() in ("0", "false", "no", "off")


# XLA:CPU (jax 0.10) gives YNNPACK single dots, reductions and single convolutions by default.
# These options keep the first two there and give the convolutions to XNNPACK instead.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
}
CPU_COMPILER_OPTIONS_ENV = "FLAXRESTORE_XNN_CONVS"


def compiler_options(platform: str | None = None) -> dict[str, str] | None:
    """XLA compile options for this package's jitted model calls on ``platform`` (default: jax's
    default backend), for ``jax.jit(..., compiler_options=...)``; None where there are none.

    On CPU, :data:`CPU_COMPILER_OPTIONS`: 3x3 convolutions on XNNPACK rather than YNNPACK.
    Measured on the 2-core AVX2 machine: 64->64 channels at 1x256x256 65 -> 40 ms, 96->96 at
    128x128 26 -> 19 ms; SNR-Aware forward 256 x0.87, Restormer x0.96 (see docs/benchmarks.md).
    None (XLA's defaults) off CPU, with ``FLAXRESTORE_XNN_CONVS=0``, when ``XLA_FLAGS`` sets
    either fusion flag itself (the user's choice wins), or when this jaxlib rejects the options.
    Compiled results equal the defaults' to float rounding (the tests compare both with torch).
    """
    import os

    if platform is None:
        platform = jax.default_backend()
    if platform != "cpu":
        return None
    if _turned_off(CPU_COMPILER_OPTIONS_ENV):
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    if any(name in flags for name in CPU_COMPILER_OPTIONS):
        return None
    return dict(CPU_COMPILER_OPTIONS) if _cpu_options_accepted() else None


@functools.cache
def _cpu_options_accepted() -> bool:
    # a newer jaxlib may rename the enum values: compile a tiny conv once and fall back if refused
    x = jnp.zeros((1, 4, 4, 2), jnp.float32)
    k = jnp.zeros((3, 3, 2, 2), jnp.float32)
    try:
        jax.jit(_conv_lib, static_argnums=(2, 3, 4, 5)).lower(
            x, k, (1, 1), (1, 1), (1, 1), 1).compile(dict(CPU_COMPILER_OPTIONS))
    except Exception as err:  # noqa: BLE001 - any refusal means: use XLA's defaults
        import warnings

        warnings.warn(f"XLA rejected flaxrestore's CPU compile options, using its defaults: {err}",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


RETAIN_MEMORY_ENV = "FLAXRESTORE_RETAIN_CPU_MEMORY"
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu")


def retain_freed_cpu_memory() -> bool:
    """Makes glibc keep freed memory for reuse instead of returning it to the OS; True if applied.

    Each call of a compiled XLA:CPU program allocates its temporaries as one block (SNR-Aware's
    training step at 4x128x128: 477 MiB; DarkIR-m's at 4x256x256: 6.2 GB) from a worker thread,
    for which glibc maps fresh pages and unmaps them on free. Touching them again costs a page
    fault per 4 KiB. Measured on the 2-core machine: SNR-Aware 130,000 faults per step, 2.05 s
    -> 1.70 s without them; DarkIR-m 2.2 million faults and 14 s of system time per step,
    25.8 s -> 17.3 s. With one malloc arena, no mmap-served allocations and no trimming, the
    block is reused from the heap (0 faults). The price is that the process keeps its peak heap
    until it exits (the next step needs it anyway), and that while the heap fragments a few early
    steps grow it to a new high-water mark (SNR-Aware 4x128: steps 1, 2 and 6 of 25, resident
    2.4 -> 3.3 GB, then 0 faults).

    Applied only where it helps and is safe: glibc (Linux), the CPU backend (skipped when
    ``JAX_PLATFORMS`` names another platform or a GPU/TPU plugin is installed, unless
    ``JAX_PLATFORMS=cpu``), not disabled with ``FLAXRESTORE_RETAIN_CPU_MEMORY=0``. Call it before
    jax starts its backend (threads that already allocated keep their arenas); the trainer
    (``train.step``) and the benchmarks do, at import.
    """
    import ctypes
    import importlib.util
    import os

    if _turned_off(RETAIN_MEMORY_ENV):
        return False
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms and platforms.split(",")[0] != "cpu":
        return False
    if not platforms and any(importlib.util.find_spec(p) is not None
                             for p in _ACCELERATOR_PLUGINS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's malloc.h
    # one arena: glibc serves a large request of a non-main arena by mmap whatever M_MMAP_MAX says
    ok = mallopt(m_arena_max, 1) == 1
    ok = mallopt(m_mmap_max, 0) == 1 and ok
    # never trim the heap's top: -1 reaches glibc as SIZE_MAX (the int limit, 2 GiB, let
    # DarkIR-m's 6.2 GB step temporaries be returned and faulted in again every step)
    ok = mallopt(m_trim_threshold, -1) == 1 and ok
    return ok


def depthwise_conv_shifted(x, kernel, dilation=(1, 1)):
    """Depthwise stride-1 conv on an already padded NHWC input; kernel is (kh, kw, 1, C).

    Plain autodiff of this saves every shifted slice for the backward (kh*kw copies of x);
    :func:`depthwise_conv2d` is the same forward with a backward that keeps only x.
    """
    kh, kw = kernel.shape[:2]
    dh, dw = dilation
    ho = x.shape[1] - dh * (kh - 1)
    wo = x.shape[2] - dw * (kw - 1)
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = x[:, i * dh:i * dh + ho, j * dw:j * dw + wo, :] * kernel[i, j, 0]
            out = tap if out is None else out + tap
    return out


def _zero_pad_hw(x, top, bottom, left, right):
    """lax.pad on H and W; negative amounts crop."""
    zero = jnp.zeros((), x.dtype)
    return jax.lax.pad(x, zero, ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv2d(x, kernel, padding=(0, 0), dilation=(1, 1)):
    """Depthwise stride-1 conv (zero padding, no bias), NHWC / (kh, kw, 1, C), as shifted
    multiply-adds, with a hand-written backward (residuals: x and the kernel only).

    Backward: dx is the same shifted conv of dy (padded by dilation*(k-1)-padding) with the
    spatially flipped kernel; dkernel[i, j] is the sum over batch and space of the (i, j)-shifted
    padded x times dy. For float32, when :func:`flaxrestore.native.available`, the three are
    native kernels (:func:`flaxrestore.native.depthwise_conv`,
    :func:`~flaxrestore.native.depthwise_kernel_grad`: one pass over memory each); otherwise
    shifted multiply-adds and one reduction per tap.
    """
    ph, pw = padding
    if _native_float32(x, kernel):
        kh, kw = kernel.shape[:2]
        out_hw = (x.shape[1] + 2 * ph - dilation[0] * (kh - 1),
                  x.shape[2] + 2 * pw - dilation[1] * (kw - 1))
        return native.depthwise_conv(x, kernel, out_hw, padding, dilation)
    return depthwise_conv_shifted(_zero_pad_hw(x, ph, ph, pw, pw), kernel, dilation)


def _native_float32(*arrays) -> bool:
    """True when the native CPU kernels (flaxrestore.native) take these arrays: all float32."""
    return all(a.dtype == jnp.float32 for a in arrays) and native.available()


def _depthwise_fwd(x, kernel, padding, dilation):
    return depthwise_conv2d(x, kernel, padding, dilation), (x, kernel)


def _depthwise_bwd(padding, dilation, res, dy):
    x, kernel = res
    ph, pw = padding
    dh, dw = dilation
    kh, kw = kernel.shape[:2]
    h, w = x.shape[1:3]
    ho, wo = dy.shape[1:3]
    th, tw = dh * (kh - 1) - ph, dw * (kw - 1) - pw
    if _native_float32(x, dy, kernel):
        # dk in one pass over x and dy instead of one reduction per tap over a shifted copy of x
        dx = native.depthwise_conv(dy, kernel[::-1, ::-1], (h, w), (th, tw), dilation)
        dk = native.depthwise_kernel_grad(x, dy, (kh, kw), padding, dilation)
        return dx, dk
    dyp = _zero_pad_hw(dy, th, h + dh * (kh - 1) - ho - th, tw, w + dw * (kw - 1) - wo - tw)
    dx = depthwise_conv_shifted(dyp, kernel[::-1, ::-1], dilation)
    xp = _zero_pad_hw(x, ph, ph, pw, pw)
    taps = [jnp.sum(xp[:, i * dh:i * dh + ho, j * dw:j * dw + wo, :] * dy, axis=(0, 1, 2))
            for i in range(kh) for j in range(kw)]
    dk = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
    return dx.astype(x.dtype), dk


depthwise_conv2d.defvjp(_depthwise_fwd, _depthwise_bwd)


def _conv_lib(x, kernel, stride, padding, dilation, groups):
    (ph, pw) = padding
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=stride, padding=((ph, ph), (pw, pw)), rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def _x_windows(x, kernel_hw, out_hw, stride, padding, dilation, rows=None):
    """The kh*kw windows of zero-padded x that tap (i, j) of a conv reads, each (n, ho, wo, c),
    in (i, j) row-major order; with ``rows = (r0, r1)`` only those output rows."""
    kh, kw = kernel_hw
    ho, wo = out_hw
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    r0, r1 = rows if rows is not None else (0, ho)
    xp = _zero_pad_hw(x, ph, ph, pw, pw)
    n, c = xp.shape[0], xp.shape[-1]
    return [jax.lax.slice(xp, (0, i * dh + r0 * sh, j * dw, 0),
                          (n, i * dh + (r1 - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c),
                          (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


def conv_kernel_grad_taps(x, dy, kernel_shape, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                          groups: int = 1):
    """The kernel gradient of a zero-padded conv (NHWC / HWIO) as one 2-D matmul per tap:
    dkernel[i, j] = (strided (i, j)-shifted padded x)^T @ dy over batch and space."""
    kh, kw, cin_g, cout = kernel_shape
    c = x.shape[-1]
    dy2 = dy.reshape(-1, cout)
    taps = []
    for win in _x_windows(x, (kh, kw), dy.shape[1:3], stride, padding, dilation):
        xs = win.reshape(-1, c)
        if groups == 1:
            taps.append(xs.T @ dy2)
        else:
            g = jnp.einsum("mgc,mgo->cgo", xs.reshape(-1, groups, cin_g),
                           dy2.reshape(-1, groups, cout // groups))
            taps.append(g.reshape(cin_g, cout))
    return jnp.stack(taps).reshape(kernel_shape)


# shifted copies of the narrower side (9x its size for a 3x3 kernel), all held at once, up to
# this size when both sides have similar widths. Trainer step time with this limit / with 32 MB
# (in-process A/B, 2-core machine): SNR-Aware 0.93-0.97 (+103 MiB of XLA temporaries),
# DarkIR-m 0.93 (same memory), AECR-Net 1.00, Restormer 0.96-1.01 (noise). Larger copies
# (MPRNet's convs: 226 MB and more at its patch sizes) are made per block of rows
_IM2COL_MAX_BYTES = 160 << 20


def conv_kernel_grad(x, dy, kernel_shape, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                     groups: int = 1):
    """The kernel gradient of a zero-padded conv (NHWC / HWIO) on CPU, as few, large matmuls.

    For a stride-1, ungrouped conv the side with fewer channels is copied once per tap (x's
    shifted windows if it has fewer channels than dy, else dy shifted onto x's grid) and the
    gradient is ONE matmul with the other side as it is; this replaces kh*kw matmuls whose
    outputs are as narrow as the channel counts (measured on the 2-core machine, 4x128x128
    64->3: 157 ms as taps, 16 ms so; 4x32x32 64->64: 12.5 -> 9.4 ms). When the copies would
    exceed 160 MB with both sides of similar width, the rows are split into blocks of at most
    80 MB of copies, one matmul each, summed. The copies are made by the native kernel
    (:func:`flaxrestore.native.windows`) where it is built, for float32; else by XLA. Strided or
    grouped convs use :func:`conv_kernel_grad_taps`.
    """
    kh, kw, _, cout = kernel_shape
    n, ho, wo, _ = dy.shape
    c = x.shape[-1]
    narrow = min(c, cout)
    copies = kh * kw * n * x.shape[1] * x.shape[2] * narrow * x.dtype.itemsize
    # a side 8x narrower than the other: the taps would copy 8x more (AECR-Net's 7x7 64->3 at
    # 4x240x240: 1677 ms as taps, 183 ms so, with 135 MB of copies held at once)
    lopsided = 8 * narrow <= max(c, cout)
    if tuple(stride) != (1, 1) or groups != 1 or kh * kw == 1:
        return conv_kernel_grad_taps(x, dy, kernel_shape, stride, padding, dilation, groups)
    # above the limit, blocks of image rows, one matmul each, summed (MPRNet's ORSNet conv at
    # 2x256x256, 128 -> 128: 482 ms as taps, 344 ms in 8 blocks of 32 rows; torch 284 ms)
    blocks = 1 if lopsided else max(1, -(-copies // (_IM2COL_MAX_BYTES // 2)))
    ph, pw = padding
    dh, dw = dilation
    h, w = x.shape[1:3]
    # the windows by the native kernel where it is built (float32; 2x128x128x96, 3x3: 27 ms as
    # XLA's concatenation of slices, 14 ms so)
    use_native = _native_float32(x, dy)
    if cout <= c:
        # dkernel[i, j] = x^T @ (dy moved down/right by (i*dh - ph, j*dw - pw) onto x's h x w
        # grid, zeros where it has no value)
        def block(r0, r1):  # x's rows [r0, r1)
            cols = _dy_windows(dy, (kh, kw), (h, w), (ph, pw), dilation, (r0, r1), use_native)
            return x[:, r0:r1].reshape(-1, c).T @ cols.reshape(-1, kh * kw * cout)

        g = _sum_row_blocks(block, h, blocks)
        return g.reshape(c, kh, kw, cout).transpose(1, 2, 0, 3)

    # dkernel[i, j] = (x's (i, j)-shifted window)^T @ dy, all taps in one matmul
    def block(r0, r1):  # dy's rows [r0, r1)
        if use_native:
            cols = native.windows(x, (kh, kw), (r1 - r0, wo), (r0 - ph, -pw), (dh, dw))
        else:
            wins = _x_windows(x, (kh, kw), (ho, wo), stride, padding, dilation, rows=(r0, r1))
            cols = jnp.concatenate(wins, axis=-1)
        return cols.reshape(-1, kh * kw * c).T @ dy[:, r0:r1].reshape(-1, cout)

    g = _sum_row_blocks(block, ho, blocks)  # (kh*kw*c, cout)
    return g.reshape(kh, kw, c, cout)


def _dy_windows(dy, kernel_hw, x_hw, top_left, dilation, rows, use_native: bool):
    """The output gradient dy of a stride-1 conv moved back onto the input's grid, one copy per
    tap side by side on the channel axis: (N, r1 - r0, w, kh*kw*C) with
    ``out[b, r, x, (i*kw + j)*C + c] = dy[b, r0 + r + t - i*dh, x + l - j*dw, c]`` (zero where
    dy has no value), ``top_left = (t, l)`` the conv's top/left padding, ``rows = (r0, r1)``
    the input rows. The kernel gradient is x^T @ this; the input gradient of a conv with few
    output channels is this @ the kernel. By :func:`flaxrestore.native.windows` when
    ``use_native`` (float32), else as XLA's concatenation of slices of a zero-padded dy."""
    kh, kw = kernel_hw
    h, w = x_hw
    t, l = top_left
    dh, dw = dilation
    r0, r1 = rows
    ho, wo = dy.shape[1:3]
    if use_native:  # written pixel by pixel
        return native.windows(dy, (kh, kw), (r1 - r0, w), (t + r0, l), (-dh, -dw))
    top, left = max(0, (kh - 1) * dh - t), max(0, (kw - 1) * dw - l)
    dyp = _zero_pad_hw(dy, top, max(0, t + h - ho), left, max(0, l + w - wo))
    wins = []
    for i in range(kh):
        for j in range(kw):
            r, q = top + t - i * dh + r0, left + l - j * dw
            wins.append(dyp[:, r:r + r1 - r0, q:q + w, :])
    return jnp.concatenate(wins, axis=-1)


def _sum_row_blocks(block, rows: int, blocks: int):
    """sum of block(r0, r1) over ``blocks`` near-equal ranges of [0, rows)."""
    blocks = max(1, min(blocks, rows))
    edges = [rows * k // blocks for k in range(blocks + 1)]
    total = None
    for r0, r1 in zip(edges[:-1], edges[1:]):
        part = block(r0, r1)
        total = part if total is None else total + part
    return total


# Winograd F(2x2, 3x3): input-tile transform B^T d B, kernel transform G g G^T, output
# transform A^T m A (Lavin & Gray, 2016). Entries 0, +-1 and 1/2 only, so the transforms add
# no rounding beyond the additions themselves (measured error vs float64: 2.9e-6 against the
# library conv's 2.0e-6 on a 128-channel conv with unit-scale activations).
_WINO_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINO_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_WINO_AT = ((1, 1, 1, 0), (0, 1, -1, -1))

# CPU convs with at least this many input AND output channels use Winograd when they are not
# differentiated (3x3, stride 1, dilation 1, ungrouped, zero padding <= 2). Measured on the 2-core
# AVX2 machine, ms (Winograd / XNNPACK library conv / torch eager): 1x256x256 128->128
# 115 / 157 / 125; 2x128x256 96->96 33 / 46 / 37; 2x64x128 144->144 19 / 27 / 23; 4x64x64
# 128->128 27 / 39 / 34; 1x256x256 32->32 17 / 17 / 12. At 64 channels there is no gain
# (4x128x128: 34.0 vs 34.1 ms; 4x32x32: 3.3 vs 2.8), hence 96.
WINOGRAD_MIN_CHANNELS = 96
# narrower convs take Winograd on large images only: 64 -> 64 channels at 1x256x256 took 50 ms
# by Winograd against 55 ms (library), at 1x64x64 4.3 against 3.3 ms (2-core AVX2 machine)
WINOGRAD_LARGE_MIN_CHANNELS = 64
WINOGRAD_LARGE_PIXELS = 256 * 256
WINOGRAD_ENV = "FLAXRESTORE_WINOGRAD"


def _winograd_kernel(kernel: jax.Array) -> jax.Array:
    """The transformed kernel (16, C_in, C_out): u[(a, b)] = sum over i, j of
    G[a, i] * G[b, j] * kernel[i, j], as one (16, 9) @ (9, C_in*C_out) matmul (the same sums
    as a three-operand einsum, which XLA:CPU ran 18x slower: 512 -> 512, 28 ms)."""
    kh, kw, cin, cout = kernel.shape
    g = np.asarray(_WINO_G, np.float32)
    gg = np.einsum("ai,bj->abij", g, g).reshape(16, 9)
    u = jnp.dot(jnp.asarray(gg, kernel.dtype), kernel.reshape(9, cin * cout),
                precision=jax.lax.Precision.HIGHEST)
    return u.reshape(16, cin, cout)


def winograd_conv3x3(x: jax.Array, kernel: jax.Array, padding=(1, 1)) -> jax.Array:
    """A 3x3, stride-1, zero-padded NHWC / HWIO conv by Winograd F(2x2, 3x3).

    The output is cut into 2x2 tiles; each tile's 4x4 input window is transformed, the 16
    transformed positions become 16 independent (tiles x C_in) @ (C_in x C_out) matmuls, and
    the products are transformed back: 16 multiplies per tile instead of 36, for two extra
    memory passes. Equal to the direct conv up to float rounding. Each transform is written
    as one broadcast sum over the 16 window positions, which XLA compiles to a single fused
    loop (a per-position formulation compiled to 24 kernels per conv and took twice as long to
    compile, for the same speed).
    """
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"winograd_conv3x3 needs a 3x3 kernel, got {kernel.shape}")
    n, h, w, c = x.shape
    ph, pw = padding
    ho, wo = h + 2 * ph - 2, w + 2 * pw - 2
    th, tw = -(-ho // 2), -(-wo // 2)
    if _native_float32(x, kernel):
        # the transforms by native kernels: XLA fused the output transform into the conv's
        # consumers at 3-4x its own cost
        u = _winograd_kernel(kernel)
        m = jax.lax.dot_general(native.winograd_input(x, padding, (th, tw)), u,
                                (((2,), (1,)), ((0,), (0,))))
        return native.winograd_output(m, (n, ho, wo, kernel.shape[-1]))
    bt, at = (np.asarray(m, np.float32) for m in (_WINO_BT, _WINO_AT))
    # pad an odd output up to whole tiles (the extra row/column is cropped at the end)
    xp = _zero_pad_hw(x, ph, ph + 2 * th - ho, pw, pw + 2 * tw - wo)
    # v[(a, b)] = sum over window positions (i, j) of bt[a, i] * bt[b, j] * window[i, j]
    to_v = np.einsum("ai,bj->ijab", bt, bt).reshape(4, 4, 16, 1, 1, 1, 1)
    v = sum(jnp.asarray(to_v[i, j], x.dtype) * xp[None, :, i:i + 2 * th:2, j:j + 2 * tw:2, :]
            for i in range(4) for j in range(4))
    u = _winograd_kernel(kernel)
    m = jax.lax.dot_general(v.reshape(16, -1, c), u, (((2,), (1,)), ((0,), (0,))))
    m = m.reshape(16, n, th, 1, tw, 1, -1)
    # output pixel (2t + p, 2s + q) = sum over (a, b) of at[p, a] * at[q, b] * m[(a, b)], laid
    # out interleaved as (n, t, p, s, q, c)
    to_y = np.einsum("pa,qb->abpq", at, at).reshape(16, 1, 1, 2, 1, 2, 1)
    y = sum(jnp.asarray(to_y[ab], m.dtype) * m[ab] for ab in range(16))
    return y.reshape(n, 2 * th, 2 * tw, -1)[:, :ho, :wo]


def _winograd_applies(kernel_shape, stride, padding, dilation, groups, pixels=0) -> bool:
    """Whether conv2d_cpu's forward takes Winograd: 3x3, stride 1, undilated, ungrouped,
    padding <= 2, and at least WINOGRAD_MIN_CHANNELS channels on both sides - or at least
    WINOGRAD_LARGE_MIN_CHANNELS with ``pixels`` (batch x output pixels) >= WINOGRAD_LARGE_PIXELS."""
    kh, kw, cin, cout = kernel_shape
    wide = min(cin, cout) >= WINOGRAD_MIN_CHANNELS or (
        min(cin, cout) >= WINOGRAD_LARGE_MIN_CHANNELS and pixels >= WINOGRAD_LARGE_PIXELS)
    return ((kh, kw) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and groups == 1 and wide and all(0 <= p <= 2 for p in padding)
            and not _turned_off(WINOGRAD_ENV))


# convs with at most this many output channels take conv_narrow_out on CPU
NARROW_OUT_MAX = 4


def _narrow_out_applies(kernel_shape, stride, groups) -> bool:
    kh, kw, _, cout = kernel_shape
    return cout <= NARROW_OUT_MAX and kh * kw > 1 and tuple(stride) == (1, 1) and groups == 1


def conv_narrow_out(x, kernel, pads, dilation=(1, 1)):
    """A stride-1, ungrouped NHWC / HWIO conv for very few output channels (an RGB output conv).

    ``pads = ((top, bottom), (left, right))`` zero padding (negative values crop). Every tap's
    contribution comes from ONE matmul of x with the kernel laid out as (C_in, kh*kw*C_out),
    z = x @ K; the output is the sum over taps (i, j) of z's tap channels shifted by (i, j) *
    dilation. The libraries handle 3-channel outputs poorly (measured on the 2-core machine at
    1x256x256: 64 -> 3 3x3 12.7 ms vs 4.2 ms so, torch 9.9; AECR-Net's reflect-padded 7x7
    64 -> 3 on 262x262: 52.8 vs 16.0 ms, torch 47.2). Products and sums in float32 (z is
    float32 whatever x's type), rounded to x's dtype at the end.
    """
    n, h, w, c = x.shape
    kh, kw, cin, cout = kernel.shape
    if cin != c:
        raise ValueError(f"conv_narrow_out: x has {c} channels, the kernel {cin}")
    (top, bottom), (left, right) = pads
    dh, dw = dilation
    ho, wo = h + top + bottom - (kh - 1) * dh, w + left + right - (kw - 1) * dw
    k2 = kernel.transpose(2, 0, 1, 3).reshape(c, kh * kw * cout)
    z = jax.lax.dot_general(x.reshape(-1, c), k2, (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
    z = jax.lax.pad(z.reshape(n, h, w, kh * kw * cout), jnp.zeros((), z.dtype),
                    ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
    y = None
    for i in range(kh):
        for j in range(kw):
            t = (i * kw + j) * cout
            part = z[:, i * dh:i * dh + ho, j * dw:j * dw + wo, t:t + cout]
            y = part if y is None else y + part
    return y.astype(x.dtype)


def _conv_input_grad(x, kernel, dy, stride, pads, dilation, groups, conv):
    """dL/dx of ``conv(x, kernel)`` (pads as ((top, bottom), (left, right))), stride 1 and
    ungrouped by matmuls where the conv has few channels on one side:

    * at most NARROW_OUT_MAX output channels (an RGB output conv): dy's windows on x's grid
      (:func:`_dy_windows`, which the kernel gradient builds as well; XLA computes them once)
      times the kernel. dx + dk of AECR-Net's 7x7 64 -> 3 at 4x246x246: 162 ms, 189 ms with the
      library's dx; MPRNet's 3x3 96 -> 3 at 2x256x256: 23 against 30 ms;
    * at most NARROW_OUT_MAX input channels: a narrow-output conv of dy with the flipped kernel
      (MPRNet's 3 -> 96 conv on its 2x256x256 stage images, forward + both gradients: 75 ms
      with the library's input gradient, 24 ms so, torch 36-39 ms);

    a Winograd conv of dy with the flipped kernel (:func:`winograd_conv3x3`) for the 3x3
    convs that take Winograd (:func:`_winograd_applies`, on the transposed channel counts) when
    the native transforms are there (float32); else the library's own (the vjp of ``conv``)."""
    kh, kw, cin, cout = kernel.shape
    if _narrow_out_applies(kernel.shape, stride, groups) and cin > NARROW_OUT_MAX:
        # dx = (dy's windows on x's grid) @ the kernel (XLA's gradient of conv_narrow_out's
        # shifted sum, a sum of kh*kw padded copies, took 510 ms for AECR-Net's 4x246x246 7x7)
        cols = _dy_windows(dy, (kh, kw), x.shape[1:3], (pads[0][0], pads[1][0]), dilation,
                           (0, x.shape[1]), _native_float32(x, dy))
        k2 = kernel.transpose(0, 1, 3, 2).reshape(kh * kw * cout, cin).astype(dy.dtype)
        dx = jax.lax.dot_general(cols.reshape(-1, kh * kw * cout), k2, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        return dx.reshape(x.shape).astype(x.dtype)
    if _narrow_out_applies((kh, kw, 1, cin), stride, groups):
        dh, dw = dilation
        (t, b), (l, r) = pads
        # the transpose of a stride-1 conv: pad dy by the kernel's reach minus the padding
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
        dx = conv_narrow_out(dy, flipped, (((kh - 1) * dh - t, (kh - 1) * dh - b),
                                           ((kw - 1) * dw - l, (kw - 1) * dw - r)), dilation)
        return dx.astype(x.dtype)
    if (_native_float32(x, kernel, dy) and tuple(dilation) == (1, 1)
            and _winograd_applies((kh, kw, cout, cin), stride, (2 - pads[0][0], 2 - pads[1][0]),
                                  dilation, groups, x.shape[0] * x.shape[1] * x.shape[2])
            and pads[0][0] == pads[0][1] and pads[1][0] == pads[1][1]):
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
        return winograd_conv3x3(dy, flipped, (2 - pads[0][0], 2 - pads[1][0]))
    _, vjp_x = jax.vjp(lambda x: conv(x, kernel), x)
    return vjp_x(dy)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv2d_cpu(x, kernel, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1):
    """The conv (zero padding, no bias) on CPU.

    Convs with at most :data:`NARROW_OUT_MAX` output channels (stride 1, ungrouped): always
    :func:`conv_narrow_out`. Otherwise, not differentiated (inference, evaluation), float32:
    Winograd for 3x3 stride-1 convs with at least :data:`WINOGRAD_MIN_CHANNELS` channels on
    both sides, or :data:`WINOGRAD_LARGE_MIN_CHANNELS` on large images
    (``FLAXRESTORE_WINOGRAD=0``: never; read when the function is traced), else the library
    conv. Differentiated (wider outputs): the kernel gradient from matmuls
    (:func:`conv_kernel_grad`) instead of XLA:CPU's slow kernel-gradient conv; the forward and
    the input gradient (a conv of dy with the flipped kernel) by Winograd where it applies and
    the native transforms are built (float32; measured in-process, training step / torch:
    MPRNet 2x128x128 1.09 -> 0.77, AECR-Net with its VGG loss 0.91 -> 0.74, SNR-Aware
    1.04 -> 0.94; with XLA's own transforms Winograd made MPRNet's step 1.01-1.12x slower),
    else the library conv and its input gradient.
    """
    if _narrow_out_applies(kernel.shape, stride, groups):
        return conv_narrow_out(x, kernel, ((padding[0],) * 2, (padding[1],) * 2), dilation)
    # float32 only: in a 16-bit type the transforms' additions would round more than the conv
    if (x.dtype == jnp.float32 and kernel.dtype == jnp.float32
            and _winograd_applies(kernel.shape, stride, padding, dilation, groups,
                                  x.shape[0] * x.shape[1] * x.shape[2])):
        return winograd_conv3x3(x, kernel, padding)
    return _conv_lib(x, kernel, stride, padding, dilation, groups)


def _conv2d_cpu_fwd(x, kernel, stride, padding, dilation, groups):
    if _narrow_out_applies(kernel.shape, stride, groups):
        y = conv_narrow_out(x, kernel, ((padding[0],) * 2, (padding[1],) * 2), dilation)
    elif (_native_float32(x, kernel)
            and _winograd_applies(kernel.shape, stride, padding, dilation, groups,
                                  x.shape[0] * x.shape[1] * x.shape[2])):
        y = winograd_conv3x3(x, kernel, padding)
    else:
        y = _conv_lib(x, kernel, stride, padding, dilation, groups)
    return y, (x, kernel)


def _conv2d_cpu_bwd(stride, padding, dilation, groups, res, dy):
    x, kernel = res
    dx = _conv_input_grad(
        x, kernel, dy, stride, ((padding[0],) * 2, (padding[1],) * 2), dilation, groups,
        lambda x, k: _conv_lib(x, k, stride, padding, dilation, groups))
    dk = conv_kernel_grad(x, dy, kernel.shape, stride, padding, dilation, groups)
    return dx, dk.astype(kernel.dtype)


conv2d_cpu.defvjp(_conv2d_cpu_fwd, _conv2d_cpu_bwd)


def materialize(x: jax.Array) -> jax.Array:
    """``x`` unchanged, but computed into its own buffer on CPU (elsewhere: ``x`` itself).

    XLA:CPU fuses cheap elementwise producers into every consumer, and it strips
    ``optimization_barrier``. A chain of residual adds (x + f(x) + g(...) ...) is then never
    stored: each consumer - above all the transposes the backward inserts for weight gradients -
    re-computes the whole chain (SNR-Aware's 6-layer transformer: its gradient took 1.2 s without
    this, 0.55 s with it). A dot with an 8x8 identity is not fused and costs a memory pass.
    Exact for finite values (x * 1 + 0 * y); an inf in a row of 8 turns that row into NaN.
    """
    if jax.default_backend() != "cpu" or x.size % 8:
        return x
    return _identity_dot(x, 8)


def _identity_dot(x: jax.Array, k: int, gate: jax.Array | None = None) -> jax.Array:
    """x @ (k x k identity * gate) over rows of k elements: x itself for finite values."""
    eye = jnp.eye(k, dtype=x.dtype)
    if gate is not None:
        eye = eye * gate
    y = jnp.dot(x.reshape(-1, k), eye, precision=jax.lax.Precision.HIGHEST)
    return y.reshape(x.shape)


_REMAT = {"on": False}


@contextlib.contextmanager
def rematerialize(enabled: bool = True):
    """While tracing inside this context, blocks called through :func:`checkpoint_call`
    (Restormer's TransformerBlock, MPRNet's CAB) keep only their inputs for the backward pass and
    recompute their activations there: less memory for about one more forward pass of compute.
    The trainer turns it on with the recipe field ``remat``. On CPU (measured): MPRNet's
    gradient at 2x128x128 needs 1.9 GB of XLA temporaries instead of 2.8 GB; Restormer's does
    not drop, its peak lies inside the backward pass."""
    previous = _REMAT["on"]
    _REMAT["on"] = bool(enabled)
    try:
        yield
    finally:
        _REMAT["on"] = previous


def _distinct_copy(x: jax.Array, after: jax.Array) -> jax.Array:
    """``x`` through a dot with a small identity (exact for finite values): a value XLA cannot
    prove equal to ``x``, so a recomputation from it is not merged with the original. The
    identity is scaled by ``1 + 0 * after[0]`` so that the copy, and what is computed from it,
    cannot be scheduled before ``after`` exists (NaN in ``after`` gives NaN)."""
    k = next(k for k in (8, 4, 2, 1) if x.size % k == 0)
    gate = 1 + 0 * jax.lax.stop_gradient(after).reshape(-1)[0].astype(x.dtype)
    return _identity_dot(x, k, gate)


def _recompute_in_backward(fn):
    """``fn(state, *args)`` saving only its arguments; the backward re-runs it (CPU form).

    ``jax.checkpoint`` marks the recomputation with an optimization barrier, which XLA:CPU
    removes, after which common-subexpression elimination merges the recomputation with the
    forward and every activation stays alive again (measured: no memory saved). Here the
    backward recomputes from a distinct copy of the array arguments, which nothing merges and
    which waits for the incoming gradient.
    """
    @jax.custom_vjp
    def run(state, *args):
        return fn(state, *args)

    def fwd(state, *args):
        return fn(state, *args), (state, args)

    def bwd(res, dy):
        state, args = res
        first = jax.tree.leaves(dy)[0]
        args = tuple(_distinct_copy(a, first) if isinstance(a, jax.Array)
                     and jnp.issubdtype(a.dtype, jnp.floating) else a for a in args)
        _, vjp = jax.vjp(fn, state, *args)
        return vjp(dy)

    run.defvjp(fwd, bwd)
    return run


def checkpoint_call(module: nnx.Module, fn, *args):
    """``fn(module, *args)``; inside :func:`rematerialize`, its activations are recomputed in
    the backward pass instead of stored. ``module`` must not update its own state in ``fn``
    (no batch statistics); ``args`` are arrays."""
    if not _REMAT["on"]:
        return fn(module, *args)
    graph, state = nnx.split(module)

    def pure(state, *a):
        return fn(nnx.merge(graph, state), *a)

    if jax.default_backend() == "cpu":
        return _recompute_in_backward(pure)(state, *args)
    return jax.checkpoint(pure)(state, *args)


def matmul_channels(x, kernel2d):
    """x (..., C) @ kernel (C, O) as one 2-D matmul: XLA:CPU runs the gradient of a matmul that
    contracts several leading axes (the kernel gradient of a 4-D x) about 3x slower."""
    lead = x.shape[:-1]
    return (x.reshape(-1, x.shape[-1]) @ kernel2d).reshape(*lead, kernel2d.shape[-1])


# Conv2d.concat_call sums per-piece convs on CPU below this many output channels
CONCAT_SPLIT_MAX_OUT = 128


class Conv2d(nnx.Module):
    """torch.nn.Conv2d on NHWC input: explicit symmetric padding, groups, dilation, padding_mode.

    ``kernel`` is HWIO, i.e. (kh, kw, in/groups, out); ``bias`` is (out,). Initialised like torch.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 rngs: nnx.Rngs):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels ({in_channels}, {out_channels}) not divisible by groups={groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        kh, kw = self.kernel_size
        fan_in = (in_channels // groups) * kh * kw
        init = torch_uniform(fan_in)
        self.kernel = nnx.Param(init(rngs.params(), (kh, kw, in_channels // groups, out_channels)))
        self.bias = nnx.Param(init(rngs.params(), (out_channels,))) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self._conv(x, self.kernel[...].astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y

    def concat_call(self, xs: Sequence[jax.Array]) -> jax.Array:
        """``self(jnp.concatenate(xs, axis=-1))``; on CPU, for narrow outputs, without forming it.

        On CPU, when the conv has fewer than :data:`CONCAT_SPLIT_MAX_OUT` output channels, the
        conv of each piece with its slice of the kernel's input channels is summed instead (equal
        up to float summation order). XLA:CPU's conv (YNNPACK) is inefficient with narrow outputs
        and narrow inputs alike but much less so with narrow inputs: SNR-Aware's HRconv at
        4x128x128, 128 -> 64 channels, took 130 ms as one conv and 2 x 47 ms as two 64 -> 64
        convs. With 128 or more outputs the single conv wins: SNR-Aware's upconv2 at 4x64x64,
        128 -> 256, took 65 ms against 2 x 57 ms for the pieces, its input gradient (256 -> 128)
        60 ms against 2 x 63 ms (training step: x0.93 with upconv1/upconv2 concatenated).
        Elsewhere, and for grouped convs, the concatenation is formed as usual.
        """
        xs = list(xs)
        sizes = [int(x.shape[-1]) for x in xs]
        if sum(sizes) != self.in_channels:
            raise ValueError(f"concat_call: pieces with {sizes} channels (sum {sum(sizes)}) for a "
                             f"conv with {self.in_channels} input channels")
        if (len(xs) == 1 or self.groups != 1 or self.out_channels >= CONCAT_SPLIT_MAX_OUT
                or jax.default_backend() != "cpu"):
            return self(jnp.concatenate(xs, axis=-1))
        dtype = jnp.result_type(*xs)
        kernel = self.kernel[...].astype(dtype)
        y, start = None, 0
        for x, c in zip(xs, sizes):
            part = self._conv(x.astype(dtype), kernel[:, :, start:start + c, :])
            y = part if y is None else y + part
            start += c
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y

    def _conv(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """The conv without bias, on the backend's fastest lowering."""
        ph, pw = self.padding
        depthwise = self.groups == self.in_channels == self.out_channels and self.groups > 1
        if self.padding_mode != "zeros" and (ph or pw):
            x = pad2d(x, (ph, ph, pw, pw), self.padding_mode)
            ph = pw = 0
        if self.kernel_size == (1, 1) and self.stride == (1, 1) and self.groups == 1 and not (ph or pw):
            y = matmul_channels(x, kernel[0, 0])  # a 1x1 conv is a matmul over channels
        elif depthwise and self.stride == (1, 1) and _use_shifted_depthwise():
            y = depthwise_conv2d(x, kernel, (ph, pw), self.dilation)
        elif _use_cpu_conv_grads():
            y = conv2d_cpu(x, kernel, self.stride, (ph, pw), self.dilation, self.groups)
        else:
            y = _conv_lib(x, kernel, self.stride, (ph, pw), self.dilation, self.groups)
        return y


class ChannelLayerNorm(nnx.Module):
    """LayerNorm over the channel (last) axis with torch's conventions: biased variance, eps inside
    the sqrt (Flax's default eps is 1e-6 and its fast variance is E[x^2]-E[x]^2; neither is used).

    ``center=False`` is Restormer's BiasFree form: the *uncentred* x divided by the centred std,
    with no bias. It is not RMSNorm.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, center: bool = True):
        self.eps = eps
        self.center = center
        self.scale = nnx.Param(jnp.ones((num_channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32)) if center else None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mu = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
        num = x - mu if self.center else x
        y = num * jax.lax.rsqrt(var + self.eps) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(dtype)


def pixel_unshuffle(x: jax.Array, r: int) -> jax.Array:
    """torch.nn.PixelUnshuffle in NHWC: out channel c*r*r + i*r + j holds in[c] at (r*y+i, r*x+j).

    TF's space_to_depth puts the channel fastest and does not match.
    """
    b, h, w, c = x.shape
    if h % r or w % r:
        raise ValueError(f"pixel_unshuffle: spatial size {(h, w)} not divisible by {r}")
    x = x.reshape(b, h // r, r, w // r, r, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // r, w // r, c * r * r)


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
    """torch.nn.PixelShuffle in NHWC, the exact inverse of :func:`pixel_unshuffle`."""
    b, h, w, c = x.shape
    if c % (r * r):
        raise ValueError(f"pixel_shuffle: {c} channels not divisible by {r * r}")
    x = x.reshape(b, h, w, c // (r * r), r, r)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * r, w * r, c // (r * r))


def l2_norm(x: jax.Array, axis: int, eps: float = 1e-12, keepdims: bool = False) -> jax.Array:
    """max(||x||_2, eps) over ``axis``: the divisor of F.normalize (eps clamps the norm, it is
    not added)."""
    return jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)), eps)



def _bilinear_taps(n_in: int, n_out: int, scale_factor: float | None, align_corners: bool):
    """Source indices and weights of torch's 1-D bilinear (linear) interpolation, antialias off."""
    import numpy as np

    f32 = np.float32  # torch computes the source coordinates in float32 for float32 images
    dst = np.arange(n_out, dtype=f32)
    if align_corners:
        scale = f32(n_in - 1) / f32(n_out - 1) if n_out > 1 else f32(0.0)
        src = scale * dst
    else:
        # torch uses 1/scale_factor when the caller gave one, else in/out; negatives clamp to 0
        scale = f32(1.0 / scale_factor) if scale_factor is not None else f32(n_in) / f32(n_out)
        # torch's kernel fuses this multiply-add (one rounding): emulate it in float64
        src = (np.float64(scale) * np.float64(dst + f32(0.5)) - 0.5).astype(f32)
        src = np.maximum(src, f32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0)).astype(f32)
    return i0, i1, f32(1.0) - w1, w1


def resize_bilinear(x: jax.Array, size: Sequence[int] | int | None = None,
                    scale_factor: Sequence[float] | float | None = None,
                    align_corners: bool = False) -> jax.Array:
    """F.interpolate(mode='bilinear') on NHWC: no antialiasing, torch's source-index rule.

    Give ``size`` (H, W) or ``scale_factor`` as torch does; with a scale factor the output is
    floor(in * s) and the source coordinates use 1/s (torch's default recompute_scale_factor).
    jax.image.resize antialiases when shrinking and does not match torch there.
    """
    h, w = x.shape[1], x.shape[2]
    if (size is None) == (scale_factor is None):
        raise ValueError("resize_bilinear: give exactly one of size and scale_factor")
    if size is not None:
        oh, ow = _pair(size)
        sh = sw = None
    else:
        sh, sw = (scale_factor, scale_factor) if not isinstance(scale_factor, (tuple, list)) \
            else scale_factor
        oh, ow = int(math.floor(h * sh)), int(math.floor(w * sw))
    for axis, n_in, n_out, s in ((1, h, oh, sh), (2, w, ow, sw)):
        i0, i1, w0, w1 = _bilinear_taps(n_in, n_out, s, align_corners)
        shape = [1, 1, 1, 1]
        shape[axis] = n_out
        a = jnp.take(x, i0, axis=axis)
        b = jnp.take(x, i1, axis=axis)
        x = a * w0.reshape(shape).astype(x.dtype) + b * w1.reshape(shape).astype(x.dtype)
    return x


class PReLU(nnx.Module):
    """torch.nn.PReLU over the channel (last) axis; ``weight`` has torch's shape (num_parameters,).

    One instance may be shared by many modules (MPRNet): the converter then sees its ``weight``
    under every alias, as torch's state_dict does.
    """

    def __init__(self, num_parameters: int = 1, init: float = 0.25):
        self.weight = nnx.Param(jnp.full((num_parameters,), init, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.weight[...].astype(x.dtype)
        return jnp.where(x >= 0, x, a * x)


def simple_gate(x: jax.Array) -> jax.Array:
    """NAFNet/DarkIR SimpleGate: split the channel (last) axis into halves, first * second."""
    a, b = jnp.split(x, 2, axis=-1)
    return a * b


# --------------------------------------------------------------------------------------------
# Transposed conv, modulated deformable conv (DCNv2) and network deconvolution (FastDeconv).
# First used by AECR-Net; written to be usable by any model.


class ConvTranspose2d(nnx.Module):
    """torch.nn.ConvTranspose2d on NHWC input (groups=1).

    ``kernel`` is the HWIO kernel of the equivalent stride-1 conv over the stride-dilated input:
    torch's weight (in, out, kh, kw) flipped in both spatial axes and laid out (kh, kw, in, out)
    (the converter's rule does the flip + swap). torch's ``padding`` p becomes
    dilation*(k-1)-p zeros on each side of the dilated input, plus ``output_padding`` at the end.
    Initialised like torch (its fan_in is taken from weight dim 1: out_channels*kh*kw).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 output_padding=0, groups: int = 1, bias: bool = True, dilation=1, *,
                 rngs: nnx.Rngs):
        if groups != 1:
            raise NotImplementedError("ConvTranspose2d: only groups=1 is implemented")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.output_padding = _pair(output_padding)
        self.dilation = _pair(dilation)
        for op, s, d in zip(self.output_padding, self.stride, self.dilation):
            if not (op < s or op < d):  # the same check torch makes
                raise ValueError(f"output_padding {self.output_padding} must be smaller than "
                                 f"stride {self.stride} or dilation {self.dilation}")
        kh, kw = self.kernel_size
        init = torch_uniform(out_channels * kh * kw)
        self.kernel = nnx.Param(init(rngs.params(), (kh, kw, in_channels, out_channels)))
        self.bias = nnx.Param(init(rngs.params(), (out_channels,))) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        pads = tuple((d * (k - 1) - p, d * (k - 1) - p + op) for k, p, op, d in
                     zip(self.kernel_size, self.padding, self.output_padding, self.dilation))
        kernel = self.kernel[...].astype(x.dtype)
        if jax.default_backend() == "cpu":
            # XLA:CPU's kernel gradient of an lhs-dilated conv took 40-50 s at 4x60x60x256
            y = conv_transpose_cpu(x, kernel, self.stride, pads, self.dilation)
        else:
            y = _conv_transpose_lib(x, kernel, self.stride, pads, self.dilation)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


@jax.custom_vjp
def _sample_native(x: jax.Array, py: jax.Array, px: jax.Array) -> jax.Array:
    """:func:`_bilinear_gather_zero` by the native kernels (x NHWC float32, py/px (N, P))."""
    return native.bilinear_sample(x, py, px)


def _sample_native_fwd(x, py, px):
    return native.bilinear_sample(x, py, px), (x, py, px)


def _sample_native_bwd(res, g):
    return native.bilinear_sample_grad(*res, g)


_sample_native.defvjp(_sample_native_fwd, _sample_native_bwd)


def _bilinear_gather_zero(x: jax.Array, py: jax.Array, px: jax.Array) -> jax.Array:
    """Bilinear samples of x (N, H, W, C) at (py, px) (N, *S), zero outside: (N, *S, C).

    DCNv2's rule: a point is zero when py <= -1, px <= -1, py >= H or px >= W; otherwise each of
    its four neighbours that falls outside the image contributes zero (not clamped).
    """
    n, h, w, c = x.shape
    if _native_float32(x, py, px):
        # XLA:CPU: four element-wise gathers, and a scatter for the gradient (AECR-Net's
        # 64x64x256 deformable conv: 134 ms per call)
        return _sample_native(x, py.reshape(n, -1), px.reshape(n, -1)).reshape(*py.shape, c)
    flat = x.reshape(n, h * w, c)
    inside = (py > -1) & (px > -1) & (py < h) & (px < w)
    y0 = jnp.floor(py)
    x0 = jnp.floor(px)
    ly, lx = py - y0, px - x0
    y0 = y0.astype(jnp.int32)
    x0 = x0.astype(jnp.int32)
    out = 0.0
    for dy, wy in ((0, 1.0 - ly), (1, ly)):
        for dx, wx in ((0, 1.0 - lx), (1, lx)):
            yy, xx = y0 + dy, x0 + dx
            ok = inside & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            idx = jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)
            vals = jax.vmap(lambda a, i: a[i])(flat, idx.reshape(n, -1)).reshape(*idx.shape, c)
            out = out + vals * jnp.where(ok, wy * wx, 0.0).astype(x.dtype)[..., None]
    return out


def deform_conv2d(x: jax.Array, offset: jax.Array, mask: jax.Array | None, kernel: jax.Array,
                  bias: jax.Array | None = None, stride=1, padding=0, dilation=1) -> jax.Array:
    """Modulated deformable conv (DCNv2; ``torchvision.ops.deform_conv2d`` semantics) on NHWC.

    x: (N, H, W, C). kernel: HWIO (kh, kw, C, O). With K = kh*kw taps, tap k = i*kw + j, and G
    deformable groups (channel blocks of C/G): offset (N, Ho, Wo, 2*G*K) holds *interleaved*
    pairs, channel g*2K + 2k = dy and g*2K + 2k + 1 = dx; mask (N, Ho, Wo, G*K), channel g*K + k,
    already activated (DCNv2's DCN applies the sigmoid before calling this), or None for 1.
    Tap k of output (y, x) reads the input at (y*sh - ph + i*dh + dy, x*sw - pw + j*dw + dx),
    bilinearly, zero outside the image.
    """
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    n, h, w, c = x.shape
    kh, kw, cin, cout = kernel.shape
    k = kh * kw
    if cin != c:
        raise ValueError(f"deform_conv2d: kernel expects {cin} input channels, got {c}")
    if offset.shape[-1] % (2 * k):
        raise ValueError(f"deform_conv2d: offset has {offset.shape[-1]} channels, not a "
                         f"multiple of 2*{k}")
    groups = offset.shape[-1] // (2 * k)
    if c % groups:
        raise ValueError(f"deform_conv2d: {c} channels not divisible by {groups} offset groups")
    ho, wo = offset.shape[1:3]
    expect = tuple((size + 2 * p - d * (kk - 1) - 1) // st + 1 for size, p, d, kk, st in
                   ((h, ph, dh, kh, sh), (w, pw, dw, kw, sw)))
    if (ho, wo) != expect:
        raise ValueError(f"deform_conv2d: offset grid {(ho, wo)} != conv output size {expect}")
    off = offset.reshape(n, ho, wo, groups, k, 2)
    tap_i = jnp.repeat(jnp.arange(kh), kw) * dh  # (K,) row of tap k
    tap_j = jnp.tile(jnp.arange(kw), kh) * dw
    base_y = (jnp.arange(ho) * sh - ph)[:, None] + tap_i[None, :]  # (Ho, K)
    base_x = (jnp.arange(wo) * sw - pw)[:, None] + tap_j[None, :]  # (Wo, K)
    py = base_y[None, :, None, None, :].astype(x.dtype) + off[..., 0]  # (N, Ho, Wo, G, K)
    px = base_x[None, None, :, None, :].astype(x.dtype) + off[..., 1]
    if mask is not None:
        mask = mask.reshape(n, ho, wo, groups, k)
    cg = c // groups
    cols = []
    for g in range(groups):
        s = _bilinear_gather_zero(x[..., g * cg:(g + 1) * cg], py[:, :, :, g], px[:, :, :, g])
        if mask is not None:
            s = s * mask[:, :, :, g, :, None].astype(x.dtype)
        cols.append(s)  # (N, Ho, Wo, K, C/G)
    cols = cols[0] if groups == 1 else jnp.concatenate(cols, axis=-1)
    y = jnp.einsum("nyxkc,kco->nyxo", cols, kernel.reshape(k, c, cout).astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


class ModulatedDeformConv2d(nnx.Module):
    """DCNv2's ``DCN`` module: offsets and mask from an internal conv, then a deformable conv.

    ``conv_offset_mask`` (a zero-initialised Conv2d with the same kernel/stride/padding, no
    dilation, as DCNv2 builds it) gives 3*G*K channels: the first 2*G*K are the interleaved
    (dy, dx) offsets, the last G*K pass through a sigmoid to become the mask. ``kernel`` (HWIO)
    is initialised U(+-1/sqrt(in*kh*kw)) and ``bias`` to zero, as DCNv2 does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, deformable_groups: int = 1, *, rngs: nnx.Rngs):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.deformable_groups = deformable_groups
        kh, kw = self.kernel_size
        self.kernel = nnx.Param(torch_uniform(in_channels * kh * kw)(
            rngs.params(), (kh, kw, in_channels, out_channels)))
        self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32))
        n_om = deformable_groups * 3 * kh * kw
        self.conv_offset_mask = Conv2d(in_channels, n_om, self.kernel_size, self.stride,
                                       self.padding, bias=True, rngs=rngs)
        self.conv_offset_mask.kernel.set_value(jnp.zeros((kh, kw, in_channels, n_om), jnp.float32))
        self.conv_offset_mask.bias.set_value(jnp.zeros((n_om,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        om = self.conv_offset_mask(x)
        n_off = 2 * self.deformable_groups * self.kernel_size[0] * self.kernel_size[1]
        offset, mask = om[..., :n_off], jax.nn.sigmoid(om[..., n_off:])
        return deform_conv2d(x, offset, mask, self.kernel[...], self.bias[...], self.stride,
                             self.padding, self.dilation)


def isqrt_newton_schulz(a: jax.Array, num_iters: int) -> jax.Array:
    """A^(-1/2) by a fixed number of coupled Newton-Schulz iterations (Frobenius prescaling).

    Not converged for ill-conditioned A after few iterations; FastDeconv relies on exactly this
    truncated value, so do not replace it by an eigendecomposition.
    """
    dim = a.shape[-1]
    norm = jnp.sqrt(jnp.sum(jnp.square(a)))
    y = a / norm
    eye = jnp.eye(dim, dtype=a.dtype)
    z = eye
    for _ in range(num_iters):
        t = 0.5 * (3.0 * eye - z @ y)
        y = y @ t
        z = t @ z
    return z / jnp.sqrt(norm)


class FastDeconv(nnx.Module):
    """Network deconvolution (Ye et al., ICLR 2020; upstream ``FastDeconv``), groups=1, on NHWC.

    A conv whose input patches are whitened: in train mode (``use_running_average=False``, the
    default, as a fresh torch module) the patch mean mu and D = Cov^(-1/2) (``n_iter``
    Newton-Schulz steps) come from im2col patches sampled with stride ``sampling_stride*stride``
    and zero padding, pooled over the batch, and the running statistics (``nnx.BatchStat``
    ``running_mean`` (F,), ``running_deconv`` (F, F), F = k*k*block) move by ``momentum``; in
    eval mode (``module.eval()``) the running ones are used. Either way the whitening is folded
    into the kernel: W' = W D, b' = b - W' mu, then a plain conv.

    Patch columns are ordered (c, i, j), then regrouped into C/block blocks of F columns each
    (column f*(C/block) + g goes to block g), exactly as upstream. ``bias=False`` is taken as a
    zero bias (upstream would fail); ``freeze`` is not implemented.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=1,
                 dilation=1, groups: int = 1, bias: bool = True, eps: float = 1e-5,
                 n_iter: int = 5, momentum: float = 0.1, block: int = 64,
                 sampling_stride: int = 3, freeze: bool = False, freeze_iter: int = 100, *,
                 use_running_average: bool = False, rngs: nnx.Rngs):
        if groups != 1:
            raise NotImplementedError("FastDeconv: only groups=1 is implemented")
        if freeze:
            raise NotImplementedError("FastDeconv: freeze=True is not implemented")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.eps, self.n_iter, self.momentum = eps, n_iter, momentum
        if block > in_channels:
            block = in_channels
        elif in_channels % block:
            block = math.gcd(block, in_channels)
        self.block = block
        kh, kw = self.kernel_size
        self.num_features = kh * kw * block
        self.sampling_stride = sampling_stride * self.stride[0]
        self.use_running_average = use_running_average
        init = torch_uniform(in_channels * kh * kw)
        self.kernel = nnx.Param(init(rngs.params(), (kh, kw, in_channels, out_channels)))
        self.bias = nnx.Param(init(rngs.params(), (out_channels,))) if bias else None
        nf = self.num_features
        self.running_mean = nnx.BatchStat(jnp.zeros((nf,), jnp.float32))
        self.running_deconv = nnx.BatchStat(jnp.eye(nf, dtype=jnp.float32))

    def _patches(self, x: jax.Array) -> jax.Array:
        """Sampled patch matrix (M, F), rows = patches of all images, columns regrouped."""
        n, h, w, c = x.shape
        kh, kw = self.kernel_size
        s = self.sampling_stride
        if (kh, kw) == (1, 1):
            cols = x.reshape(-1, c)[::s * s]  # every s^2-th pixel of the flattened batch
        else:
            ph, pw = self.padding
            dh, dw = self.dilation
            xp = pad2d(x, (ph, ph, pw, pw))
            ho = (h + 2 * ph - dh * (kh - 1) - 1) // s + 1
            wo = (w + 2 * pw - dw * (kw - 1) - 1) // s + 1
            taps = [xp[:, i * dh:i * dh + (ho - 1) * s + 1:s, j * dw:j * dw + (wo - 1) * s + 1:s, :]
                    for i in range(kh) for j in range(kw)]
            cols = jnp.stack(taps, axis=-1).reshape(n * ho * wo, c * kh * kw)  # column c*K + t
        nb = c // self.block
        return cols.reshape(-1, self.num_features, nb).transpose(0, 2, 1).reshape(
            -1, self.num_features)

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        if use_running_average is None:
            use_running_average = self.use_running_average
        c = x.shape[-1]
        if c != self.in_channels:
            raise ValueError(f"FastDeconv expects {self.in_channels} channels, got {c}")
        nf, nb = self.num_features, c // self.block
        if use_running_average:
            mean = self.running_mean[...].astype(x.dtype)
            deconv = self.running_deconv[...].astype(x.dtype)
        else:
            cols = self._patches(x)
            mean = jnp.mean(cols, axis=0)
            xc = cols - mean
            cov = (xc.T @ xc) / xc.shape[0] + self.eps * jnp.eye(nf, dtype=x.dtype)
            deconv = isqrt_newton_schulz(cov, self.n_iter)
            m = self.momentum
            self.running_mean[...] = jax.lax.stop_gradient(
                (1 - m) * self.running_mean[...] + m * mean)
            self.running_deconv[...] = jax.lax.stop_gradient(
                (1 - m) * self.running_deconv[...] + m * deconv)
        kh, kw = self.kernel_size
        o = self.out_channels
        kernel = self.kernel[...].astype(x.dtype)
        w = kernel.transpose(3, 2, 0, 1).reshape(o, nf, nb).transpose(0, 2, 1).reshape(-1, nf)
        w = w @ deconv  # (O * C/block, F)
        b = -(w @ mean).reshape(o, nb).sum(axis=1)
        if self.bias is not None:
            b = b + self.bias[...].astype(x.dtype)
        w = w.reshape(o, nb, nf).transpose(0, 2, 1).reshape(o, c, kh, kw).transpose(2, 3, 1, 0)
        ph, pw = self.padding
        y = jax.lax.conv_general_dilated(
            x, w, window_strides=self.stride, padding=((ph, ph), (pw, pw)),
            rhs_dilation=self.dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + b


# --------------------------------------------------------------------------------------------
# CPU-specific lowerings used by some models (separately named; Conv2d itself is unchanged).


def _conv2d_valid_fwd_impl(x, kernel, stride, dilation):
    if _narrow_out_applies(kernel.shape, stride, 1):
        return conv_narrow_out(x, kernel, ((0, 0), (0, 0)), dilation)
    sh, sw = stride
    dh, dw = dilation
    kw = kernel.shape[1]
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(sh, sw), padding=((0, 0), (0, sw)), rhs_dilation=(dh, dw),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    wo = (x.shape[2] - dw * (kw - 1) - 1) // sw + 1
    return y[:, :, :wo, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d_valid_cpu(x, kernel, stride, dilation):
    return _conv2d_valid_fwd_impl(x, kernel, stride, dilation)


def _conv2d_valid_cpu_fwd(x, kernel, stride, dilation):
    return _conv2d_valid_fwd_impl(x, kernel, stride, dilation), (x, kernel)


def _conv2d_valid_cpu_bwd(stride, dilation, res, dy):
    x, kernel = res
    dx = _conv_input_grad(x, kernel, dy, stride, ((0, 0), (0, 0)), dilation, 1,
                          lambda x, k: _conv2d_valid_fwd_impl(x, k, stride, dilation))
    dk = conv_kernel_grad(x, dy, kernel.shape, stride, (0, 0), dilation)
    return dx, dk.astype(kernel.dtype)


_conv2d_valid_cpu.defvjp(_conv2d_valid_cpu_fwd, _conv2d_valid_cpu_bwd)


def conv2d_valid(x: jax.Array, kernel: jax.Array, stride=1, dilation=1) -> jax.Array:
    """An unpadded ('VALID') NHWC/HWIO conv, groups=1, no bias.

    On CPU it is computed with one zero column appended on the right and that extra output
    column cropped: the numbers are the same (the column only feeds the cropped output), but
    XLA:CPU runs a zero-padding conv on a much faster path than a padding-free one for some
    shapes (measured on the 2-core machine: 7x7 64->3 on 262x262, 1.0 s unpadded vs 0.05 s);
    its kernel gradient comes from matmuls (:func:`conv_kernel_grad`). Elsewhere
    the plain library conv.
    """
    stride, dilation = _pair(stride), _pair(dilation)
    if jax.default_backend() == "cpu":
        return _conv2d_valid_cpu(x, kernel, stride, dilation)
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=stride, padding=((0, 0), (0, 0)), rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_transpose_lib(x, kernel, stride, pads, dilation):
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=pads, lhs_dilation=stride,
        rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_transpose_cpu(x, kernel, stride, pads, dilation):
    """:class:`ConvTranspose2d`'s lhs-dilated conv (no bias) with a kernel gradient from one
    matmul per tap over the non-zero positions of the dilated input only (XLA:CPU's own kernel
    gradient of an lhs-dilated conv was about 1000x slower than the forward). The input
    gradient is the library's (a strided conv)."""
    return _conv_transpose_lib(x, kernel, stride, pads, dilation)


def _conv_transpose_cpu_fwd(x, kernel, stride, pads, dilation):
    return _conv_transpose_lib(x, kernel, stride, pads, dilation), (x, kernel)


def _conv_transpose_cpu_bwd(stride, pads, dilation, res, dy):
    x, kernel = res
    _, vjp_x = jax.vjp(lambda x: _conv_transpose_lib(x, kernel, stride, pads, dilation), x)
    (dx,) = vjp_x(dy)
    kh, kw, cin, cout = kernel.shape
    n, h, w, _ = x.shape
    ho, wo = dy.shape[1:3]

    def axis_range(i, d, lo, s, size, out):
        # input rows a whose dilated position lo + s*a is read by tap i at output row
        # y = lo + s*a - i*d, 0 <= y < out
        a0 = max(0, -((lo - i * d) // s))  # ceil((i*d - lo) / s)
        a1 = min(size - 1, (out - 1 + i * d - lo) // s)
        return a0, a1, lo + s * a0 - i * d

    taps = []
    for i in range(kh):
        a0, a1, y0 = axis_range(i, dilation[0], pads[0][0], stride[0], h, ho)
        for j in range(kw):
            b0, b1, x0 = axis_range(j, dilation[1], pads[1][0], stride[1], w, wo)
            if a1 < a0 or b1 < b0:
                taps.append(jnp.zeros((cin, cout), kernel.dtype))
                continue
            na, nb = a1 - a0 + 1, b1 - b0 + 1
            xs = x[:, a0:a1 + 1, b0:b1 + 1, :].reshape(-1, cin)
            gs = jax.lax.slice(dy, (0, y0, x0, 0),
                               (n, y0 + stride[0] * (na - 1) + 1, x0 + stride[1] * (nb - 1) + 1,
                                cout), (1, stride[0], stride[1], 1)).reshape(-1, cout)
            taps.append(xs.T @ gs)
    dk = jnp.stack(taps).reshape(kernel.shape)
    return dx, dk.astype(kernel.dtype)


conv_transpose_cpu.defvjp(_conv_transpose_cpu_fwd, _conv_transpose_cpu_bwd)
