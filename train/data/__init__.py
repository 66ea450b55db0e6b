"""Paired training data on grain: dataset layouts, crops and augmentations, and the built-in demo data.

The package owns everything between image files on disk (or the shipped demo images) and the
batches the trainer consumes. The trainer loads it by name (``Recipe.data_module``, default
``train.data``) and uses ``DataConfig``, ``make_train_iterator`` and ``make_val_dataset``; another
module with those three can stand in for it.

Where each job lives
--------------------

``images``      decoding files to float32, header reads, grey conversion (``luma``), ``DataError``.
``layouts``     the dataset folder layouts (``LAYOUTS``: kind -> lister; the table of layouts is in
                its docstring), pairing files, header checks and bad-pair skipping (``list_pairs``).
``config``      ``DataConfig`` and its validation; ``KINDS`` ('demo' plus the layouts).
``transforms``  the per-sample grain transforms: load, pad + crop, geometric augmentation, noise
                synthesis (the pipeline and the augmentation modes are in its docstring).
``sources``     this host's training records and the transforms that start and finish a sample,
                for folders and for the demo data (shipped images + ``train.degrade``); the
                validation sets.
``pipeline``    the grain chains: ``make_train_dataset`` / ``make_train_iterator`` /
                ``make_val_dataset``, per-host seeds and sharding, worker processes.

API (what the trainer uses)
---------------------------

``DataConfig``
    Frozen dataclass describing one data source (fields documented on the class).

``make_train_iterator(cfg, *, batch_size, seed, process_index=0, process_count=1)``
    A ``grain.DatasetIterator`` yielding ``{"lq": float32 (B, P, P, C), "gt": float32 (B, P, P, C)}``
    in [0, 1] (NHWC; ``lq`` from synthetic Gaussian noise is left unclipped, as Restormer does), with
    ``B = batch_size`` the PER-HOST batch and ``P = cfg.patch_size``. Infinite: epochs repeat, each
    one reshuffled. Deterministic given ``seed``; ``num_workers`` 0 and 1 give the same batches, more
    workers a different (still deterministic) order, since each worker builds whole batches from its
    slice of the stream, so keep ``num_workers`` fixed across a run and its resumes. Host ``process_index``
    of ``process_count`` reads only its shard (every ``process_count``-th file pair of the sorted
    list). ``iterator.get_state()`` / ``iterator.set_state(state)`` save and restore the exact
    position (the state is a small JSON-able dict; store it in the checkpoint).

``make_train_dataset(...)``
    The same pipeline as a ``grain.IterDataset`` (same arguments), for composing further.

``make_val_dataset(cfg) -> Sequence[dict]``
    Full-size images ``{"lq": float32 (H, W, C), "gt": float32 (H, W, C), "name": str}``, in a fixed
    order, loaded lazily on indexing. It reads ``cfg.val_root`` (layout ``cfg.val_kind`` or
    ``cfg.kind``), or ``cfg.root`` when no ``val_root`` is set (so a separate validation
    ``DataConfig`` works too). For ``kind='demo'`` it is a fixed set of tiles cut from shipped images
    that training never sees, degraded with a fixed seed.

``list_pairs(kind, root, ...) -> PairList``
    The sorted, checked file pairs of a dataset folder, and what was skipped.

``load_image(path, channels)``, ``demo_images()``
    One decoded image file; the shipped clean demo images by name (``DEMO_VAL_IMAGES`` held out).

``DataError``
    Raised for unusable data; the message names the file(s).

Bad data: a file that cannot be decoded, an lq without its gt (or the reverse), lq/gt of different
sizes, and a grayscale/RGB mix (a grayscale file in an RGB dataset, or a pair with one of each)
raise ``DataError`` naming the file. With ``skip_bad=True`` such pairs are skipped and counted
instead: problems found when listing (headers are read for every pair) are logged once with their
count; a file that only fails when fully decoded is logged and skipped when it is reached. With
``channels=1`` colour files are converted to grey (ITU-R 601 luma), like Restormer's grey data.
"""

from train.data.config import AUGMENT_MODES, KINDS, DataConfig
from train.data.images import DataError, load_image
from train.data.layouts import PairList, list_pairs
from train.data.pipeline import make_train_dataset, make_train_iterator, make_val_dataset
from train.data.sources import DEMO_VAL_IMAGES, demo_images

__all__ = [
    "DataConfig", "DataError", "PairList", "make_train_iterator", "make_train_dataset",
    "make_val_dataset", "list_pairs", "load_image", "demo_images", "KINDS", "AUGMENT_MODES",
    "DEMO_VAL_IMAGES",
]
