"""Command line of the trainer.

    python -m train --list
    python -m train --config NAME[:ARG] --workdir DIR [--set key=value ...]      # train / resume
    python -m train evaluate --config NAME --workdir DIR [--checkpoint best|latest|STEP]
    python -m train export --config NAME --workdir DIR --out MODEL_DIR [--checkpoint ...]
    python -m train show --config NAME [--set ...]                              # print the recipe
    python -m train plan --config NAME --topology v5e:2x4 [--batch N] [--patch P] [--dtype ...]
                                                    # compile for a TPU slice, no TPU needed

Re-running a training command in the same workdir resumes it, from the newest checkpoint that
restores completely (damaged newer ones are named and set aside as ``<step>.damaged``). Exit
status: 0 done; 1 no intact checkpoint, or the one asked for cannot be restored; 3 non-finite
loss; 4 a checkpoint or export could not be written (the earlier ones are intact). Multi-host (TPU pods, several GPU
hosts): pass ``--distributed`` (or set ``TRAIN_DISTRIBUTED=1``) on every host; it calls
``jax.distributed.initialize()`` first (arguments from ``--coordinator``, ``--num-processes``,
``--process-id`` or the platform's environment; ``--heartbeat-timeout`` for how soon a silent host
counts as dead).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train the published restoration recipes (JAX, data-parallel, resumable).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("command", nargs="?", default="train",
                   choices=("train", "evaluate", "export", "show", "list", "plan"),
                   help="what to do (default: train)")
    p.add_argument("--config", help="recipe name in train/configs (NAME or NAME:ARG) or a .py file")
    p.add_argument("--workdir", help="directory of checkpoints, logs and exports")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field (dotted paths, Python literals); repeatable")
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("--checkpoint", default="best",
                   help="evaluate/export: 'best', 'latest' or a step number (default: best)")
    p.add_argument("--out", help="export: the Flax model directory to write")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps (the run resumes later up to total_steps)")
    p.add_argument("--distributed", action="store_true",
                   default=os.environ.get("TRAIN_DISTRIBUTED", "") not in ("", "0"),
                   help="call jax.distributed.initialize() (multi-host)")
    p.add_argument("--coordinator", help="coordinator address host:port (multi-host)")
    p.add_argument("--num-processes", type=int, help="number of hosts (multi-host)")
    p.add_argument("--process-id", type=int, help="this host's index (multi-host)")
    p.add_argument("--heartbeat-timeout", type=_positive_int, default=None, metavar="SECONDS",
                   help="multi-host: declare a silent host dead after this long and stop the "
                        "job (default: JAX's, 100 s); lower it to give a crashed host's slice "
                        "back sooner")
    from train import plan

    plan.add_arguments(p)
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _compilation_cache(workdir: str) -> None:
    """Compiled steps are cached on disk (in the workdir unless JAX_COMPILATION_CACHE_DIR is
    set), so a resumed run or an evaluation does not compile them again."""
    import jax

    if jax.default_backend() == "cpu" and jax.device_count() > 1:
        # jax 0.10: a multi-device CPU program loaded from the cache deadlocked in its first
        # collective (measured with simulated devices); compile those afresh
        jax.config.update("jax_enable_compilation_cache", False)
        return
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir",
                          os.path.join(os.path.abspath(workdir), "xla_cache"))
    if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.list or args.command == "list":
        from train import recipe as recipe_lib

        for name, line in recipe_lib.list_configs():
            print(f"{name:40s} {line}")
        return 0
    if not args.config:
        _parser().error("--config is required")
    multihost = [f for f, v in (("--coordinator", args.coordinator),
                                ("--num-processes", args.num_processes),
                                ("--process-id", args.process_id),
                                ("--heartbeat-timeout", args.heartbeat_timeout)) if v is not None]
    if multihost and not args.distributed:
        _parser().error(f"{', '.join(multihost)}: multi-host options, given without --distributed "
                        "(or TRAIN_DISTRIBUTED=1)")
    if args.command == "plan":  # deviceless TPU compile: no CPU process tuning
        from train import plan

        return plan.run(args, args.overrides)

    # process-wide XLA:CPU settings (memory-saving scheduler, glibc malloc), before jax starts
    from flaxrestore.xla_cpu import tuning

    tuning.tune_cpu_process()
    import jax

    if args.distributed:
        kw = {k: v for k, v in (("coordinator_address", args.coordinator),
                                ("num_processes", args.num_processes),
                                ("process_id", args.process_id),
                                ("heartbeat_timeout_seconds", args.heartbeat_timeout))
              if v is not None}
        jax.distributed.initialize(**kw)

    from train import checkpointing, recipe as recipe_lib

    recipe = recipe_lib.load(args.config, args.overrides)
    if args.command == "show":
        print(json.dumps(recipe_lib.to_dict(recipe), indent=2, default=str))
        return 0
    if not args.workdir:
        _parser().error("--workdir is required")
    _compilation_cache(args.workdir)
    try:
        return _run(args, recipe)
    except checkpointing.SaveFailed as e:
        import jax

        if jax.process_count() > 1:
            # orbax's threads of the failed save wait at barriers for the other processes,
            # which wait for this one: leave without them (the others stop as after a crash)
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(4)
        _join_orbax_threads()
        print(f"error: {e}", file=sys.stderr)
        return 4
    except checkpointing.CheckpointError as e:  # no intact checkpoint, the one asked is damaged
        print(f"error: {e}", file=sys.stderr)
        return 1


def _join_orbax_threads(timeout: float = 60.0) -> None:
    """Lets the threads a failed save left running (orbax's writers of the items that had not
    failed) finish before the error line and the exit: at exit they can no longer start work
    and end in tracebacks after the error line."""
    import threading
    import time

    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if type(t).__module__.startswith("orbax.") and t is not threading.current_thread():
            try:
                t.join(max(0.0, deadline - time.monotonic()))
            except Exception:  # orbax's threads re-raise their failure in join()
                pass


def _run(args, recipe) -> int:
    from train import checkpointing, evaluation, logs, loop

    if args.command == "train":
        try:
            loop.train(recipe, args.workdir, max_steps=args.max_steps)
        except loop.NonFiniteLoss as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
        return 0
    if args.command == "evaluate":
        values = evaluation.evaluate(recipe, args.workdir, which=args.checkpoint)
        if logs.is_main_process():
            print(json.dumps(values))
        return 0
    if args.command == "export":
        if not args.out:
            _parser().error("export needs --out")
        path = checkpointing.export_checkpoint(recipe, args.workdir, args.out, which=args.checkpoint)
        if logs.is_main_process():
            print(f"wrote {path}; convert with: python -m porting export {recipe.model} {path} "
                  f"OUT.pth")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
