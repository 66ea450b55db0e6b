"""How often does ``porting verify --grads`` fail a CORRECT port? Files written by the original code.

    nice -n 10 .venv/bin/python tools/verify_sweep.py --official DIR [--files 20]
        [--scratch /tmp/verify_sweep] [--only FAMILY ...] [--modes cpu-lowering accelerator-path]
        [--release-width] [--size H W] [--no-control] [--accuracy] [--json PATH]

``DIR`` holds local checkouts of the five original repositories, named as
``tools/make_goldens.py`` expects (``DIR/Restormer``, ``DIR/MPRNet``, ``DIR/DarkIR``,
``DIR/SNR-Aware-Low-Light-Enhance``, ``DIR/AECR-Net``); nothing of them is copied anywhere, their
classes are imported at run time through ``tools/make_goldens.py``'s loaders and shims.

For each family (``FAMILIES``: restormer:motion_deblurring, mprnet:deblurring, darkir:m, snr,
aecrnet) the tool

1. writes ``--files`` checkpoint files into ``--scratch`` (outside the repository) with the
   ORIGINAL class, built at half the released channel widths (Restormer dim 24, MPRNet 48/24/16,
   DarkIR-m width 16, SNR-Aware nf 32, AECR-Net ngf 32) with the released structure otherwise
   (block counts, heads, expansion, reduction, kernel sizes as released), file ``i``:
   ``torch.manual_seed(i)``, torch's default initialisation, every constant parameter and floating
   buffer randomised (``make_goldens.randomise(net, i)``), saved in the container and under the
   names the released files use (``make_goldens.release_container``);
2. judges each file as ``python -m porting verify NAME FILE --grads --jit [--accelerator-path]
   --seed i`` does: the file read by ``porting.load_state_dict_file``, loaded strictly into the
   torch reference by the command line's own ``_torch_reference`` (with the reduced widths as
   config overrides, which the command line takes only from Flax model directories), converted
   to Flax by ``verify.compare`` and compared against float64 on its default input size and
   batch (2), with gradients, the Flax side jitted (one compile per family and lowering mode);
3. in both lowering modes: the per-platform choice (on this CPU: the XLA:CPU lowerings) and
   ``flaxrestore.lowering.accelerator_path()`` (what TPUs and GPUs compile);
4. as a control, the last file converted with one realistic mistake that a shape check cannot
   see (``MISTAKES``; the torch side keeps the file's true weights): that run must FAIL.

``--release-width`` writes the files at the released channel widths instead, and ``--size H W``
verifies on a larger input than the command line's default (each ReLU-type activation element
is one more chance for a float32 kink decision: see the README's Equivalence section).

``--accuracy`` asks a different question, with no verdict: how far are Flax float32 and the
original's own float32 from the ORIGINAL's float64 (outputs and input gradients, one weight draw
per seed 0..--files-1, as the files are written)?

It prints one row per family and mode: files, false FAILs (the ports are correct, so every FAIL
is a false one), the tightest margin (error / bound, 1 = at the bound) with its tensor and file,
the median of the per-file tightest margins, whether the control failed, and the wall time.
``--json`` keeps every file's verdict and its five tightest tensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import make_goldens as mg  # noqa: E402  (the originals' loaders, shims and randomisation)

# Reduced channel widths, the released structure otherwise (released values in the comments).
FAMILIES = {
    "restormer": mg.Case(
        "sweep_restormer", "Restormer", "basicsr/models/archs/restormer_arch.py", "Restormer",
        dict(inp_channels=3, out_channels=3, dim=24,  # released 48
             num_blocks=[4, 6, 6, 8], num_refinement_blocks=4, heads=[1, 2, 4, 8],
             ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias",
             dual_pixel_task=False),
        "restormer:motion_deblurring", ("restormer:motion_deblurring",), (2, 16, 24)),
    "mprnet": mg.Case(
        "sweep_mprnet", "MPRNet", "Deblurring/MPRNet.py", "MPRNet",
        dict(in_c=3, out_c=3, n_feat=48, scale_unetfeats=24, scale_orsnetfeats=16,  # 96, 48, 32
             num_cab=8, kernel_size=3, reduction=4, bias=False),
        "mprnet:deblurring", ("mprnet:deblurring",), (2, 16, 24)),
    "darkir": mg.Case(
        "sweep_darkir", "DarkIR", "archs/DarkIR.py", "DarkIR",
        dict(img_channel=3, width=16,  # released 32
             middle_blk_num_enc=2, middle_blk_num_dec=2, enc_blk_nums=[1, 2, 3],
             dec_blk_nums=[3, 1, 1], dilations=[1, 4, 9], extra_depth_wise=True),
        "darkir:m", ("darkir:m",), (2, 13, 21)),
    "snr": mg.Case(
        "sweep_snr", "SNR-Aware-Low-Light-Enhance", "models/archs/low_light_transformer.py",
        "low_light_transformer",
        dict(nf=32,  # released 64; the hard-coded transformer/decoder widths scaled by nf / 64
             nframes=5, groups=8, front_RBs=1, back_RBs=1, center=None, predeblur=True,
             HR_in=True, w_TSA=True),
        "snr", ("snr",), (2, 32, 48)),
    "aecrnet": mg.Case(
        "sweep_aecrnet", "AECR-Net", "models/AECRNet.py", "Dehaze",
        dict(input_nc=3, output_nc=3, ngf=32),  # released 64 (DCN 4 * ngf: shim)
        "aecrnet", ("aecrnet",), (2, 16, 24)),
}

# One realistic converter mistake per family on the torch-layout state dict, invisible to the
# strict shape check (same keys, same shapes): what, keys, edit. Applied to the Flax side only.
MISTAKES = {
    "restormer": ("a square 1x1 kernel read transposed", ("latent.0.attn.project_out.weight",),
                  lambda a: (np.swapaxes(a[0], 0, 1),)),
    "mprnet": ("a square 3x3 kernel read transposed", ("stage3_orsnet.orb1.body.0.body.0.weight",),
               lambda a: (np.swapaxes(a[0], 0, 1),)),
    "darkir": ("a block's beta and gamma swapped", ("encoders.1.modules_list.0.beta",
                                                     "encoders.1.modules_list.0.gamma"),
               lambda a: (a[1], a[0])),
    "snr": ("a transformer LayerNorm's weight and bias swapped",
            ("transformer.layer_stack.3.pos_ffn.layer_norm.weight",
             "transformer.layer_stack.3.pos_ffn.layer_norm.bias"), lambda a: (a[1], a[0])),
    "aecrnet": ("the released mix4/mix5 mapped to the wrong mixes", ("mix4.w", "mix5.w"),
                lambda a: (a[1], a[0])),
}

# --release-width: the released channel widths (the released files' structure exactly)
RELEASE_WIDTHS = {
    "restormer": dict(dim=48), "mprnet": dict(n_feat=96, scale_unetfeats=48, scale_orsnetfeats=32),
    "darkir": dict(width=32), "snr": dict(nf=64), "aecrnet": dict(ngf=64),
}

MODES = ("cpu-lowering", "accelerator-path")


def case_of(family: str, release_width: bool = False) -> mg.Case:
    case = FAMILIES[family]
    if not release_width:
        return case
    return dataclasses.replace(case, name=case.name + "_release",
                               kwargs={**case.kwargs, **RELEASE_WIDTHS[family]})


def overrides_of(case: mg.Case) -> dict:
    """The original constructor's keywords are the Flax config's fields (lists -> tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in case.kwargs.items()}


def write_files(official: str, case: mg.Case, n: int, scratch: pathlib.Path) -> list[pathlib.Path]:
    """``n`` release-layout files of ``case`` written by the original class, seed = index."""
    import torch

    folder = scratch / case.name
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{case.name}_{i:02d}.pth"
        paths.append(path)
        if path.exists():
            continue
        torch.manual_seed(i)
        net = mg._build_raw(official, case).float()
        mg.randomise(net, i)
        net.eval()
        state = mg.release_state(case, net.state_dict())
        torch.save(mg.release_container(case, state), str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
    return paths


def judge(family: str, case: mg.Case, path: pathlib.Path, seed: int, mistake: bool = False,
          size: tuple | None = None):
    """``porting verify NAME FILE --grads --jit --seed SEED [--height H --width W]`` on a file
    of ``case``'s widths (the command line's reading and strict load), optionally with the Flax
    side converted from the file with ``MISTAKES[family]`` applied."""
    import porting
    from porting import verify
    from porting.__main__ import _torch_reference

    overrides = overrides_of(case)
    state = porting.load_state_dict_file(path)
    torch_module = _torch_reference(case.registry, state, overrides, str(path))
    flax_module = None
    if mistake:
        what, keys, edit = MISTAKES[family]
        wrong = dict(state)
        for k, v in zip(keys, edit([state[k] for k in keys])):
            if v.shape != state[k].shape:
                raise AssertionError(f"{family}: mistake {what} changes a shape")
            wrong[k] = np.ascontiguousarray(v)
        flax_module = porting.torch_to_flax(case.registry, wrong, **overrides)
    h, w = size or (None, None)
    return verify.compare(case.registry, torch_module, flax_module, grads=True, jit=True,
                          seed=seed, height=h, width=w, model_overrides=overrides)


def summarise(report) -> dict:
    diffs = report.outputs + report.grads
    ranked = sorted(diffs, key=lambda d: -d.margin(report.tol, report.k))
    return {"ok": report.ok(), "verdict": report.verdict(), "tensors": len(diffs),
            "seconds": report.seconds,
            "tightest": [{"what": d.what, "margin": d.margin(report.tol, report.k),
                          "flax": d.flax_rel, "torch": d.torch_rel,
                          "bound": d.bound(report.tol, report.k),
                          "floor": d._r(d.floor)} for d in ranked[:5]],
            "failed": [{"what": d.what, "flax": d.flax_rel, "torch": d.torch_rel,
                        "torch_runs": [d._r(e) for e in d.torch_errs or ()],
                        "bound": d.bound(report.tol, report.k)}
                       for d in report.failures()]}


def accuracy(official: str, family: str, case: mg.Case, seeds, size, modes) -> list[dict]:
    """How far Flax float32 and the ORIGINAL's own float32 are from the original's float64: the
    outputs and the input gradients of verify's loss, per seed (a file's weights as in
    :func:`write_files`, the input of ``make_goldens.make_inputs``), the original's float32 on the
    input and on two inputs one float32 step away, Flax jitted (verify's program) per lowering.
    Relative to max(1, max|ref|) for outputs and max|ref| for gradients, as verify."""
    import copy

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import porting
    from flaxrestore import lowering
    from porting import verify

    b, h, w = (case.shape[0],) + tuple(size or case.shape[1:])
    sized = dataclasses.replace(case, shape=(b, h, w))
    nhwc = verify._nhwc
    rows, prepared = [], []
    for seed in seeds:
        torch.manual_seed(seed)
        net = mg._build_raw(official, case).float()
        mg.randomise(net, seed)
        net.eval()
        state = {k: v.numpy() for k, v in mg.release_state(case, net.state_dict()).items()}
        inputs = mg.make_inputs(sized, np.random.default_rng(seed))
        with torch.no_grad(), mg._cuda_is_cpu():
            probe = net(*[torch.from_numpy(a) for a in inputs])
        probe = list(probe) if isinstance(probe, (list, tuple)) else [probe]
        wrng = np.random.default_rng(seed + 1)
        weights = [wrng.standard_normal(tuple(t.shape)).astype(np.float32) for t in probe]
        o64, i64, _, _ = mg.run(copy.deepcopy(net).double(), inputs, weights, torch.float64, {})
        runs = [mg.run(copy.deepcopy(net), [mg.nudge(inputs[0], 100 + j)] + inputs[1:] if j else
                       inputs, weights, torch.float32, {}) for j in range(3)]
        refs = [("output" + (f"[{i}]" if len(o64) > 1 else ""), o, True) for i, o in enumerate(o64)]
        refs += [(f"d loss / d input[{i}]", g, False) for i, g in enumerate(i64)]
        got_t = [r[0] + r[1] for r in runs]
        prepared.append((seed, state, inputs, weights, refs, got_t))

    def rel(a, ref, output):
        m = float(np.abs(ref).max())
        return float(np.abs(np.asarray(a, np.float64) - ref).max()) / (max(1.0, m) if output else m)

    flax_errs = {}
    for mode in modes:
        with lowering.accelerator_path(mode == "accelerator-path"), \
                jax.default_matmul_precision("highest"):
            for seed, state, inputs, weights, refs, _ in prepared:
                module = porting.torch_to_flax(case.registry, state, **overrides_of(case))
                module.eval()
                graphdef, params, rest = nnx.split(module, nnx.Param, ...)
                program = verify._flax_program(graphdef, True, len(inputs), True)
                g, outs = program([jnp.asarray(nhwc(w)) for w in weights], params, rest,
                                  *[jnp.asarray(nhwc(a)) for a in inputs])
                got = [np.asarray(o) for o in outs] + [np.asarray(x) for x in g[1:]]
                for (what, ref, output), a in zip(refs, got):
                    flax_errs[(seed, what, mode)] = rel(a, nhwc(ref), output)
    for seed, _, _, _, refs, got_t in prepared:
        for k, (what, ref, output) in enumerate(refs):
            rows.append({"family": family, "seed": seed, "what": what, "size": [b, h, w],
                         "original_float32": [rel(t[k], ref, output) for t in got_t],
                         "flax_float32": {m: flax_errs[(seed, what, m)] for m in modes}})
    return rows


def _times(seconds: dict) -> str:
    short = {"torch": "t32", "torch_float64": "t64", "torch_nudged": "nudged", "flax": "flax",
             "convert": "convert"}
    return " ".join(f"{short.get(k, k)} {v:.1f}" for k, v in seconds.items()) + " s"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, type=pathlib.Path)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--scratch", type=pathlib.Path, default=pathlib.Path("/tmp/verify_sweep"))
    parser.add_argument("--only", nargs="*", choices=sorted(FAMILIES))
    parser.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    parser.add_argument("--no-control", action="store_true", help="skip the mistake controls")
    parser.add_argument("--release-width", action="store_true",
                        help="the released channel widths instead of the reduced ones")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="the input's height and width (default: verify's, per family)")
    parser.add_argument("--accuracy", action="store_true",
                        help="instead of verdicts: Flax float32 and the original's own float32 "
                             "against the ORIGINAL's float64 (outputs, input gradients), one "
                             "model per seed 0..--files-1, no files written")
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    scratch = args.scratch.resolve()
    if HERE.parent in scratch.parents or scratch == HERE.parent:
        raise SystemExit(f"--scratch {scratch} is inside the repository")

    from flaxrestore.xla_cpu import tuning

    tuning.cpu_when_no_accelerator()  # as the command line: before jax starts

    import torch

    from flaxrestore import lowering

    torch.set_num_threads(1)  # tiny tensors: threads only wait for each other on a shared CPU
    official = str(args.official.resolve())
    families = args.only or list(FAMILIES)
    t_start = time.perf_counter()
    cases = {fam: case_of(fam, args.release_width) for fam in families}
    if args.accuracy:
        rows = [r for fam in families for r in accuracy(
            official, fam, cases[fam], range(args.files), args.size, args.modes)]
        print(f"{'family':<10} {'seed':>4} {'tensor':<22} {'original f32 (3 runs)':<30} "
              + " ".join(f"{'flax ' + m:>22}" for m in args.modes))
        for r in rows:
            print(f"{r['family']:<10} {r['seed']:>4} {r['what']:<22} "
                  f"{' '.join(f'{e:.1e}' for e in r['original_float32']):<30} "
                  + " ".join(f"{r['flax_float32'][m]:22.1e}" for m in args.modes))
        print(f"total {(time.perf_counter() - t_start) / 60:.1f} min")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows},
                                            indent=1) + "\n")
        return 0
    files = {}
    for fam in families:
        t0 = time.perf_counter()
        files[fam] = write_files(official, cases[fam], args.files, scratch)
        print(f"[sweep] {fam}: {len(files[fam])} files by the original code in "
              f"{files[fam][0].parent} ({time.perf_counter() - t0:.0f} s)", flush=True)

    results = {}
    for mode in args.modes:
        with lowering.accelerator_path(mode == "accelerator-path"):
            for fam in families:
                t0 = time.perf_counter()
                runs = []
                for i, path in enumerate(files[fam]):
                    s = summarise(judge(fam, cases[fam], path, seed=i, size=args.size))
                    s["file"] = path.name
                    runs.append(s)
                    top = s["tightest"][0]
                    print(f"[sweep] {mode} {fam} {path.name}: {'PASS' if s['ok'] else 'FAIL'} "
                          f"tightest {top['margin']:.3f} {top['what']} "
                          f"({_times(s['seconds'])})", flush=True)
                    if not s["ok"]:
                        print("        " + s["verdict"], flush=True)
                control = None
                if not args.no_control:
                    rep = judge(fam, cases[fam], files[fam][-1], seed=len(files[fam]) - 1,
                                mistake=True, size=args.size)
                    control = {"mistake": MISTAKES[fam][0], "failed": not rep.ok(),
                               "verdict": rep.verdict(),
                               "outside": len([d for d in rep.failures()])}
                    print(f"[sweep] {mode} {fam} control ({MISTAKES[fam][0]}): "
                          f"{'FAIL (caught)' if control['failed'] else 'PASS (MISSED)'}: "
                          f"{control['outside']} tensors outside", flush=True)
                results[(fam, mode)] = {"runs": runs, "control": control,
                                        "wall_s": time.perf_counter() - t0}

    total = time.perf_counter() - t_start
    print()
    print(f"{'family':<10} {'lowering':<17} {'files':>5} {'FAILs':>5} {'tightest':>8}  "
          f"{'median':>6}  {'control':<7} {'wall':>6}  tensor (file)")
    for (fam, mode), r in results.items():
        runs = r["runs"]
        worst = max(runs, key=lambda s: s["tightest"][0]["margin"])
        top = worst["tightest"][0]
        med = statistics.median(s["tightest"][0]["margin"] for s in runs)
        ctl = "-" if r["control"] is None else ("caught" if r["control"]["failed"] else "MISSED")
        print(f"{fam:<10} {mode:<17} {len(runs):>5} {sum(not s['ok'] for s in runs):>5} "
              f"{top['margin']:8.3f}  {med:6.3f}  {ctl:<7} {r['wall_s']:5.0f}s  "
              f"{top['what']} ({worst['file']})")
    print(f"total {total / 60:.1f} min")
    if args.json:
        import jax
        import torch as _t

        doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(sys.argv), "files": args.files, "total_s": total,
               "versions": {"jax": jax.__version__, "torch": _t.__version__},
               "size": args.size, "release_width": args.release_width,
               "cases": {fam: dataclasses.asdict(cases[fam]) for fam in families},
               "results": [{"family": fam, "mode": mode, **r} for (fam, mode), r in results.items()]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(s["ok"] for r in results.values() for s in r["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
