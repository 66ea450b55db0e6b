"""Safe reading of released checkpoint files and finding the state dict inside them.

``.pth``/``.pt``/``.ckpt`` files go through ``torch.load(weights_only=True)``: a pickle that would
build arbitrary objects or run code is refused, never executed. ``.safetensors`` files are read
with safetensors. Containers are unwrapped (``params``, ``params_ema``, ``state_dict``, ``model``
or a bare dict) and DataParallel ``module.`` prefixes stripped.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any, Mapping

import numpy as np

CONTAINER_KEYS = ("params", "params_ema", "state_dict", "model_state_dict", "model")


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint, with the reason."""


def _is_tensor(v) -> bool:
    return hasattr(v, "detach") and hasattr(v, "shape")


def _to_numpy(v) -> np.ndarray:
    import torch

    t = v.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def read_file(path: str | os.PathLike) -> Any:
    """The raw object stored in a checkpoint file, read safely."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a PyTorch checkpoint file "
                              "(a Flax/orbax checkpoint directory is read by flaxrestore.checkpoints)")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty")
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
            return load_file(path)
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None

    import torch

    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head == b"PK\x03\x04"
    if is_zip and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is truncated or corrupt (its zip archive is incomplete)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" in text or "Unsupported global" in text or "weights_only" in text:
            raise CheckpointError(
                f"refused to load {path}: it contains pickled Python objects beyond tensors and "
                "plain containers, which could run code when unpickled. Nothing was executed. "
                "If you trust the file, re-save its state dict with torch.save(state_dict) or as "
                f"safetensors. (torch said: {text.splitlines()[0]})") from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({text.splitlines()[0]})") from None
    except Exception as e:  # torch raises many types on garbage (IndexError, EOFError, ...)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if is_zip:
            raise CheckpointError(f"{path} is truncated or corrupt ({first})") from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({first})") from None


def find_state_dict(obj: Any, key: str | None = None, *, source: str = "checkpoint") -> dict[str, Any]:
    """The state dict inside a loaded checkpoint object.

    ``key`` picks a container entry explicitly; otherwise the first of ``CONTAINER_KEYS`` present
    is used, or the object itself if it is a flat dict of tensors.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a dict of tensors")
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"{source} has no entry {key!r}; it has {sorted(map(str, obj))}")
        obj = obj[key]
    elif not all(_is_tensor(v) or isinstance(v, np.ndarray) for v in obj.values()):
        for k in CONTAINER_KEYS:
            if k in obj and isinstance(obj[k], Mapping):
                obj = obj[k]
                break
        else:
            raise CheckpointError(
                f"{source} is a dict without a state dict inside: expected tensors or one of the "
                f"entries {', '.join(CONTAINER_KEYS)}; found {sorted(map(str, obj))[:20]}")
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: the state dict is empty or not a dict")
    bad = [k for k, v in obj.items() if not (_is_tensor(v) or isinstance(v, np.ndarray))]
    if bad:
        raise CheckpointError(f"{source}: entries that are not tensors: {bad[:10]}")
    return dict(obj)


def strip_prefix(state: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Removes a leading DataParallel/DDP ``module.`` from every key that has it."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def load_state_dict_file(path: str | os.PathLike, key: str | None = None) -> dict[str, np.ndarray]:
    """Reads a checkpoint file into a flat ``{torch key: numpy array}`` dict."""
    obj = read_file(path)
    state = strip_prefix(find_state_dict(obj, key, source=os.fspath(path)))
    return {k: (v if isinstance(v, np.ndarray) else _to_numpy(v)) for k, v in state.items()}
