"""Native CPU kernels for what XLA:CPU lowers poorly, called through the XLA FFI.

The C++ source ships with the package (``flaxrestore/xla_cpu/native/*.cc``) and is compiled on first use
with the system C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``) against the XLA FFI
headers that jaxlib installs; the library is cached under ``$FLAXRESTORE_CACHE_DIR`` (default
``~/.cache/flaxrestore``; the system's temporary directory if that cannot be written), keyed by
the source, the compiler's version, the flags, jaxlib's version and the CPU. It is built for the
machine it runs on (``-march=native``).

When no compiler is found or the build fails, :func:`available` is False, a warning says why
(once per process), and callers use their pure-JAX path: the results are the same to float
rounding, only slower. ``FLAXRESTORE_NATIVE=0`` turns the kernels off.

Kernels:

* :func:`depthwise_conv` - a stride-1 depthwise convolution (forward and input gradient), each
  output row accumulated tap by tap while it is in cache.
* :func:`depthwise_kernel_grad` - the kernel gradient of a stride-1 depthwise convolution in one
  pass over memory. XLA:CPU computes it as one reduction per kernel tap over a materialized
  shifted copy of the input: at 4x128x128x288, 3x3, 108 ms against 19 ms here (2-core AVX2);
  it dominated Restormer's and DarkIR's training steps.
* :func:`windows` - the shifted windows of an image that a conv's taps read, side by side on
  the channel axis (im2col, NHWC), for the kernel gradients of dense convs as one matmul
  (:func:`flaxrestore.layers.conv_kernel_grad`). XLA:CPU builds them as a concatenation of
  slices at about half the speed (2x128x128x96, 3x3: 27 ms against 14 ms).
* :func:`bilinear_sample` and :func:`bilinear_sample_grad` - bilinear samples of an image at
  float positions (zero outside, DCNv2's rule) and their gradients, for the deformable conv
  (:func:`flaxrestore.layers.deform_conv2d`). XLA:CPU lowers the sampling as element-wise
  gathers and its gradient as a scatter; AECR-Net's 64x64x256 deformable conv (9 taps) spent
  about 134 ms per call in them.
* :func:`winograd_input` and :func:`winograd_output` - the input and output transforms of a
  Winograd F(2x2, 3x3) conv (:func:`flaxrestore.layers.winograd_conv3x3`), which XLA fuses into
  the conv's consumers at several times their own cost.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

NATIVE_ENV = "FLAXRESTORE_NATIVE"
CACHE_ENV = "FLAXRESTORE_CACHE_DIR"
CXX_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_SOURCES = ("bilinear.cc", "depthwise.cc", "windows.cc", "winograd.cc")
_HEADERS = ("parallel.h",)
_TARGETS = {"flaxrestore_depthwise_conv": "FlaxrestoreDepthwiseConv",
            "flaxrestore_depthwise_kernel_grad": "FlaxrestoreDepthwiseKernelGrad",
            "flaxrestore_windows": "FlaxrestoreWindows",
            "flaxrestore_bilinear_sample": "FlaxrestoreBilinearSample",
            "flaxrestore_bilinear_sample_grad": "FlaxrestoreBilinearSampleGrad",
            "flaxrestore_winograd_input": "FlaxrestoreWinogradInput",
            "flaxrestore_winograd_output": "FlaxrestoreWinogradOutput"}

_lock = threading.Lock()
_state: dict = {"ok": None, "error": None, "path": None}


def _turned_off() -> bool:
    return os.environ.get(NATIVE_ENV, "1").strip().lower() in ("0", "false", "no", "off")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """The CPU's model and feature flags (a library built with -march=native runs only there)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        import platform

        return platform.processor() + platform.machine()


def cache_dir() -> str:
    """Where compiled kernels are kept (``$FLAXRESTORE_CACHE_DIR``, else ~/.cache/flaxrestore)."""
    base = os.environ.get(CACHE_ENV)
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "flaxrestore")
    return os.path.join(base, "native")


def _source_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "native")


def _build(compiler: str) -> str:
    import jaxlib

    sources = [os.path.join(_source_dir(), s) for s in _SOURCES]
    digest = hashlib.sha256()
    for path in sources + [os.path.join(_source_dir(), h) for h in _HEADERS]:
        with open(path, "rb") as f:
            digest.update(f.read())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    # the compiler's identity is its --version text (not its path)
    for part in (version, " ".join(CXX_FLAGS), jaxlib.__version__, _cpu_signature()):
        digest.update(part.encode())
    out_dir = cache_dir()
    try:
        os.makedirs(out_dir, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(out_dir)
    except OSError:
        out_dir = os.path.join(tempfile.gettempdir(), f"flaxrestore-native-{os.getuid()}")
        os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, f"flaxrestore_native_{digest.hexdigest()[:20]}.so")
    if os.path.exists(target):
        return target
    # build under a temporary name, then rename: concurrent processes never load a partial file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [compiler, *CXX_FLAGS, f"-I{jax.ffi.include_dir()}", *sources, "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _load() -> None:
    import ctypes

    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    path = _build(compiler)
    lib = ctypes.CDLL(path)
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    _state["path"] = path


def available() -> bool:
    """True when the native kernels are built, loaded and registered with XLA (CPU only).

    Builds them on the first call of the process (a few seconds; then cached on disk). False
    with ``FLAXRESTORE_NATIVE=0``, or when the build fails (a warning gives the reason;
    :func:`load_error` returns it), or in a process whose default backend is not the CPU. This
    is not the choice of lowering (that is :func:`flaxrestore.lowering.per_platform`, per compile
    target): a TPU/GPU process traces the CPU side of every ``per_platform`` too, but never
    compiles it for a CPU, so it builds no C++ library for it and traces the pure-JAX form."""
    if _turned_off() or jax.default_backend() != "cpu":
        return False
    with _lock:
        if _state["ok"] is None:
            try:
                _load()
                _state["ok"] = True
            except Exception as e:  # noqa: BLE001 - any failure means: use the JAX path
                _state["ok"], _state["error"] = False, f"{type(e).__name__}: {e}"
                warnings.warn(f"flaxrestore: native CPU kernels unavailable, using the slower "
                              f"pure-JAX path ({_state['error']})", RuntimeWarning, stacklevel=2)
    return bool(_state["ok"])


def load_error() -> str | None:
    """Why the native kernels could not be loaded (None if they were, or were not tried)."""
    return _state["error"]


def library_path() -> str | None:
    """The loaded shared library (None until :func:`available` succeeded)."""
    return _state["path"]


def depthwise_conv(x: jax.Array, kernel: jax.Array, out_hw, top_left=(0, 0),
                   dilation=(1, 1)) -> jax.Array:
    """A stride-1 depthwise conv (no bias) of NHWC ``x`` with ``kernel`` (kh, kw, 1, C):
    ``y[b, y, x, c] = sum over i, j of x[b, y + i*dh - pt, x + j*dw - pl, c] * kernel[i, j, 0, c]``
    for an output of ``out_hw`` (zero outside x). With ``top_left = padding`` and the matching
    output size this is a zero-padded conv; the input gradient of one is another (the flipped
    kernel, ``top_left = dilation * (k - 1) - padding``). float32 only; requires
    :func:`available`."""
    kh, kw = kernel.shape[:2]
    b, c = x.shape[0], x.shape[-1]
    if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        raise TypeError(f"depthwise_conv takes float32, got {x.dtype} and {kernel.dtype}")
    if kernel.shape != (kh, kw, 1, c):
        raise ValueError(f"kernel has shape {kernel.shape}; expected ({kh}, {kw}, 1, {c}) for "
                         f"input {x.shape}")
    call = jax.ffi.ffi_call("flaxrestore_depthwise_conv",
                            jax.ShapeDtypeStruct((b, *out_hw, c), jnp.float32),
                            vmap_method="sequential")
    return call(x, kernel, pt=np.int64(top_left[0]), pl=np.int64(top_left[1]),
                dh=np.int64(dilation[0]), dw=np.int64(dilation[1]))


def depthwise_kernel_grad(x: jax.Array, dy: jax.Array, kernel_hw, padding=(0, 0),
                          dilation=(1, 1)) -> jax.Array:
    """The kernel gradient (kh, kw, 1, C) of a stride-1 depthwise conv with zero padding:
    ``dk[i, j, 0, c] = sum over b, y, x of x[b, y + i*dh - ph, x + j*dw - pw, c] * dy[b, y, x, c]``.

    ``x`` is the conv's NHWC input, ``dy`` the gradient of its output; float32 only. Requires
    :func:`available`."""
    kh, kw = kernel_hw
    ph, pw = padding
    dh, dw = dilation
    b, h, w, c = x.shape
    ho, wo = h + 2 * ph - dh * (kh - 1), w + 2 * pw - dw * (kw - 1)
    if x.dtype != jnp.float32 or dy.dtype != jnp.float32:
        raise TypeError(f"depthwise_kernel_grad takes float32, got {x.dtype} and {dy.dtype}")
    if dy.shape != (b, ho, wo, c):
        raise ValueError(f"dy has shape {dy.shape}; a {kh}x{kw} depthwise conv of {x.shape} "
                         f"with padding {padding} and dilation {dilation} gives {(b, ho, wo, c)}")
    call = jax.ffi.ffi_call("flaxrestore_depthwise_kernel_grad",
                            jax.ShapeDtypeStruct((kh, kw, 1, c), jnp.float32),
                            vmap_method="sequential")
    return call(x, dy, ph=np.int64(ph), pw=np.int64(pw), dh=np.int64(dh), dw=np.int64(dw))


def windows(src: jax.Array, kernel_hw, out_hw, offset=(0, 0), step=(1, 1)) -> jax.Array:
    """The windows of NHWC ``src`` that the taps of a stride-1 conv read, side by side on the
    channel axis: (B, *out_hw, kh*kw*C) with
    ``out[b, y, x, (i*kw + j)*C + c] = src[b, y + oy + i*sy, x + ox + j*sx, c]`` (zero outside
    ``src``), ``offset = (oy, ox)``, ``step = (sy, sx)`` (negative steps run backwards). float32
    only; requires :func:`available`."""
    kh, kw = kernel_hw
    b, c = src.shape[0], src.shape[-1]
    if src.dtype != jnp.float32:
        raise TypeError(f"windows takes float32, got {src.dtype}")
    if src.ndim != 4 or kh < 1 or kw < 1:
        raise ValueError(f"windows needs an NHWC array and a kernel size >= 1, got {src.shape} "
                         f"and {kernel_hw}")
    call = jax.ffi.ffi_call("flaxrestore_windows",
                            jax.ShapeDtypeStruct((b, *out_hw, kh * kw * c), jnp.float32),
                            vmap_method="sequential")
    return call(src, kh=np.int64(kh), kw=np.int64(kw), oy=np.int64(offset[0]),
                ox=np.int64(offset[1]), sy=np.int64(step[0]), sx=np.int64(step[1]))


def _check_points(name: str, src: jax.Array, py: jax.Array, px: jax.Array) -> None:
    if src.dtype != jnp.float32 or py.dtype != jnp.float32 or px.dtype != jnp.float32:
        raise TypeError(f"{name} takes float32, got {src.dtype}, {py.dtype} and {px.dtype}")
    if src.ndim != 4 or py.ndim != 2 or py.shape != px.shape or py.shape[0] != src.shape[0]:
        raise ValueError(f"{name} needs an NHWC image and (N, P) positions for the same N, got "
                         f"{src.shape}, {py.shape} and {px.shape}")


def bilinear_sample(src: jax.Array, py: jax.Array, px: jax.Array) -> jax.Array:
    """Bilinear samples (N, P, C) of NHWC ``src`` at rows ``py`` and columns ``px`` (N, P):
    zero for a point outside ``-1 < py < H``, ``-1 < px < W``, and each of a point's four
    neighbours outside the image contributes zero (DCNv2's rule). float32 only; requires
    :func:`available`."""
    _check_points("bilinear_sample", src, py, px)
    call = jax.ffi.ffi_call("flaxrestore_bilinear_sample",
                            jax.ShapeDtypeStruct((src.shape[0], py.shape[1], src.shape[3]),
                                                 jnp.float32), vmap_method="sequential")
    return call(src, py, px)


def bilinear_sample_grad(src: jax.Array, py: jax.Array, px: jax.Array, g: jax.Array):
    """The gradients ``(dsrc, dpy, dpx)`` of :func:`bilinear_sample` for the output cotangent
    ``g`` (N, P, C): the bilinear weights scattered back onto the image, and the positions'
    derivatives (floor counts as constant). float32 only; requires :func:`available`."""
    _check_points("bilinear_sample_grad", src, py, px)
    if g.dtype != jnp.float32 or g.shape != (src.shape[0], py.shape[1], src.shape[3]):
        raise ValueError(f"bilinear_sample_grad: g has {g.dtype} {g.shape}; expected float32 "
                         f"{(src.shape[0], py.shape[1], src.shape[3])}")
    call = jax.ffi.ffi_call("flaxrestore_bilinear_sample_grad",
                            (jax.ShapeDtypeStruct(src.shape, jnp.float32),
                             jax.ShapeDtypeStruct(py.shape, jnp.float32),
                             jax.ShapeDtypeStruct(px.shape, jnp.float32)),
                            vmap_method="sequential")
    return call(src, py, px, g)


def winograd_input(x: jax.Array, padding, tiles) -> jax.Array:
    """The transformed 4x4 input windows (16, N*th*tw, C) of a Winograd F(2x2, 3x3) conv of NHWC
    ``x`` with zero ``padding = (ph, pw)`` and ``tiles = (th, tw)`` 2x2 output tiles:
    ``v[a*4 + b, (n*th + ty)*tw + tx, c] = sum over i, j of BT[a, i] * BT[b, j] *
    x[n, 2*ty - ph + i, 2*tx - pw + j, c]`` (x zero outside), BT as
    ``flaxrestore.layers._WINO_BT``. float32 only; requires :func:`available`."""
    if x.dtype != jnp.float32:
        raise TypeError(f"winograd_input takes float32, got {x.dtype}")
    if x.ndim != 4 or min(tiles) < 1:
        raise ValueError(f"winograd_input needs an NHWC array and >= 1 tile, got {x.shape}, "
                         f"{tiles}")
    th, tw = tiles
    call = jax.ffi.ffi_call("flaxrestore_winograd_input",
                            jax.ShapeDtypeStruct((16, x.shape[0] * th * tw, x.shape[3]),
                                                 jnp.float32), vmap_method="sequential")
    return call(x, ph=np.int64(padding[0]), pw=np.int64(padding[1]), th=np.int64(th),
                tw=np.int64(tw))


def winograd_output(m: jax.Array, out_shape) -> jax.Array:
    """The output (N, Ho, Wo, O) of a Winograd F(2x2, 3x3) conv from its 16 products ``m``
    (16, N*th*tw, O), th = ceil(Ho/2), tw = ceil(Wo/2):
    ``y[n, 2*ty + p, 2*tx + q, o] = sum over a, b of AT[p, a] * AT[q, b] * m[a*4 + b, t, o]``,
    cropped to Ho x Wo; AT as ``flaxrestore.layers._WINO_AT``. float32 only; requires
    :func:`available`."""
    n, ho, wo, o = out_shape
    tiles = n * (-(-ho // 2)) * (-(-wo // 2))
    if m.dtype != jnp.float32:
        raise TypeError(f"winograd_output takes float32, got {m.dtype}")
    if m.shape != (16, tiles, o):
        raise ValueError(f"winograd_output: products of shape {m.shape} for an output "
                         f"{tuple(out_shape)} need (16, {tiles}, {o})")
    call = jax.ffi.ffi_call("flaxrestore_winograd_output",
                            jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32),
                            vmap_method="sequential")
    return call(m)
