"""Command line: restore images with a registered model, or list the models.

    python -m flaxrestore list
    python -m flaxrestore restore NAME --weights PATH --input FILE|DIR|GLOB --output DIR
        [--tile T] [--tile-overlap O] [--ensemble] [--dtype bfloat16] [--batch N]
    python -m flaxrestore export NAME --weights PATH --format onnx|stablehlo --out FILE
        (--height H --width W [--batch N] | --dynamic) [--dtype float32|bfloat16|float16]

PATH is a PyTorch checkpoint (.pth/.pt/.ckpt/.safetensors, converted on the fly; needs the torch
extra except for safetensors) or a Flax model directory (``model.json`` + ``state/``). Outputs are
written to DIR under the input's file name, in its format and bit depth, alpha put back. A file
that cannot be read or restored is reported and skipped; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


class CliError(Exception):
    """A problem with the command as a whole (exit status 2)."""


# ------------------------------------------------------------------------------------ weights


def parse_overrides(items: list[str] | None) -> dict:
    """``["dim=16", "num_blocks=(1,1,1,1)"]`` -> config overrides (Python literals, else strings)."""
    import ast

    out = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise CliError(f"--config expects KEY=VALUE, got {item!r}")
        try:
            out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            out[k.strip()] = v.strip()
    return out


def load_weights(name: str, path: str, key: str | None = None, overrides: dict | None = None):
    """The NNX module of ``name`` with the weights at ``path`` (PyTorch file or Flax directory).

    ``overrides`` change fields of the variant's config for a PyTorch checkpoint of a non-released
    width; a Flax directory records its own and ignores them.
    """
    from flaxrestore import checkpoints, models

    try:
        name = models.entry(name).name
    except KeyError as e:
        raise CliError(str(e.args[0])) from None
    if not os.path.exists(path):
        raise CliError(f"weights not found: {path}")
    if os.path.isdir(path):
        if not checkpoints.is_model_dir(path):
            raise CliError(f"{path} is a directory but not a flaxrestore model directory "
                           "(no model.json); pass a PyTorch checkpoint file or a directory "
                           "written by `python -m porting convert` / the trainer")
        try:
            return checkpoints.load_model(path, name=name)
        except ValueError as e:
            raise CliError(str(e)) from None
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in TORCH_SUFFIXES + (".safetensors",):
        raise CliError(f"{path}: unknown weights format (expected a PyTorch checkpoint "
                       f"{'/'.join(TORCH_SUFFIXES)}, a .safetensors file or a Flax model directory)")
    if suffix != ".safetensors":
        try:
            import torch  # noqa: F401
        except ModuleNotFoundError:
            raise CliError(f"{path} is a PyTorch checkpoint: reading it needs torch. Install the "
                           "torch extra (pip install 'flaxrestore[torch]'), or convert it once "
                           "elsewhere with `python -m porting convert` and pass the Flax "
                           "directory") from None
    import porting  # lazily: the only part of the project that may use torch

    try:
        return porting.load_torch_checkpoint(name, path, key=key, **(overrides or {}))
    except (porting.CheckpointError, porting.ConversionError) as e:
        raise CliError(str(e)) from None
    except TypeError as e:  # an override that is not a field of the config
        raise CliError(f"bad --config for {name}: {e}") from None


# ------------------------------------------------------------------------------------- inputs


def expand_inputs(spec: str) -> list[str]:
    """A file, every image in a directory (sorted, not recursive), or the files a glob matches."""
    from flaxrestore import imageio

    if os.path.isdir(spec):
        files = sorted(os.path.join(spec, f) for f in os.listdir(spec)
                       if imageio.is_image_path(f) and os.path.isfile(os.path.join(spec, f)))
        if not files:
            raise CliError(f"no images ({', '.join(imageio.EXTENSIONS)}) in {spec}")
        return files
    if os.path.isfile(spec):
        return [spec]
    files = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
    if not files:
        raise CliError(f"no input matches {spec!r}")
    return files


def _output_path(out_dir: str, path: str) -> str:
    return os.path.join(out_dir, os.path.basename(path))


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def run_restore(args) -> int:
    import jax.numpy as jnp
    import numpy as np

    from flaxrestore import imageio, progress
    from flaxrestore.restore import Restorer

    inputs = expand_inputs(args.input)
    rights = expand_inputs(args.right) if args.right else None
    if rights is not None and len(rights) != len(inputs):
        raise CliError(f"--input gives {len(inputs)} files but --right gives {len(rights)}")
    module = load_weights(args.name, args.weights, key=args.key,
                          overrides=parse_overrides(args.config))
    dtype = {"float32": None, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
    try:
        restorer = Restorer(module, tile=args.tile, tile_overlap=args.tile_overlap,
                            ensemble=args.ensemble, dtype=dtype, batch=args.batch,
                            fixed_batch=True,
                            progress=(lambda i, n: pbar.set_postfix_str(f"tiles {i}/{n}"))
                            if args.tile else None)
    except (ValueError, KeyError) as e:
        raise CliError(str(e)) from None
    if restorer.in_channels == 6 and rights is None:
        raise CliError(f"{args.name} is a dual-pixel model: give the left views with --input "
                       "and the right views with --right")
    os.makedirs(args.output, exist_ok=True)
    pbar = progress.bar(len(inputs), desc="restore", unit="image")
    failed: list[tuple[str, str]] = []
    group: list[tuple[str, imageio.Picture, np.ndarray]] = []

    def fail(path, reason):
        failed.append((path, reason))
        progress.write(f"FAILED {path}: {reason}", file=sys.stderr)
        pbar.update()

    def flush():
        if not group:
            return
        try:
            outs = restorer(np.stack([x for _, _, x in group]))
            for (path, pic, _), out in zip(group, outs):
                target = _output_path(args.output, path)
                imageio.write_image(target, out, pic.alpha, pic.bit_depth)
                pbar.update()
        except Exception as e:  # noqa: BLE001 - report, skip, go on with the rest
            for path, _, _ in group:
                fail(path, f"{type(e).__name__}: {e}")
        group.clear()

    for i, path in enumerate(inputs):
        try:
            if _same_file(path, _output_path(args.output, path)):
                raise CliError("the output would overwrite the input; choose another --output")
            pic = imageio.read_image(path)
            x = pic.pixels
            if rights is not None:
                right = imageio.read_image(rights[i])
                if right.shape != pic.shape or right.pixels.shape[-1] != x.shape[-1]:
                    raise CliError(f"right view {rights[i]} has shape {right.pixels.shape}, "
                                   f"left has {x.shape}")
                x = np.concatenate([x, right.pixels], axis=-1)
        except (OSError, ValueError, CliError) as e:
            fail(path, str(e))
            continue
        if group and (group[0][2].shape != x.shape or len(group) >= args.batch):
            flush()
        group.append((path, pic, x))
    flush()
    pbar.close()
    ok = len(inputs) - len(failed)
    print(f"restored {ok} of {len(inputs)} images into {args.output}"
          + (f"; {len(failed)} failed" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def run_export(args) -> int:
    from flaxrestore import export

    if args.dynamic and (args.height is not None or args.width is not None or
                         args.batch is not None):
        raise CliError("--dynamic exports any batch, height and width: give no --height, "
                       "--width or --batch with it")
    if not args.dynamic and (args.height is None or args.width is None):
        raise CliError("give the image size with --height H --width W, or --dynamic")
    module = load_weights(args.name, args.weights, key=args.key,
                          overrides=parse_overrides(args.config))
    try:
        report = export.export(module, args.out, format=args.format, height=args.height,
                               width=args.width, dynamic=args.dynamic, dtype=args.dtype,
                               batch=args.batch, platforms=tuple(args.platforms.split(",")),
                               log=lambda line: print(line, file=sys.stderr))
    except export.ExportError as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    print(report)
    return 0


def run_list(args) -> int:
    from flaxrestore import models
    for name in models.names():
        e = models.entry(name)
        p = e.protocol
        how = f"pad to {p.multiple} ({p.pad_mode})"
        print(f"{name:45s} {how:22s} {e.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flaxrestore", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show the registered models")
    r = sub.add_parser("restore", help="restore images with a model")
    r.add_argument("name", help="registered model name, e.g. restormer:motion_deblurring (see list)")
    r.add_argument("--weights", required=True,
                   help="PyTorch checkpoint (.pth/.pt/.safetensors) or Flax model directory")
    r.add_argument("--input", required=True, help="an image file, a directory or a glob")
    r.add_argument("--right", help="dual-pixel models: the right views (file, directory or glob), "
                                   "paired in sorted order with --input (the left views)")
    r.add_argument("--output", required=True, help="directory for the restored images")
    r.add_argument("--tile", type=int, help="process in tiles of this size (rounded down to the "
                                            "model's multiple)")
    r.add_argument("--tile-overlap", type=int, default=32, help="tile overlap in pixels (32)")
    r.add_argument("--ensemble", action="store_true", help="x8 geometric self-ensemble")
    r.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    r.add_argument("--batch", type=int, default=1,
                   help="equal-size images (or tiles) per network call (1)")
    r.add_argument("--config", action="append", metavar="KEY=VALUE",
                   help="override a config field of NAME for a PyTorch checkpoint of another "
                        "width, e.g. --config dim=16 (repeatable; Python literals)")
    r.add_argument("--key", help="entry of the checkpoint that holds the state dict "
                                 "(default: found automatically)")
    x = sub.add_parser("export", help="write the model with its test-time protocol as an ONNX "
                                      "or StableHLO file, checked against the Flax model")
    x.add_argument("name", help="registered model name, e.g. restormer:motion_deblurring")
    x.add_argument("--weights", required=True,
                   help="PyTorch checkpoint (.pth/.pt/.safetensors) or Flax model directory")
    x.add_argument("--format", required=True, choices=("onnx", "stablehlo"))
    x.add_argument("--out", required=True, help="the file to write")
    x.add_argument("--height", type=int, help="image height the file takes")
    x.add_argument("--width", type=int, help="image width the file takes")
    x.add_argument("--batch", type=int, help="images per call for --height/--width (1)")
    x.add_argument("--dynamic", action="store_true",
                   help="any batch, height and width (where the network and format allow it)")
    x.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="precision of weights and computation; input/output stay float32")
    x.add_argument("--platforms", default="cpu,cuda,tpu",
                   help="StableHLO: platforms to lower for (cpu,cuda,tpu)")
    x.add_argument("--config", action="append", metavar="KEY=VALUE",
                   help="override a config field of NAME for a PyTorch checkpoint of another "
                        "width (repeatable; Python literals)")
    x.add_argument("--key", help="entry of the checkpoint that holds the state dict")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flaxrestore.xla_cpu import tuning

    tuning.cpu_when_no_accelerator()  # before jax starts: no libtpu start-up noise on a CPU host
    try:
        if args.command == "list":
            return run_list(args)
        if args.command == "export":
            return run_export(args)
        if args.batch < 1:
            raise CliError("--batch must be >= 1")
        return run_restore(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
