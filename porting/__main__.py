"""Command line of the porting package.

    python -m porting list
    python -m porting convert NAME CHECKPOINT OUT_DIR [--safetensors] [--key K] [--partial]
    python -m porting export NAME FLAX_CHECKPOINT OUT.pth
    python -m porting verify NAME [CHECKPOINT] [--batch B --height H --width W --grads --tol T]
    python -m porting vgg19 VGG19.pth OUT.safetensors
    python -m porting demo
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _step(msg: str):
    print(f"[porting] {msg}", flush=True)


def cmd_list(args) -> int:
    from flaxrestore import models

    for n in models.names():
        e = models.entry(n)
        print(f"{n:<44} {e.description}")
    return 0


def cmd_convert(args) -> int:
    import porting
    from flaxrestore import checkpoints

    t0 = time.perf_counter()
    _step(f"reading {args.checkpoint}")
    state = porting.load_state_dict_file(args.checkpoint, key=args.key)
    _step(f"{len(state)} tensors; converting to {args.name}")
    module = porting.torch_to_flax(args.name, state, strict=not args.partial)
    out = checkpoints.save_model(args.out_dir, args.name, module)
    _step(f"wrote orbax checkpoint {out}")
    if args.safetensors:
        path = checkpoints.save_safetensors(os.path.join(out, "model.safetensors"), args.name, module)
        _step(f"wrote {path}")
    _step(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def _load_flax(name: str, path: str):
    from flaxrestore import checkpoints

    if path.endswith(".safetensors"):
        return checkpoints.load_safetensors(path, name)
    return checkpoints.load_model(path, name)


def cmd_export(args) -> int:
    import torch

    import porting
    from porting import reference

    _step(f"reading Flax checkpoint {args.flax_checkpoint}")
    module = _load_flax(args.name, args.flax_checkpoint)
    state = porting.flax_to_torch(module)
    key = args.key if args.key is not None else reference.release_key(args.name)
    obj = {key: state} if key else state
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, args.out)
    _step(f"wrote {args.out} ({len(state)} tensors" + (f" under {key!r})" if key else ")"))
    return 0


def cmd_verify(args) -> int:
    import torch

    import porting
    from porting import reference, verify

    torch_module = None
    flax_module = None
    overrides = {}
    if args.checkpoint:
        _step(f"reading {args.checkpoint}")
        if os.path.isdir(args.checkpoint) or args.checkpoint.endswith(".safetensors"):
            flax_module = _load_flax(args.name, args.checkpoint)
            state = porting.flax_to_torch(flax_module)
            if os.path.isdir(args.checkpoint):  # a trained reduced-width model, say
                from flaxrestore import checkpoints

                overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in
                             checkpoints.read_meta(args.checkpoint).get("overrides", {}).items()}
        else:
            state = porting.load_state_dict_file(args.checkpoint, key=args.key)
        torch_module = reference.build(args.name, **overrides)
        torch_module.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
        torch_module.eval()
    _step(f"running torch reference and Flax port of {args.name} "
          f"(batch {args.batch}{', with gradients' if args.grads else ''}"
          f"{', compiled' if args.jit else ''})")
    report = verify.compare(args.name, torch_module, flax_module, batch=args.batch,
                            height=args.height, width=args.width, seed=args.seed,
                            grads=args.grads, jit=args.jit, **overrides)
    print(report.format())
    worst = report.worst()
    ok = worst <= args.tol
    print(f"{'PASS' if ok else 'FAIL'}: worst relative difference {worst:.3e} (tolerance {args.tol:g})")
    return 0 if ok else 1


def cmd_vgg19(args) -> int:
    from safetensors.numpy import save_file

    from porting.convert import flax_to_numpy
    from porting.reference.vgg import load_torchvision_vgg19

    if not args.out.endswith(".safetensors"):
        raise ValueError(f"the output must be a .safetensors file, got {args.out}")
    _step(f"reading {args.checkpoint} (torchvision vgg19 layout; classifier dropped)")
    module = load_torchvision_vgg19(args.checkpoint, num_layers=30)  # up to relu5_1
    arrays = flax_to_numpy(module)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(arrays, args.out)
    _step(f"wrote {len(arrays)} tensors (features.0 .. features.28) to {args.out}; "
          f"train with --set vgg_weights={args.out}")
    return 0


def cmd_demo(args) -> int:
    from porting import demo

    return demo.main(names=args.names or None, workdir=args.workdir)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m porting",
                                description="Convert PyTorch checkpoints of the five restoration "
                                            "networks to Flax and back, and verify the port.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="list the model names")
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("convert", help="PyTorch checkpoint -> Flax (orbax) checkpoint directory")
    s.add_argument("name", help="model name, e.g. restormer:motion_deblurring (see `list`)")
    s.add_argument("checkpoint", help=".pth/.pt/.ckpt (read with weights_only=True) or .safetensors")
    s.add_argument("out_dir", help="directory to create")
    s.add_argument("--safetensors", action="store_true", help="also write OUT_DIR/model.safetensors")
    s.add_argument("--key", help="take the state dict from this top-level entry (default: params, "
                                 "params_ema, state_dict, model_state_dict, model, or the bare dict)")
    s.add_argument("--partial", action="store_true",
                   help="load what matches and keep random init for the rest (not recommended)")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("export", help="Flax checkpoint -> PyTorch file in the official layout")
    s.add_argument("name")
    s.add_argument("flax_checkpoint", help="directory written by `convert` or the trainer, or a .safetensors")
    s.add_argument("out", help="output .pth")
    s.add_argument("--key", help="top-level entry to store the state dict under "
                                 "(default: what the official release uses)")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("verify", help="run torch reference and Flax port side by side")
    s.add_argument("name")
    s.add_argument("checkpoint", nargs="?", help="PyTorch file or Flax checkpoint; random weights if omitted")
    s.add_argument("--key")
    s.add_argument("--batch", type=int, default=2)
    s.add_argument("--height", type=int)
    s.add_argument("--width", type=int)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--grads", action="store_true", help="also compare gradients of a scalar loss")
    s.add_argument("--jit", action="store_true",
                   help="compile the Flax side as the trainer and restore do (XLA options "
                        "included) instead of running it op by op")
    s.add_argument("--tol", type=float, default=1e-4, help="relative tolerance (default 1e-4)")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("vgg19", help="torchvision VGG19 ImageNet weights -> .safetensors for the "
                                     "trainer's perceptual / contrastive losses")
    s.add_argument("checkpoint", help="torchvision vgg19 file, e.g. vgg19-dcbb9e9d.pth (read with "
                                      "weights_only=True)")
    s.add_argument("out", help="output .safetensors")
    s.set_defaults(fn=cmd_vgg19)

    s = sub.add_parser("demo", help="for each model: release-style checkpoint -> convert -> verify")
    s.add_argument("names", nargs="*", help="models (default: all)")
    s.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ModuleNotFoundError as e:
        if e.name == "torch":
            print("error: this command needs PyTorch: pip install 'flaxrestore[torch]'", file=sys.stderr)
            return 2
        raise
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
