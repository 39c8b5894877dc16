"""The prepared (columnar, memory-mappable) form of a Criteo TSV, and its reader.

    OUT/manifest.json              format, schema, hash version, shards and their row counts
    OUT/shard-00000/labels.u8      uint8 [n]          0/1
    OUT/shard-00000/dense.f32      float32 [n, 13]    log1p(max(x, 0)), missing -> 0
    OUT/shard-00000/sparse.i64     int64 [n, 26]      hashed ids (schema.HASH_VERSION), 0 = missing
    OUT/shard-00001/...

Files are raw little-endian arrays (``numpy.memmap(path, dtype, "r", shape=...)`` opens them);
the manifest, written last, holds their shapes. ``prepare`` writes into ``OUT.partial-PID`` and
renames it to ``OUT`` when done, so ``OUT`` is either complete or absent. Splits: ``train`` is
every shard but the last, ``eval`` the last one (prepare with a ``shard_rows`` that makes at
least two shards).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterator

import numpy as np

from tierstore.data.base import Dataset, check_split
from tierstore.data.schema import (
    DENSE_KEYS,
    HASH_VERSION,
    MISSING_ID,
    NUM_DENSE,
    NUM_SPARSE,
    SPARSE_KEYS,
    Chunk,
)
from tierstore.data.tsv import TsvDataset

FORMAT = "tierstore-criteo-columnar"
VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_ROWS = 1 << 21
COLUMNS = {"labels": ("labels.u8", "<u1", []),
           "dense": ("dense.f32", "<f4", [NUM_DENSE]),
           "sparse": ("sparse.i64", "<i8", [NUM_SPARSE])}


class _ShardWriter:
    def __init__(self, root: str, index: int) -> None:
        self.name = f"shard-{index:05d}"
        self.dir = os.path.join(root, self.name)
        os.makedirs(self.dir)
        self.files = {k: open(os.path.join(self.dir, fn), "wb") for k, (fn, _, _) in COLUMNS.items()}
        self.rows = 0

    def write(self, labels: np.ndarray, dense: np.ndarray, sparse: np.ndarray) -> None:
        self.files["labels"].write(labels.astype("<u1").tobytes())
        self.files["dense"].write(np.ascontiguousarray(dense, dtype="<f4").tobytes())
        self.files["sparse"].write(np.ascontiguousarray(sparse, dtype="<i8").tobytes())
        self.rows += len(labels)

    def close(self) -> dict[str, Any]:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        return {"dir": self.name, "rows": self.rows}


def prepare(src: str, out: str, shard_rows: int = DEFAULT_SHARD_ROWS, strict: bool = False,
            progress: bool = True, block_bytes: int = 1 << 19) -> dict[str, Any]:
    """Convert the Criteo TSV(.gz) ``src`` into the prepared form at ``out`` (which must not
    exist); returns the manifest. Malformed lines are skipped with warnings (or raise with
    ``strict``) exactly as when reading the TSV."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; give a new directory")
    total = os.path.getsize(src)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"prepare {os.path.basename(src)}")

    def on_read(n: int) -> None:
        if bar is not None:
            bar.update(n - bar.n)

    reader = TsvDataset(src, strict=strict, block_bytes=block_bytes, on_read=on_read)
    tmp = f"{out.rstrip(os.sep)}.partial-{os.getpid()}"
    os.makedirs(tmp)
    shards: list[dict[str, Any]] = []
    writer: _ShardWriter | None = None
    try:
        for _, chunk in reader.chunks(reader.start(0)[0]):
            labels, dense = chunk.labels, chunk.dense
            sparse = np.stack(chunk.sparse, axis=1)
            at = 0
            while at < len(labels):
                if writer is None:
                    writer = _ShardWriter(tmp, len(shards))
                take = min(len(labels) - at, shard_rows - writer.rows)
                writer.write(labels[at:at + take], dense[at:at + take], sparse[at:at + take])
                at += take
                if writer.rows == shard_rows:
                    shards.append(writer.close())
                    writer = None
            if bar is not None:
                bar.set_postfix(rows=f"{sum(s['rows'] for s in shards) + (writer.rows if writer else 0):,}",
                                refresh=False)
        if writer is not None:
            shards.append(writer.close())
            writer = None
        manifest = {
            "format": FORMAT, "version": VERSION, "hash": HASH_VERSION, "missing_id": MISSING_ID,
            "dense_transform": "log1p(max(x, 0)), missing -> 0",
            "dense_keys": list(DENSE_KEYS), "sparse_keys": list(SPARSE_KEYS),
            "columns": {k: {"file": fn, "dtype": dt, "shape": ["rows", *shape]}
                        for k, (fn, dt, shape) in COLUMNS.items()},
            "shards": shards, "rows": sum(s["rows"] for s in shards),
            "splits": {"train": "every shard but the last", "eval": "the last shard"},
            "source": {"path": os.path.abspath(src), "bytes": total, "gzip": reader.gzip,
                       "lines": reader.lines, "malformed": reader.malformed,
                       "first_malformed": reader.first_malformed},
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, out)
    except BaseException:
        if writer is not None:
            for fh in writer.files.values():
                fh.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return manifest


def is_prepared(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


class PreparedDataset(Dataset):
    """A directory written by :func:`prepare`, read through memory maps in chunks of
    ``chunk_rows`` rows."""

    kind = "prepared"

    def __init__(self, path: str, split: str = "all", chunk_rows: int = 1 << 16) -> None:
        self.path = os.path.abspath(path)
        mpath = os.path.join(self.path, MANIFEST)
        if not os.path.isfile(mpath):
            raise FileNotFoundError(f"{path} is not a prepared dataset (no {MANIFEST}); make one "
                                    "with `tierstore data prepare SRC OUT`")
        with open(mpath) as f:
            self.manifest = json.load(f)
        m = self.manifest
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise ValueError(f"{path}: format {m.get('format')!r} version {m.get('version')!r}; "
                             f"this reader knows {FORMAT!r} version {VERSION}")
        if m.get("hash") != HASH_VERSION:
            raise ValueError(f"{path}: ids hashed with {m.get('hash')!r}, not {HASH_VERSION!r}")
        self.split = check_split(split)
        shards = m["shards"]
        if self.split != "all" and len(shards) < 2:
            raise ValueError(f"{path} has {len(shards)} shard(s); the {split!r} split needs at "
                             "least two (eval is the last): prepare again with a smaller "
                             "--shard-rows")
        self.shards = {"all": shards, "train": shards[:-1], "eval": shards[-1:]}[self.split]
        self.num_samples = sum(s["rows"] for s in self.shards)
        self.chunk_rows = int(chunk_rows)
        self._maps: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "split": self.split,
                "rows": self.num_samples, "hash": HASH_VERSION}

    def shard_arrays(self, shard: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels uint8 [n], dense float32 [n, 13], sparse int64 [n, 26]) memory maps."""
        if shard["dir"] not in self._maps:
            n = shard["rows"]
            arrs = []
            for fn, dt, shape in COLUMNS.values():
                p = os.path.join(self.path, shard["dir"], fn)
                arrs.append(np.memmap(p, dtype=dt, mode="r", shape=(n, *shape)))
            self._maps[shard["dir"]] = tuple(arrs)  # type: ignore[assignment]
        return self._maps[shard["dir"]]

    def start(self, sample: int) -> tuple[dict[str, Any], int]:
        return {"sample": int(sample)}, 0

    def chunks(self, position: dict[str, Any]) -> Iterator[tuple[dict[str, Any], Chunk]]:
        s = int(position["sample"])
        base = 0
        for shard in self.shards:
            n = shard["rows"]
            while base <= s < base + n:
                labels, dense, sparse = self.shard_arrays(shard)
                a = s - base
                b = min(n, a + self.chunk_rows)
                yield {"sample": s}, Chunk.from_matrix(labels[a:b].astype(np.float32),
                                                       dense[a:b], sparse[a:b])
                s = base + b
            base += n

    def close(self) -> None:
        self._maps.clear()
