"""Click data for training: Criteo TSV files, their prepared columnar form and a synthetic
generator with a planted click model, all read as KeyedJaggedTensor-style batches.

    from tierstore.data import open_dataset, batches
    ds = open_dataset("synthetic:criteo_kaggle,scale=0.01,seed=0")   # or a TSV(.gz) / prepared dir
    it = batches(ds, 2048)
    b = next(it)               # b.keys, b.values, b.lengths, b.offsets, b.dense, b.labels
    state = it.state_dict()    # resume later: it.load_state_dict(state)

See docs/data.md.
"""

from __future__ import annotations

import os
from typing import Any

from tierstore.data.base import SPLITS, Dataset
from tierstore.data.batches import Batch, BatchIterator, batches
from tierstore.data.prepared import PreparedDataset, is_prepared, prepare
from tierstore.data.schema import (
    DENSE_KEYS,
    HASH_VERSION,
    MISSING_ID,
    NUM_DENSE,
    NUM_SPARSE,
    SPARSE_KEYS,
    hash_categorical,
    hash_hex,
)
from tierstore.data.synthetic import (
    PROFILES,
    PlantedModel,
    Profile,
    SyntheticDataset,
    binary_logloss,
    get_profile,
)
from tierstore.data.tsv import MalformedLine, MalformedLineWarning, TsvDataset


def open_dataset(spec: str | os.PathLike[str] | Dataset, split: str = "all",
                 **options: Any) -> Dataset:
    """The dataset ``spec`` names, for ``split`` ("all", "train" or "eval"):

    * ``synthetic[:PROFILE][,scale=S][,seed=N][,pooling=P][,num_samples=N]`` (options may also
      be keywords) -> :class:`SyntheticDataset` (train/all and eval are separate streams);
    * a directory made by :func:`prepare` -> :class:`PreparedDataset` (eval: the last shard);
    * a TSV file, plain or gzip -> :class:`TsvDataset` (eval: every 10th line; ``strict=True``
      raises on a malformed line).

    Keyword options go to that class (``strict`` is dropped for the ones without it).
    """
    if isinstance(spec, Dataset):
        return spec
    s = os.fspath(spec)
    if s == "synthetic" or s.startswith(("synthetic:", "synthetic,")):
        options.pop("strict", None)
        return SyntheticDataset.from_spec(s, split=split, **options)
    if os.path.isdir(s):
        options.pop("strict", None)
        return PreparedDataset(s, split=split, **options)
    if os.path.isfile(s):
        return TsvDataset(s, split=split, **options)
    raise FileNotFoundError(f"no such data {s!r}: give a Criteo TSV(.gz) file, a directory made "
                            "by `tierstore data prepare`, or synthetic[:PROFILE] (profiles: "
                            f"{', '.join(sorted(PROFILES))})")


__all__ = ["open_dataset", "batches", "Batch", "BatchIterator", "Dataset", "SPLITS",
           "TsvDataset", "PreparedDataset", "SyntheticDataset", "prepare", "is_prepared",
           "Profile", "PROFILES", "get_profile", "PlantedModel", "binary_logloss",
           "MalformedLine", "MalformedLineWarning", "hash_categorical", "hash_hex",
           "DENSE_KEYS", "SPARSE_KEYS", "NUM_DENSE", "NUM_SPARSE", "MISSING_ID", "HASH_VERSION"]
