"""Command line of the porting package.

    python -m porting list
    python -m porting convert NAME CHECKPOINT OUT_DIR [--safetensors] [--key K] [--partial]
    python -m porting export NAME FLAX_CHECKPOINT OUT.pth
    python -m porting verify NAME [CHECKPOINT] [--against FLAX_MODEL] [--grads] [--layers]
                             [--json PATH] [--plain] [--tol T] [--k K] [--accelerator-path]
                             [--batch B --height H --width W --seed S --jit]
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


def _overrides_of(flax_path: str) -> dict:
    """The config overrides a Flax model directory was saved with (a reduced-width model, say)."""
    from flaxrestore import checkpoints

    if not os.path.isdir(flax_path):
        return {}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in
            checkpoints.read_meta(flax_path).get("overrides", {}).items()}


def _torch_reference(name: str, state, overrides: dict, what: str):
    import torch

    from porting import reference

    module = reference.build(name, **overrides)
    try:
        module.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
    except RuntimeError as e:  # torch names every missing / unexpected key and shape mismatch
        raise ValueError(f"{what} does not fit the torch reference of {name!r}: {e}") from None
    return module.eval()


def cmd_verify(args) -> int:
    import contextlib
    import json

    import porting
    from flaxrestore import lowering
    from porting import verify

    torch_module = None
    flax_module = None
    overrides = {}
    if args.against:
        if not args.checkpoint:
            raise ValueError("--against FLAX_MODEL_DIR compares it with a PyTorch file: "
                             "give the file as CHECKPOINT")
        if os.path.isdir(args.checkpoint) or args.checkpoint.endswith(".safetensors"):
            raise ValueError(f"{args.checkpoint}: with --against, CHECKPOINT is the PyTorch file "
                             "(.pth/.pt/.ckpt); the Flax model goes after --against")
        if not os.path.exists(args.against):
            raise FileNotFoundError(f"{args.against}: no such Flax model directory or file")
        _step(f"reading Flax model {args.against}")
        flax_module = _load_flax(args.name, args.against)
        overrides = _overrides_of(args.against)
        _step(f"reading {args.checkpoint}")
        state = porting.load_state_dict_file(args.checkpoint, key=args.key)
        torch_module = _torch_reference(args.name, state, overrides, args.checkpoint)
    elif args.checkpoint:
        _step(f"reading {args.checkpoint}")
        if os.path.isdir(args.checkpoint) or args.checkpoint.endswith(".safetensors"):
            flax_module = _load_flax(args.name, args.checkpoint)
            state = porting.flax_to_torch(flax_module)
            overrides = _overrides_of(args.checkpoint)
        else:
            state = porting.load_state_dict_file(args.checkpoint, key=args.key)
        torch_module = _torch_reference(args.name, state, overrides, args.checkpoint)
    if args.tol is None:
        args.tol = verify.TOL
    if args.k is None:
        args.k = verify.K
    mode = "plain float32 comparison" if args.plain else "float64 yardstick"
    switch = lowering.accelerator_path() if args.accelerator_path else contextlib.nullcontext()
    with switch:
        _step(f"running torch reference and Flax port of {args.name} "
              f"(batch {args.batch}, {mode}{', with gradients' if args.grads else ''}"
              f"{', block by block' if args.layers else ''}{', compiled' if args.jit else ''})")
        _step(f"Flax side: {lowering.describe()}")
        report = verify.compare(args.name, torch_module, flax_module, batch=args.batch,
                                height=args.height, width=args.width, seed=args.seed,
                                grads=args.grads, jit=args.jit, plain=args.plain,
                                layers=args.layers, tol=args.tol, k=args.k,
                                model_overrides=overrides)
    print(report.format())
    print(report.verdict())
    if args.json:
        doc = report.as_json()
        doc["inputs"] = {"torch_file": args.checkpoint, "flax_model": args.against,
                         "batch": args.batch, "height": args.height, "width": args.width,
                         "seed": args.seed, "grads": args.grads, "jit": args.jit}
        out = os.path.abspath(args.json)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            json.dump(doc, f, indent=1, default=str)
        os.replace(out + ".tmp", out)
        _step(f"wrote {args.json}")
    return 0 if report.ok() else 1


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

    s = sub.add_parser(
        "verify", help="run torch reference and Flax port side by side",
        description="Runs the torch reference (float32, and float64 as the yardstick) and the Flax "
                    "port on the same weights and inputs. A tensor passes when Flax's error "
                    "against float64 is at most max(TOL, K x torch float32's own error). "
                    "Exit status 0: pass, 1: fail, 2: usage or file error.",
        epilog="examples:\n"
               "  python -m porting verify restormer:motion_deblurring motion_deblurring.pth --grads\n"
               "  python -m porting verify darkir:m DarkIR_384.pt --against out/darkir --layers "
               "--json report.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("name", help="model name (see `list`)")
    s.add_argument("checkpoint", nargs="?",
                   help="PyTorch file, or (without --against) a Flax checkpoint; random weights "
                        "if omitted")
    s.add_argument("--against", metavar="FLAX_MODEL",
                   help="compare this Flax model directory (written by `convert` or the trainer) "
                        "or .safetensors with the PyTorch CHECKPOINT, instead of converting "
                        "CHECKPOINT for both sides")
    s.add_argument("--key", help="take the state dict from this top-level entry of CHECKPOINT")
    s.add_argument("--batch", type=int, default=2)
    s.add_argument("--height", type=int)
    s.add_argument("--width", type=int)
    s.add_argument("--seed", type=int, default=0, help="seed of the random inputs (and weights)")
    s.add_argument("--grads", action="store_true",
                   help="also compare gradients of a scalar loss for the inputs and every parameter")
    s.add_argument("--layers", action="store_true",
                   help="also compare every named module's output (torch forward hooks against "
                        "the Flax submodule at the same attribute path, op by op) and name the "
                        "first one that departs from the yardstick")
    s.add_argument("--jit", action="store_true",
                   help="compile the Flax side as the trainer and restore do (XLA options "
                        "included) instead of running it op by op")
    s.add_argument("--accelerator-path", action="store_true",
                   help="run the Flax side on the lowering TPUs and GPUs run "
                        "(flaxrestore.lowering.accelerator_path()), whatever this machine is; "
                        "FLAXRESTORE_LOWERING=accelerator does the same")
    s.add_argument("--tol", type=float, default=None,
                   help=f"relative error always accepted (default {1e-4:g}); with --plain, the "
                        "tolerance between the two float32 runs")
    s.add_argument("--k", type=float, default=None,
                   help="how many times torch float32's own error (against float64) Flax may "
                        "have (default: porting.verify.K, measured; see README)")
    s.add_argument("--plain", action="store_true",
                   help="no float64 run: pass when Flax and torch float32 differ by at most TOL "
                        "relative (the check before the yardstick; stricter on tensors torch "
                        "itself gets wrong in float32)")
    s.add_argument("--json", metavar="PATH",
                   help="write the whole report (outputs, gradients, layers, verdict, versions, "
                        "platform and lowering) to PATH")
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
    from flaxrestore.xla_cpu import tuning

    tuning.cpu_when_no_accelerator()  # before jax starts: no libtpu start-up noise on a CPU host
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
