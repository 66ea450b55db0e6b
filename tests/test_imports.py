"""Importing the packages does nothing but define things, and imports run one way.

One fresh interpreter imports the third-party libraries, then every module of flaxrestore, then of train, then of porting, and
reports what changed: the environment (XLA_FLAGS and friends), a started JAX backend, libc loaded
for malloc tuning, logging handlers, files written to the working directory, and which packages
each layer pulled in. Process tuning is an explicit call in the entry points
(``flaxrestore.xla_cpu.tuning.tune_cpu_process``), never an import side effect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import ctypes, importlib, json, logging, os, pkgutil, sys
# third-party libraries first: what they do on import (orbax adds a logging handler) is theirs
import grain, jax, optax, orbax.checkpoint
from flax import nnx
loaded_libs = []
_cdll_init = ctypes.CDLL.__init__
def _recording_init(self, name, *a, **k):
    loaded_libs.append(str(name))
    return _cdll_init(self, name, *a, **k)
ctypes.CDLL.__init__ = _recording_init
env0 = dict(os.environ)
handlers0 = list(logging.getLogger().handlers)
files0 = set(os.listdir("."))

def modules(pkg):
    mod = importlib.import_module(pkg)
    names = [pkg]
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        if ".configs." in info.name or info.name.endswith(".configs"):
            continue
        names.append(info.name)
    return names

report = {}
for layer in ("flaxrestore", "train", "porting"):
    for name in modules(layer):
        importlib.import_module(name)
    report[layer] = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "train", "porting"})
from jax._src import xla_bridge
report["backend_started"] = xla_bridge.backends_are_initialized()
report["env_changed"] = sorted(k for k in set(env0) | set(os.environ) if env0.get(k) != os.environ.get(k))
report["libc_loaded"] = [n for n in loaded_libs if "libc" in n]
report["root_handlers_added"] = len(logging.getLogger().handlers) - len(handlers0)
report["files_written"] = sorted(set(os.listdir(".")) - files0)
print("REPORT " + json.dumps(report))
"""


def test_importing_every_module_has_no_side_effects_and_layers_import_one_way(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    assert report["flaxrestore"] == [], report  # flaxrestore pulls in neither train, porting nor torch
    assert report["train"] == ["train"], report  # train: no torch, no porting
    assert "torch" in report["porting"]  # (and the bridge does load torch)
    assert report["backend_started"] is False
    assert report["env_changed"] == []
    assert report["libc_loaded"] == []
    assert report["root_handlers_added"] == 0
    assert report["files_written"] == []
