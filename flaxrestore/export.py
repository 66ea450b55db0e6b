"""Exporting a model for deployment: ONNX and StableHLO files of the whole test-time protocol.

``export(module, "model.onnx", format="onnx", height=256, width=256)`` writes one function of an
NHWC float32 image batch in [0, 1] that does everything ``flaxrestore.restore`` does around the
network for one image (no tiling, no ensemble): the extra inputs computed from the image
(SNR-Aware's SNR map), padding at the bottom/right to the family's multiple with its padding mode,
the network, the restored image picked from its outputs (MPRNet's first stage), the crop back
and the clamp to [0, 1]. The file's input is ``image`` (B, H, W, C) float32, its output
``restored`` (B, H, W, C_out) float32; ``dtype`` (bfloat16, float16) is the precision of the
weights and of the computation inside, as ``restore(dtype=...)`` runs it.

Formats:

* ``onnx``: converted by jax2onnx, checked with onnxruntime (CPU).
* ``stablehlo``: ``jax.export`` serialised (``jax.export.deserialize(open(f, 'rb').read())``
  in any later JAX within its compatibility window, then ``.call(image)``), lowered for
  ``platforms`` (default CPU, CUDA and TPU in one file).

Sizes: fixed (``height``, ``width``, ``batch``, default batch 1), or ``dynamic=True``: batch,
height and width all symbolic.

Every export traces the *accelerator path* of :mod:`flaxrestore.lowering` (library convs, no
XLA:CPU rewrites or native kernels): what a GPU/TPU compiles is what any runtime can run, and a
file holds no CPU-only custom call (``jax.export`` refuses custom calls without a compatibility
guarantee in any case).

Dynamic height/width use JAX's symbolic shapes, with the constraint H, W >= the family's multiple
(the padding reflects up to multiple - 1 rows, see :func:`pad_to_multiple`); where a network or a
converter needs concrete sizes, ``export`` says where (the file and line of the model code) and
what to do instead.

Each file is checked as it is written: loaded back by its runtime, run on random images and
compared with the Flax model restoring the same images by ``flaxrestore.restore`` (its own
host-side padding and extra inputs, the lowering this process compiles for). The difference is
``max |exported - flax| / max |flax|``; the limit is ``TOLERANCE[dtype]``. A file that fails its
check is deleted and :class:`ExportError` raised.

For ONNX, FFTs (DarkIR's FreMLP) are computed as products with DFT matrices and their complex
intermediates as pairs of real arrays (:func:`real_ffts`; jax2onnx's own FFT conversion handles
one-axis transforms of complex-typed inputs only). A primitive that jax2onnx cannot convert is named with the model
line that produced it before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
import traceback
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxrestore import layers, lowering, models

FORMATS = ("onnx", "stablehlo")
DTYPES = ("float32", "bfloat16", "float16")
SUFFIXES = {"onnx": ".onnx", "stablehlo": ".stablehlo"}
# max |exported - flax| / max |flax| allowed by the check, always against the Flax model in
# float32 (the model as trained). float32: 1e-4. A half-precision file is judged by how far its
# rounding (8 significant bits for bfloat16, 11 for float16, in every layer) takes the image
# from the float32 model: measured 6e-4 (float16, Restormer, ONNX and StableHLO) and 5e-3
# (bfloat16, Restormer and AECR-Net, StableHLO) on the reduced-width test models; the limits
# leave room for the depth of the released widths.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
ONNX_OPSET = 23
INPUT_NAME, OUTPUT_NAME = "image", "restored"


class ExportError(Exception):
    """An export that cannot be written or that failed its check; the message says why."""


@dataclasses.dataclass
class ExportReport:
    """What :func:`export` wrote and how it was checked."""

    path: str
    format: str
    family: str
    dtype: str
    input_shape: tuple            # e.g. ('B', 256, 256, 3) or ('B', 'H', 'W', 3)
    output_channels: int
    size_bytes: int
    export_seconds: float
    checks: list[dict]            # per checked image shape: max_abs, relative, runtime, seconds
    tolerance: float
    platforms: tuple[str, ...] = ()

    @property
    def relative(self) -> float:
        return max(c["relative"] for c in self.checks)

    def lines(self) -> list[str]:
        shape = "x".join(str(d) for d in self.input_shape)
        out = [f"wrote {self.path}: {self.family} as {self.format}, {self.size_bytes / 2**20:.1f} MiB, "
               f"{self.export_seconds:.1f} s",
               f"  input '{INPUT_NAME}' {shape} float32 (NHWC, [0, 1]); output '{OUTPUT_NAME}' "
               f"with {self.output_channels} channels; compute in {self.dtype}"
               + (f"; platforms {', '.join(self.platforms)}" if self.platforms else "")]
        for c in self.checks:
            out.append(f"  check {c['shape']}: {c['runtime']} vs flaxrestore.restore: max |diff| "
                       f"{c['max_abs']:.3g}, relative {c['relative']:.3g} (limit "
                       f"{self.tolerance:g}) OK")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


# ------------------------------------------------------------------------------ the function


def pad_to_multiple(a: jax.Array, multiple: int, mode: str) -> jax.Array:
    """``a`` (NHWC) padded bottom/right to a multiple of ``multiple`` with torch pad ``mode``.

    Concrete sizes: exactly ``restore.pad_to_multiple``. Symbolic sizes: jnp.pad cannot reflect by
    an amount it cannot bound, so the image is padded by multiple - 1 (a constant) and cut to
    multiple * ceil(H / multiple): the first p rows of any reflect/replicate/zero padding are the
    same whatever the total, so both give the same numbers.
    """
    h, w = a.shape[1], a.shape[2]
    hp = multiple * ((h + multiple - 1) // multiple)
    wp = multiple * ((w + multiple - 1) // multiple)
    np_mode = layers._PAD_MODES[mode]
    if isinstance(h, int) and isinstance(w, int):
        if hp == h and wp == w:
            return a
        return jnp.pad(a, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)), mode=np_mode)
    r = multiple - 1
    padded = jnp.pad(a, ((0, 0), (0, r), (0, r), (0, 0)), mode=np_mode)
    return jax.lax.slice(padded, (0, 0, 0, 0), (a.shape[0], hp, wp, a.shape[3]))


def protocol_function(module: nnx.Module, *, family: str | None = None,
                      protocol: models.Protocol | None = None,
                      dtype: str = "float32") -> Callable[[jax.Array], jax.Array]:
    """``f(image) -> restored``: the model with its test-time protocol, a pure JAX function of an
    NHWC float32 batch (weights closed over, evaluation mode), float32 out.

    The same steps as ``flaxrestore.restore`` for one untiled image: extra inputs from the
    unpadded float32 image, padding, cast to ``dtype``, network, image output, float32, crop,
    clamp if the protocol's scripts clamp.
    """
    protocol = protocol or _protocol(module, family)
    graphdef, state = nnx.split(module)
    view = nnx.merge(graphdef, state)  # an eval-mode view sharing the weights
    view.eval()
    graphdef, state = nnx.split(view)
    cast = jnp.dtype(dtype)
    if dtype != "float32":
        state = jax.tree.map(lambda a: a.astype(cast) if jnp.issubdtype(a.dtype, jnp.floating)
                             else a, state)

    def restored(image):
        h, w = image.shape[1], image.shape[2]
        inputs = protocol.inputs(image.astype(jnp.float32))
        inputs = [pad_to_multiple(a, protocol.multiple, protocol.pad_mode).astype(cast)
                  for a in inputs]
        net = nnx.merge(graphdef, state)
        out = protocol.image(net(*inputs)).astype(jnp.float32)
        out = jax.lax.slice(out, (0, 0, 0, 0), (out.shape[0], h, w, out.shape[3]))
        return jnp.clip(out, 0.0, 1.0) if protocol.clamp else out

    return restored


def _protocol(module: nnx.Module, family: str | None) -> models.Protocol:
    return models.protocol(family) if family is not None else models.protocol(module)


def _family(module: nnx.Module, family: str | None) -> str:
    """The registry family of ``module``'s class, else its class name (for messages)."""
    if family:
        return family
    from flaxrestore.restore import family_of

    try:
        return family_of(module)
    except ValueError:
        return type(module).__name__


# ------------------------------------------------- FFTs for ONNX: complex numbers as real pairs


def _sub_jaxprs(params: dict):
    """(jaxpr, consts) of every jaxpr held in an equation's params."""
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr, item.consts
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item, ()


def _walk(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub, _ in _sub_jaxprs(eqn.params):
            yield from _walk(sub)


def _has_fft(jaxpr) -> bool:
    return any(e.primitive.name == "fft" for e in _walk(jaxpr))


class _Pair(tuple):
    """A complex array as its real and imaginary parts (two real arrays)."""

    re = property(lambda self: self[0])
    im = property(lambda self: self[1])


def _angles(n_out: int, n_in: int, n: int) -> np.ndarray:
    """2 pi (k t mod n) / n for k < n_out, t < n_in, in float64 (exact integer products)."""
    k = np.arange(n_out, dtype=np.int64)[:, None]
    t = np.arange(n_in, dtype=np.int64)[None, :]
    return 2.0 * np.pi * ((k * t) % n) / n


def _const(a: np.ndarray, dtype) -> jax.Array:
    return jnp.asarray(a.astype(np.float32)).astype(dtype)


def _dft_last(x, kind: str, n: int):
    """One DFT along the last axis as matrix products (x: real array or _Pair).

    'rfft': real (..., n) -> pair (..., n//2+1); 'fft'/'ifft': pair (..., n) -> pair;
    'irfft': pair (..., n//2+1) -> real (..., n), numpy's normalisation (1/n on the inverse)."""
    if kind == "rfft":
        a = _angles(n // 2 + 1, n, n)  # (k, t)
        return _Pair((x @ _const(np.cos(a).T, x.dtype), -(x @ _const(np.sin(a).T, x.dtype))))
    re, im = x
    if kind == "irfft":
        m = n // 2 + 1
        if re.shape[-1] != m:
            raise ExportError(f"irfft of length {n} over {re.shape[-1]} bins (expected {m})")
        a = _angles(m, n, n)  # (k, t)
        w = np.full(m, 2.0)
        w[0] = 1.0
        if n % 2 == 0:
            w[-1] = 1.0  # the Nyquist bin counts once; sin() is 0 there and at k = 0
        c = (w[:, None] * np.cos(a)) / n
        s = (w[:, None] * np.sin(a)) / n
        return re @ _const(c, re.dtype) - im @ _const(s, re.dtype)
    a = _angles(n, n, n)
    c, s = _const(np.cos(a), re.dtype), _const(np.sin(a), re.dtype)  # symmetric in (k, t)
    if kind == "fft":
        return _Pair((re @ c + im @ s, im @ c - re @ s))
    return _Pair(((re @ c - im @ s) / n, (im @ c + re @ s) / n))


def _dft_axis(x, kind: str, n: int, axis: int):
    """A complex DFT along ``axis`` (negative, not the last) as a matrix product from the left:
    (n, n) @ (..., n, last) transforms the second-to-last axis without moving it."""
    if axis != -2:
        raise ExportError(f"an FFT over more than the last two axes (axis {axis})")
    re, im = x
    a = _angles(n, n, n)
    c, s = _const(np.cos(a), re.dtype), _const(np.sin(a), re.dtype)
    if kind == "fft":
        return _Pair((c @ re + s @ im, c @ im - s @ re))
    return _Pair(((c @ re - s @ im) / n, (c @ im + s @ re) / n))


def _fft(x, fft_type, lengths: Sequence[int]):
    """lax.fft over the trailing axes, one axis at a time (the n-D DFT is separable; the real
    axis is the last, transformed first by rfft and last by irfft, as numpy's rfftn does)."""
    T = jax.lax.FftType
    kind = {T.FFT: "fft", T.IFFT: "ifft", T.RFFT: "rfft", T.IRFFT: "irfft"}[T(fft_type)]
    k = len(lengths)
    if kind == "rfft":
        x = _dft_last(x, "rfft", lengths[-1])
        for i in range(k - 1):
            x = _dft_axis(x, "fft", lengths[i], i - k)
        return x
    if kind == "irfft":
        for i in range(k - 1):
            x = _dft_axis(x, "ifft", lengths[i], i - k)
        return _dft_last(x, "irfft", lengths[-1])
    for i in range(k - 1):
        x = _dft_axis(x, kind, lengths[i], i - k)
    return _dft_last(x, kind, lengths[-1])


_CALLS = ("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call",
          "custom_vjp_call")


def _is_noop_pad(eqn) -> bool:
    return eqn.primitive.name == "pad" and all(
        not any(c) for c in eqn.params["padding_config"])


def _is_complex(v) -> bool:
    dtype = getattr(getattr(v, "aval", None), "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating)


def _complex_rule(eqn, vals):
    """The outputs of ``eqn`` when complex numbers are _Pairs, for the primitives around FFTs."""
    name, p = eqn.primitive.name, eqn.params
    x = vals[0] if vals else None
    if name == "fft":
        return _fft(x, p["fft_type"], p["fft_lengths"])
    if name == "real":
        return x.re
    if name == "imag":
        return x.im
    if name == "complex":
        return _Pair((vals[0], vals[1]))
    if name == "transpose":
        return _Pair(tuple(jax.lax.transpose(a, p["permutation"]) for a in x))
    if name == "convert_element_type":
        base = jnp.finfo(p["new_dtype"]).dtype
        if isinstance(x, _Pair):
            return _Pair((x.re.astype(base), x.im.astype(base)))
        x = jnp.asarray(x).astype(base)
        return _Pair((x, jnp.zeros_like(x)))
    if name == "pad":
        value = vals[1] if isinstance(vals[1], _Pair) else _Pair((vals[1], 0 * vals[1]))
        return _Pair(tuple(jax.lax.pad(a, v.astype(a.dtype), p["padding_config"])
                           for a, v in zip(x, value)))
    raise NotImplementedError


def _live_eqns(jaxpr):
    """The equations that the outputs need (a padding of nothing needs only its operand)."""
    var = jax.extend.core.Var
    live = {v for v in jaxpr.outvars if isinstance(v, var)}
    keep = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in live for v in eqn.outvars if isinstance(v, var)):
            keep.append(eqn)
            used = eqn.invars[:1] if _is_noop_pad(eqn) else eqn.invars
            live.update(v for v in used if isinstance(v, var))
    return keep[::-1]


def _eval_real(jaxpr, consts, *args):
    """Evaluates ``jaxpr`` into the current trace with every complex value as a _Pair and FFTs
    as DFT matrix products (see :func:`real_ffts`). Calls are inlined (jit, remat; custom
    derivatives do not matter for inference), equations no output needs are dropped, everything
    real is bound unchanged."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in _live_eqns(jaxpr):
        if _is_noop_pad(eqn):  # its padding value may not have been computed (see _live_eqns)
            env[eqn.outvars[0]] = read(eqn.invars[0])
            continue
        subs = list(_sub_jaxprs(eqn.params))
        vals = [read(v) for v in eqn.invars]
        if eqn.primitive.name in _CALLS and len(subs) == 1:
            sub, sub_consts = subs[0]
            outs = _eval_real(sub, sub_consts, *vals[len(vals) - len(sub.invars):])
        elif eqn.primitive.name == "fft" or any(isinstance(a, _Pair) for a in vals) or \
                any(_is_complex(v) for v in eqn.outvars):
            try:
                outs = [_complex_rule(eqn, vals)]
            except NotImplementedError:
                raise ExportError(
                    f"'{eqn.primitive.name}' on complex numbers at {_eqn_location(eqn)}: only "
                    "FFTs, real/imag/complex, transposes and paddings of complex arrays are "
                    "rewritten for ONNX") from None
        elif any(_has_fft(sub) for sub, _ in subs):
            raise ExportError(f"an FFT inside '{eqn.primitive.name}' at {_eqn_location(eqn)} "
                              "cannot be rewritten for ONNX")
        else:
            outs = eqn.primitive.bind(*vals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def real_ffts(fn: Callable) -> Callable:
    """``fn`` (one array in, one real array out) with its FFTs computed as DFT matrix products
    and its complex intermediates as pairs of real arrays.

    Hand-written because no library does it: ONNX has only a one-axis DFT, and jax2onnx (0.17.1)
    converts a 1-D FFT of a complex-typed input only; its RFFT and lax.complex give (..., 2) real
    tensors that its FFT, IRFFT and Transpose then refuse or mistype ("Only 1D FFT with at most
    one explicit length is supported", "FFT/IFFT require complex64 or complex128 input",
    onnxruntime: "Type (tensor(complex64)) ... does not match expected type (tensor(float))").
    A DFT as a product with cos/sin matrices is exact up to float32 rounding and needs no complex
    type, at O(n) multiply-adds per output instead of O(log n): for fixed image sizes only.
    """
    def real(x):
        closed = jax.make_jaxpr(fn)(x)
        (out,) = _eval_real(closed.jaxpr, closed.consts, x)
        return out

    return real


def _model_frame(frames) -> str | None:
    """'file:line in function: `code`' of the innermost frame of model code among ``frames``
    (outermost first): flaxrestore's own files other than this one, or a caller's file outside
    the installed libraries (a model class of the user's)."""
    here = os.path.abspath(__file__)
    root = os.path.dirname(here)
    best = None
    for fname, line, func, code in frames:
        path = os.path.abspath(fname)
        ours = path.startswith(root + os.sep)
        library = "site-packages" in path.split(os.sep) or path.startswith(sys.prefix) or \
            path.startswith(getattr(sys, "base_prefix", sys.prefix)) or fname.startswith("<")
        if path == here or (library and not ours):
            continue
        shown = os.path.relpath(path, os.path.dirname(root)) if ours else path
        best = f"{shown}:{line} in {func}" + (f": `{code.strip()}`" if code else "")
    return best


def _eqn_location(eqn) -> str:
    tb = getattr(eqn.source_info, "traceback", None)
    if tb is None:
        return "(no source location)"
    frames = []
    for f in reversed(tb.frames):  # outermost first, as traceback.extract_tb gives them
        code = None
        try:
            import linecache

            code = linecache.getline(f.file_name, f.line_num)
        except Exception:  # noqa: BLE001 - a location without its code line is still useful
            pass
        frames.append((f.file_name, f.line_num, f.function_name, code))
    return _model_frame(frames) or "(no source line outside the libraries)"


def _jax2onnx():
    try:
        import jax2onnx
        from jax2onnx.plugins import plugin_system
    except ModuleNotFoundError as e:
        raise ExportError(
            f"ONNX export needs the export extra ({e.name} is missing): pip install "
            "'flaxrestore[export]' && pip install --no-deps jax2onnx==0.17.1 (jax2onnx's "
            "metadata pins orbax-checkpoint < 0.11.37, which this project's 0.12.8 excludes; it "
            "does not import orbax)") from None
    return jax2onnx, plugin_system


def _onnx_blockers(jaxpr, plugin_system) -> list[str]:
    """Primitives jax2onnx has no conversion for, each with the model line it comes from."""
    registry = plugin_system.PLUGIN_REGISTRY
    seen, out = set(), []
    for eqn in _walk(jaxpr):
        name = eqn.primitive.name
        if name in registry or name == "fft":
            continue
        where = _eqn_location(eqn)
        if (name, where) not in seen:
            seen.add((name, where))
            out.append(f"'{name}' at {where}")
    return out


# ------------------------------------------------------------------------------------ export


def _input_spec(protocol, channels: int, height, width, dynamic: bool, batch: int | None):
    m = protocol.multiple
    if dynamic:
        shape = jax.export.symbolic_shape(f"B, H, W, {channels}",
                                          constraints=(f"H >= {m}", f"W >= {m}"))
        label = ("B", "H", "W", channels)
    else:
        shape = label = (batch, height, width, channels)
    return jax.ShapeDtypeStruct(shape, jnp.float32), label


def _check_shapes(protocol, channels, height, width, dynamic, batch):
    """Image shapes the check runs: the exported size, or for dynamic sizes two that are not
    multiples of the padding multiple (so the padding is exercised) with two batch sizes."""
    m = protocol.multiple
    if not dynamic:
        return [(batch, height, width, channels)]
    h, w = 2 * m + 3, 2 * m + 5
    return [(1, h, w, channels), (2, m + 1, h + m - 1, channels)]


def _trace_problem(e: BaseException, what: str, remedy: str) -> ExportError:
    where = _model_frame(traceback.extract_tb(e.__traceback__))
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return ExportError(f"{what}: {type(e).__name__}: {first}"
                       + (f"\n  at {where}" if where else "") + f"\n  {remedy}")


def export(module: nnx.Module, out: str | os.PathLike, *, format: str | None = None,
           height: int | None = None, width: int | None = None, dynamic: bool = False,
           dtype: str = "float32", batch: int | None = None, family: str | None = None,
           protocol: models.Protocol | None = None,
           platforms: Sequence[str] = DEFAULT_PLATFORMS, seed: int = 0,
           reference: Callable[[np.ndarray], np.ndarray] | None = None,
           log: Callable[[str], None] | None = None) -> ExportReport:
    """Writes ``module`` with its test-time protocol to ``out`` and checks the file.

    ``format``: 'onnx' or 'stablehlo' (default: from the suffix of ``out``). ``height`` and
    ``width``: the image size the file takes, or ``dynamic=True`` for any size (H, W >= the
    family's multiple, any batch; where the network or converter allows it, else
    :class:`ExportError` says why). ``batch``: the batch size of a fixed-size export (1). ``dtype``: float32, bfloat16
    or float16 weights and computation (input and output stay float32). ``family`` /
    ``protocol``: for a module that is not a registered class. ``platforms``: StableHLO's
    lowering platforms. ``reference``: what the file must reproduce, restored NHWC float32
    images of an NHWC float32 batch (default: ``flaxrestore.restore`` of ``module`` in float32).
    ``log``: called with progress lines. Returns an :class:`ExportReport`; raises :class:`ExportError` if the
    export is impossible or its check fails (the file is then removed).
    """
    out = os.fspath(out)
    if format is None:
        format = next((f for f, s in SUFFIXES.items() if out.endswith(s)), None)
        if format is None:
            raise ExportError(f"cannot tell the format from {out!r}: pass format='onnx' or "
                              "'stablehlo'")
    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    dtype = jnp.dtype(dtype).name if dtype is not None else "float32"
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    if dynamic and (height is not None or width is not None):
        raise ExportError("give either height and width, or dynamic=True, not both")
    if not dynamic and (height is None or width is None):
        raise ExportError("give the image size (height and width), or dynamic=True")
    if dynamic and batch is not None:
        raise ExportError("a dynamic export takes any batch size; do not give batch")
    batch = 1 if batch is None else batch
    if batch < 1:
        raise ExportError(f"batch must be >= 1, got {batch}")
    say = log or (lambda s: None)
    fam = _family(module, family)
    protocol = protocol or _protocol(module, family)
    from flaxrestore.restore import input_channels

    channels = input_channels(module) or 3
    if not dynamic and min(height, width) < 1:
        raise ExportError(f"height and width must be positive, got {height}x{width}")

    spec, label = _input_spec(protocol, channels, height, width, dynamic, batch)
    shapes = _check_shapes(protocol, channels, height, width, dynamic, batch)
    rng = np.random.default_rng(seed)
    images = [rng.random(s, dtype=np.float32) for s in shapes]

    say(f"exporting {fam} to {format} ({lowering.LOWERING_ENV}=accelerator: library ops only)")
    start = time.perf_counter()
    if format == "onnx" and dtype == "bfloat16":
        raise ExportError(
            "ONNX export in bfloat16 is not possible here: ONNX's Einsum (the attention of "
            "Restormer and SNR-Aware) has no bfloat16 type, and onnxruntime's CPU provider has no "
            "bfloat16 Conv to check the file with. What you can do: dtype float16 (or float32) "
            "for ONNX, or format='stablehlo' (--format stablehlo) with bfloat16")
    # float16 ONNX files are cast after conversion (see _to_onnx)
    traced = "float32" if format == "onnx" else dtype
    fn = protocol_function(module, family=family, protocol=protocol, dtype=traced)
    size_word = "dynamic height/width" if dynamic else f"{height}x{width}"
    remedy = ("export a fixed size instead (height/width; one file per size)" if dynamic else
              "nothing was written; the line above is where tracing or lowering failed")
    with lowering.accelerator_path():
        try:
            jaxpr = jax.make_jaxpr(fn)(spec)
        except (ExportError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - reported with the model line that failed
            raise _trace_problem(e, f"{fam} cannot be traced with {size_word}", remedy) from None
        if format == "stablehlo":
            try:
                blob = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(spec).serialize()
            except Exception as e:  # noqa: BLE001
                raise _trace_problem(e, f"jax.export of {fam} failed for {size_word}",
                                     remedy) from None
            data = bytes(blob)
        else:
            data = _to_onnx(fn, spec, jaxpr.jaxpr, fam, size_word, dynamic, dtype)
    seconds = time.perf_counter() - start
    # the Flax model on the check images, as `python -m flaxrestore restore` runs it
    say(f"flax reference: flaxrestore.restore on {', '.join('x'.join(map(str, s)) for s in shapes)}")
    if reference is None:
        refs = _reference(module, images, fam, protocol)
    else:
        refs = [np.asarray(reference(x), np.float32) for x in images]

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "wb") as f:
        f.write(data)
    say(f"wrote {out} ({len(data) / 2**20:.1f} MiB) in {seconds:.1f} s; checking it")

    try:
        checks = _check(out, format, images, refs, dtype)
    except BaseException:
        _remove(out)
        raise
    report = ExportReport(path=out, format=format, family=fam, dtype=dtype, input_shape=label,
                          output_channels=int(refs[0].shape[-1]), size_bytes=len(data),
                          export_seconds=seconds, checks=checks, tolerance=TOLERANCE[dtype],
                          platforms=tuple(platforms) if format == "stablehlo" else ())
    return report


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _reference(module, images, family, protocol) -> list[np.ndarray]:
    """The Flax model's restored images in float32, by flaxrestore.restore (host-side protocol)."""
    from flaxrestore.restore import Restorer

    restorer = Restorer(module, family=family, protocol=protocol,
                        batch=max(len(x) for x in images))
    return [restorer(x) for x in images]


def _to_onnx(fn, spec, jaxpr, family: str, size_word: str, dynamic: bool, dtype: str) -> bytes:
    """The ONNX model of ``fn`` (traced in ``dtype``), serialised.

    float16: ``fn`` is converted in float32 and the file cast to float16 by onnxruntime's
    converter (``onnxruntime.transformers.float16``, input and output kept float32): jax2onnx's
    own float16 graphs have Gemm nodes with a float16 input and a float32 bias, which
    onnxruntime refuses to load ("Type parameter (T) of Optype (Gemm) bound to different types").
    """
    jax2onnx, plugin_system = _jax2onnx()
    with _quiet_loggers("jax2onnx"):  # plugins for optional libraries it cannot import
        plugin_system.import_all_plugins()
    blockers = _onnx_blockers(jaxpr, plugin_system)
    if blockers:
        raise ExportError(
            f"{family} cannot be exported to ONNX: jax2onnx {_version('jax2onnx')} has no ONNX "
            f"conversion for {'; '.join(blockers)}. What you can do: export with "
            "format='stablehlo' (--format stablehlo), which lowers JAX operations as they are, "
            "or change that line to operations ONNX has")
    if _has_fft(jaxpr):
        if dynamic:
            raise ExportError(f"{family} computes FFTs, which are exported to ONNX as DFT "
                              "matrices of the image size: export a fixed size (height/width), "
                              "or format='stablehlo'")
        fn = real_ffts(fn)
    try:
        with _quiet_loggers("onnx_ir", "jax2onnx"):
            model = jax2onnx.to_onnx(fn, [spec], model_name=f"flaxrestore_{family}",
                                     opset=ONNX_OPSET, input_names=[INPUT_NAME],
                                     output_names=[OUTPUT_NAME])
    except Exception as e:  # noqa: BLE001 - reported with the model line that failed
        remedy = ("export a fixed size (height/width), or format='stablehlo' (--format "
                  "stablehlo), whose symbolic shapes may allow it" if dynamic else
                  "export with format='stablehlo' (--format stablehlo)")
        raise _trace_problem(e, f"jax2onnx {_version('jax2onnx')} could not convert {family} "
                             f"with {size_word}", "What you can do: " + remedy) from None
    if dtype == "float16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with _quiet_loggers("onnxruntime"):
            model = convert_float_to_float16(model, keep_io_types=True)
    return model.SerializeToString()


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Only errors from these loggers meanwhile (onnx_ir warns for every value whose type a
    shape computation leaves unset; the exported file is checked below in any case)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# ------------------------------------------------------------------------------------- check


def load(path: str | os.PathLike, format: str | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A written export as ``f(image) -> restored`` (numpy NHWC float32 in and out), run by its
    own runtime: onnxruntime (CPU) for ONNX, ``jax.export.deserialize`` for StableHLO."""
    path = os.fspath(path)
    if format is None:
        format = "stablehlo" if path.endswith(SUFFIXES["stablehlo"]) else "onnx"
    if format == "onnx":
        try:
            import onnxruntime as ort
        except ModuleNotFoundError:
            raise ExportError("checking an ONNX file needs onnxruntime: pip install "
                              "'flaxrestore[export]'") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3  # no warnings about unused initializers
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: np.asarray(x, np.float32)})[0]
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    return lambda x: np.asarray(exported.call(np.asarray(x, np.float32)))


def _check(path, format, images, refs, dtype) -> list[dict]:
    runtime = "onnxruntime " + _version("onnxruntime") if format == "onnx" else \
        "jax.export.deserialize"
    try:
        run = load(path, format)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{runtime} could not load {path}: {type(e).__name__}: {e}") from None
    checks = []
    for x, ref in zip(images, refs):
        t = time.perf_counter()
        try:
            y = np.asarray(run(x), np.float32)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"{runtime} could not run {path} on a {x.shape} image: "
                              f"{type(e).__name__}: {e}") from None
        secs = time.perf_counter() - t
        shape = "x".join(map(str, x.shape))
        if y.shape != ref.shape:
            raise ExportError(f"{path}: output {y.shape} for a {shape} image, the Flax model "
                              f"gives {ref.shape}")
        diff = float(np.max(np.abs(y - ref)))
        rel = diff / max(float(np.max(np.abs(ref))), 1e-12)
        if not np.all(np.isfinite(y)):
            raise ExportError(f"check failed for {path} on a {shape} image: {runtime} returned "
                              f"non-finite values (NaN/inf) in {dtype}; the file was removed")
        if not np.isfinite(rel) or rel > TOLERANCE[dtype]:
            raise ExportError(f"check failed for {path} on a {shape} image: {runtime} vs "
                              f"flaxrestore.restore: max |diff| {diff:.3g}, relative {rel:.3g} > "
                              f"{TOLERANCE[dtype]:g} ({dtype}); the file was removed")
        checks.append(dict(shape=shape, max_abs=diff, relative=rel, runtime=runtime,
                           seconds=secs))
    return checks


class _CallableModule(type(sys)):
    """``flaxrestore.export(...)`` is this module's :func:`export` (as ``flaxrestore.restore``)."""

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
