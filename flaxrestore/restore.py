"""Restoring whole images with a model: each family's test-time protocol, tiling, self-ensemble.

``restore(module, image)`` takes a float image in the range the model was trained on ([0, 1] for
all five families), HxWxC or NxHxWxC, and returns the restored image of the same height and width.
It applies the calling protocol the model's class declares (``flaxrestore.models.Protocol``,
taken from the test scripts of the originals): pad the bottom/right to the multiple the network
needs with the padding mode the scripts use, compute extra inputs (SNR-Aware's SNR map), call the
network, pick the restored image from its outputs, crop back, clamp to [0, 1].

Large images: ``tile=T`` cuts the padded image into T x T tiles (one fixed shape, compiled once),
runs them ``batch`` at a time, and blends overlapping outputs with weights that are zero in a
margin of ``overlap // 4`` pixels at every tile edge shared with a neighbour and then rise
linearly, so no tile's border (where it lacks context) shows and no seam appears. For a network
whose receptive field reaches at most that margin, tiled equals untiled exactly. Networks with
global operators (Restormer's channel attention, DarkIR's FFTs, SNR's transformer) see each tile
separately, which changes numbers as it does in the original ``demo.py`` tiling.

``ensemble=True`` averages the 8 flips/rotations of the input (x8 geometric self-ensemble).
``dtype=jnp.bfloat16`` runs weights and activations in bfloat16 (output returned as float32).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxrestore import layers, lowering, models

# --------------------------------------------------------------------------------- protocols

Protocol = models.Protocol  # each network class declares its own (``flaxrestore.models``)


def family_of(module: nnx.Module) -> str:
    """The registry family whose class ``module`` is (e.g. 'restormer')."""
    cls = type(module)
    for name in models.names():
        e = models.entry(name)
        if e.cls is cls:
            return e.family
    raise ValueError(f"{cls.__name__} is not a registered model class; pass family=... "
                     f"(one of {models.families()}) or protocol=...")


def protocol_for(module: nnx.Module | None = None, family: str | None = None) -> Protocol:
    """The calling protocol of ``module``'s class, or of a registered ``family``."""
    if family is not None:
        if family not in models.families():
            raise KeyError(f"no model family {family!r}; known: {models.families()}")
        return models.protocol(family)
    return models.protocol(module)


def host_extra_inputs(protocol: Protocol, x: np.ndarray) -> list[np.ndarray]:
    """The protocol's extra inputs of the unpadded images ``x`` (NHWC), as host arrays."""
    return [np.asarray(e, np.float32) for e in protocol.inputs(x)[1:]]


def pad_to_multiple(a: np.ndarray, protocol: Protocol) -> np.ndarray:
    """``a`` (NHWC) padded bottom/right to the protocol's multiple with its padding mode."""
    m = protocol.multiple
    ph, pw = -a.shape[1] % m, -a.shape[2] % m
    if not (ph or pw):
        return a
    return np.pad(a, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=layers._PAD_MODES[protocol.pad_mode])


def input_channels(module: nnx.Module) -> int | None:
    """Channels of the image input, from the model's ``example_inputs`` (None if unknown)."""
    cfg = getattr(module, "config", None)
    fn = getattr(type(module), "example_inputs", None)
    if cfg is None or fn is None:
        return None
    try:
        return int(fn(cfg, 1, 16, 16, np.random.default_rng(0))[0].shape[-1])
    except Exception:
        return None


# ------------------------------------------------------------------------- geometric ensemble


def _transform(a: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 dihedral transforms of NHWC ``a``: rot90 by k % 4, then a flip if k >= 4."""
    a = np.rot90(a, k % 4, axes=(1, 2))
    return a[:, :, ::-1] if k >= 4 else a


def _untransform(a: np.ndarray, k: int) -> np.ndarray:
    if k >= 4:
        a = a[:, :, ::-1]
    return np.rot90(a, -(k % 4), axes=(1, 2))


# ------------------------------------------------------------------------------------- tiling


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Top-left offsets of tiles of ``tile`` covering ``size``; the last is aligned to the end."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"tile overlap {overlap} must be smaller than the tile size {tile}")
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, overlap: int) -> np.ndarray:
    """Blend weight by distance from a shared tile edge: 0 for the first overlap//4 pixels, then a
    linear rise to 1 over the next overlap - 2*(overlap//4) pixels. Every pixel is at least
    overlap/2 from the shared edges of some tile, where this weight is positive."""
    margin = overlap // 4
    rise = overlap - 2 * margin
    d = np.arange(length, dtype=np.float32)
    return np.clip((d - margin + 1) / (rise + 1), 0.0, 1.0)


def _window_1d(start: int, length: int, size: int, overlap: int) -> np.ndarray:
    w = np.ones(length, np.float32)
    if overlap <= 0:
        return w
    if start > 0:  # a neighbour on this side
        w *= _ramp(length, overlap)
    if start + length < size:
        w *= _ramp(length, overlap)[::-1]
    return w


# ---------------------------------------------------------------------------------- the call


@functools.cache
def forward_jit():
    """``_forward`` jitted (graphdef, select and dtype static), built on first use: its compile
    options depend on the backend, which must not start at import."""
    return jax.jit(_forward, static_argnums=(0, 1, 2), compiler_options=lowering.compiler_options())


def _forward(graphdef, select: Callable, dtype: str, state, *inputs):
    """The evaluation call: ``select(module(*inputs))`` in ``dtype``, as float32."""
    if dtype != "float32":
        cast = jnp.dtype(dtype)
        state = jax.tree.map(lambda a: a.astype(cast) if jnp.issubdtype(a.dtype, jnp.floating)
                             else a, state)
        inputs = tuple(x.astype(cast) for x in inputs)
    module = nnx.merge(graphdef, state)
    out = select(module(*inputs))
    return out.astype(jnp.float32)


def _dtype_name(dtype) -> str:
    if dtype is None:
        return "float32"
    name = jnp.dtype(dtype).name
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {name}")
    return name


class Restorer:
    """A model ready to restore images: protocol, tiling and ensemble settings fixed once.

    Reuse one Restorer for many images: the network compiles once per tile (or padded image)
    shape. ``batch`` tiles or images go through one call; with ``fixed_batch`` every call has
    exactly ``batch`` (the last filled with repeats), so a folder of equal-size images compiles
    once even when some groups are smaller.
    """

    def __init__(self, module: nnx.Module, *, family: str | None = None, tile: int | None = None,
                 tile_overlap: int = 32, ensemble: bool = False, dtype=None, batch: int = 1,
                 clamp: bool | None = None, protocol: Protocol | None = None,
                 progress: Callable[[int, int], None] | None = None, fixed_batch: bool = False):
        if protocol is not None:
            self.family, self.protocol = family or type(module).__name__, protocol
        else:
            self.family = family or family_of(module)
            self.protocol = protocol_for(family=self.family)
        m = self.protocol.multiple
        if tile is not None:
            if tile < m:
                raise ValueError(f"tile {tile} is smaller than the multiple {m} that "
                                 f"{self.family} needs")
            tile = tile // m * m  # tiles are whole multiples, so a tile needs no padding itself
            if not 0 <= tile_overlap < tile:
                raise ValueError(f"tile overlap must be in [0, {tile}), got {tile_overlap}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.tile, self.overlap, self.ensemble, self.batch = tile, tile_overlap, ensemble, batch
        self.dtype = _dtype_name(dtype)
        self.clamp = self.protocol.clamp if clamp is None else clamp
        self.progress = progress
        self.fixed_batch = fixed_batch  # always call with `batch` items (repeats fill the rest)
        # an evaluation-mode view that shares the weights, so the caller's module is not mutated
        graphdef, state = nnx.split(module)
        view = nnx.merge(graphdef, state)
        view.eval()
        self.graphdef, self.state = nnx.split(view)
        self.in_channels = input_channels(module)

    # -- helpers
    def _call(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        return np.asarray(forward_jit()(self.graphdef, self.protocol.image, self.dtype,
                                        self.state, *inputs))

    def _run_padded(self, inputs: list[np.ndarray]) -> np.ndarray:
        """Runs the network over padded NHWC inputs, whole or in blended tiles."""
        n, hp, wp = inputs[0].shape[:3]
        th, tw = (hp, wp) if self.tile is None else (min(self.tile, hp), min(self.tile, wp))
        ys = tile_starts(hp, th, self.overlap)
        xs = tile_starts(wp, tw, self.overlap)
        units = [(i, y, x) for i in range(n) for y in ys for x in xs]
        per_call = self.batch if self.fixed_batch else min(self.batch, len(units))
        acc = weight = None
        total_calls = -(-len(units) // per_call)
        for call, first in enumerate(range(0, len(units), per_call)):
            group = units[first:first + per_call]
            padded_group = group + [group[-1]] * (per_call - len(group))  # fixed batch shape
            batch_inputs = [np.stack([a[i, y:y + th, x:x + tw] for i, y, x in padded_group])
                            for a in inputs]
            out = self._call(batch_inputs)
            if out.shape[1:3] != (th, tw):
                raise ValueError(f"{self.family} returned spatial size {out.shape[1:3]} for an "
                                 f"input of {(th, tw)}")
            if acc is None:
                acc = np.zeros((n, hp, wp, out.shape[-1]), np.float32)
                weight = np.zeros((hp, wp), np.float32)
            for j, (i, y, x) in enumerate(group):
                win = np.outer(_window_1d(y, th, hp, self.overlap), _window_1d(x, tw, wp, self.overlap))
                acc[i, y:y + th, x:x + tw] += out[j] * win[..., None]
                if i == 0:
                    weight[y:y + th, x:x + tw] += win
            if self.progress is not None:
                self.progress(call + 1, total_calls)
        if not np.all(weight > 0):  # cannot happen with tile_starts/_ramp; a guard for edits
            raise AssertionError("tile blending left pixels without weight")
        return acc / weight[None, :, :, None]

    def _single(self, x: np.ndarray, extras: list[np.ndarray]) -> np.ndarray:
        h, w = x.shape[1:3]
        out = self._run_padded([pad_to_multiple(a, self.protocol) for a in [x, *extras]])
        return out[:, :h, :w]

    # -- public
    def __call__(self, image) -> np.ndarray:
        """Restores ``image``: HxWxC or NxHxWxC float (or a (left, right) pair for dual-pixel
        Restormer); returns float32 of the same layout, with the model's output channels."""
        if isinstance(image, (tuple, list)):  # dual-pixel [L, R]
            image = np.concatenate([np.asarray(a, np.float32) for a in image], axis=-1)
        x = np.asarray(image, np.float32)
        single = x.ndim == 3
        if single:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"expected an HxWxC or NxHxWxC image, got shape {x.shape}")
        n, h, w, c = x.shape
        want = self.in_channels
        gray_split = rgb_from_gray = False
        if want is not None and c != want:
            if want == 1 and c == 3:  # a grey model on colour: each channel as its own image
                x = x.transpose(0, 3, 1, 2).reshape(n * 3, h, w, 1)
                gray_split = True
            elif want == 3 and c == 1:  # a colour model on grey: replicate, average the result
                x = np.repeat(x, 3, axis=-1)
                rgb_from_gray = True
            else:
                raise ValueError(f"{self.family} takes {want} input channels, the image has {c}"
                                 + (" (dual-pixel: pass (left, right))" if want == 6 else ""))
        extras = host_extra_inputs(self.protocol, x)
        if self.ensemble:
            out = None
            for k in range(8):
                y = _untransform(self._single(_transform(x, k), [_transform(e, k) for e in extras]), k)
                out = y if out is None else out + y
            out = out / 8.0
        else:
            out = self._single(x, extras)
        if gray_split:
            out = out.reshape(n, 3, h, w).transpose(0, 2, 3, 1)
        elif rgb_from_gray:
            out = out.mean(axis=-1, keepdims=True)
        if self.clamp:
            out = np.clip(out, 0.0, 1.0)
        out = np.ascontiguousarray(out, dtype=np.float32)
        return out[0] if single else out


def restore(module: nnx.Module, image, *, tile: int | None = None, tile_overlap: int = 32,
            ensemble: bool = False, dtype=None, batch: int = 1, family: str | None = None,
            clamp: bool | None = None, protocol: Protocol | None = None) -> np.ndarray:
    """Restores one image (HxWxC) or a batch (NxHxWxC) with ``module``'s test-time protocol.

    ``tile``/``tile_overlap``: process in blended tiles of this size (rounded down to the model's
    multiple); ``batch``: tiles (or images) per network call; ``ensemble``: x8 self-ensemble;
    ``dtype``: e.g. ``jnp.bfloat16``; ``family`` or ``protocol``: the protocol to use when
    ``module`` is not a registered class; ``clamp``: clip to [0, 1] (default: as the family's scripts do, i.e. yes).
    A dual-pixel Restormer takes ``image=(left, right)`` or the 6-channel concat [L, R].
    """
    return Restorer(module, family=family, tile=tile, tile_overlap=tile_overlap,
                    ensemble=ensemble, dtype=dtype, batch=batch, clamp=clamp,
                    protocol=protocol)(image)


class _CallableModule(type(functools)):
    """``flaxrestore.restore`` is both this module and the function: once the submodule has been
    imported, Python binds the package attribute to the module, so the module forwards calls."""

    def __call__(self, *args, **kwargs):
        return restore(*args, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
