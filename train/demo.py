"""``make demo`` for the trainer: a tiny Restormer learns to restore the built-in demo images.

    python -m train.demo [--workdir demo_out/train] [--config restormer_demo] [--steps N]

1. trains the ``restormer_demo`` recipe (the real-denoising recipe shrunk to a few minutes on
   2 CPU cores) from scratch, printing the validation PSNR as it rises;
2. saves before / after / ground-truth images of the validation set in ``WORKDIR/images``;
3. exports the final weights to a PyTorch file (``porting.flax_to_torch`` + ``torch.save``) and
   verifies it: the torch reference (``porting.reference.build``) loads it strictly and restores
   a validation image like the Flax model does.

Steps 1-2 need only JAX; step 3 needs torch (``pip install flaxrestore[torch]``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np


def _save_images(workdir: str, recipe, model, state, count: int = 3) -> list[str]:
    from PIL import Image

    from train import checkpointing, evaluation, step as step_lib

    mesh = step_lib.make_mesh()
    val = evaluation.load_val_set(recipe)[:count]
    evaluator = evaluation.Evaluator(recipe, model, mesh, val)
    outs = evaluator.restore_all(checkpointing.eval_params(recipe, state), state["model_state"])
    os.makedirs(os.path.join(workdir, "images"), exist_ok=True)
    paths = []
    for item, out in zip(val, outs):
        row = np.concatenate([item["lq"], out, item["gt"]], axis=1)
        row = (np.clip(row, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        if row.shape[-1] == 1:
            row = row[..., 0]
        path = os.path.join(workdir, "images", f"{item['name']}_before_after_gt.png")
        Image.fromarray(row).save(path)
        paths.append(path)
    return paths


def _export_and_verify(workdir: str, recipe) -> tuple[str, float]:
    """Writes WORKDIR/<name>.pth from the exported Flax model and checks it with torch."""
    import torch

    import porting
    from flaxrestore import checkpoints
    from porting import reference
    from train import evaluation

    module = checkpoints.load_model(os.path.join(workdir, "export", "final"))
    path = os.path.join(workdir, f"{recipe.model.replace(':', '_')}_demo.pth")
    torch.save({"params": porting.flax_to_torch(module)}, path)

    ref = reference.build(recipe.model, **dict(recipe.model_overrides))
    state = torch.load(path, map_location="cpu", weights_only=True)["params"]
    ref.load_state_dict(state, strict=True)
    ref.eval()
    from flaxrestore import models

    protocol = models.protocol(module)
    item = evaluation.load_val_set(recipe)[0]
    x = item["lq"][None]  # NHWC; the demo images' sides are multiples of 16
    inputs = [np.asarray(a, np.float32) for a in protocol.inputs(x)]
    module.eval()
    ours = np.asarray(protocol.image(module(*inputs)))
    with torch.no_grad():
        theirs = protocol.image(ref(*[torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
                                       for a in inputs]))
    theirs = theirs.numpy().transpose(0, 2, 3, 1)
    rel = float(np.max(np.abs(ours - theirs)) / max(1.0, float(np.max(np.abs(theirs)))))
    return path, rel


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join("demo_out", "train"))
    p.add_argument("--config", default="restormer_demo")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's total steps")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch export and check")
    args = p.parse_args(argv)

    from flaxrestore.xla_cpu import tuning

    tuning.tune_cpu_process()  # as `python -m train` does, before jax starts
    from train import loop, recipe as recipe_lib

    overrides = [f"total_steps={args.steps}"] if args.steps else []
    recipe = recipe_lib.load(args.config, overrides)
    workdir = os.path.abspath(args.workdir)
    if os.path.exists(workdir):  # a demo starts from scratch
        shutil.rmtree(workdir)
    t0 = time.time()
    print(f"== training {recipe.name} ({recipe.total_steps} steps) in {workdir}", flush=True)
    result = loop.train(recipe, workdir)
    minutes = (time.time() - t0) / 60

    base = None
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == "val_input":
                base = r["psnr"]
    print("\n== validation PSNR (dB) over the run")
    if base is not None:
        print(f"   degraded input      {base:7.3f}")
    for step, values in result.evals:
        print(f"   after step {step:5d}    {values['psnr']:7.3f}   (SSIM {values['ssim']:.4f})")
    psnrs = [v["psnr"] for _, v in result.evals]
    rising = len(psnrs) >= 2 and psnrs[-1] > psnrs[0] and (base is None or psnrs[-1] > base)
    print(f"   {'rising' if rising else 'NOT rising'}; trained in {minutes:.1f} min")

    paths = _save_images(workdir, recipe, result.model, result.state)
    print(f"\n== before | after | ground truth images: {', '.join(paths)}")

    ok = rising
    if not args.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("\n(torch not installed: skipping the PyTorch export check)")
        else:
            path, rel = _export_and_verify(workdir, recipe)
            good = rel <= 1e-4
            ok = ok and good
            print(f"\n== exported PyTorch weights: {path}")
            print(f"   torch reference vs Flax on a validation image: max relative difference "
                  f"{rel:.2e} ({'OK' if good else 'MISMATCH'}, limit 1e-4)")
    print(f"\n== demo {'OK' if ok else 'FAILED'} in {(time.time() - t0) / 60:.1f} min")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
