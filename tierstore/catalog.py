"""The store's LMDB environment: the catalog (table specs, store metadata) and the rows of
``id_space="sparse"`` tables.

Layout inside ``<store>/catalog.lmdb``: named databases ``meta`` (format version, store id),
``tables`` (name -> TableSpec JSON) and ``rows:<table>`` for each sparse table (big-endian uint64
id -> row record). Every change is one LMDB transaction, so a killed process leaves either the
old or the new catalog, never a torn one.
"""

from __future__ import annotations

import itertools
import os
import uuid

import lmdb
import numpy as np

from tierstore.config import TableSpec
from tierstore.errors import CorruptStore, TableExists, UnknownTable
from tierstore.rowinit import initial_rows

FORMAT_VERSION = 1
MAP_SIZE = 1 << 40  # address space only; the file grows with its contents


class Catalog:
    """Table specs and store metadata, persisted in LMDB."""

    def __init__(self, store_path: str) -> None:
        path = os.path.join(store_path, "catalog.lmdb")
        os.makedirs(path, mode=0o700, exist_ok=True)  # LMDB's mode is for its files only
        self.env = lmdb.open(path, map_size=MAP_SIZE, max_dbs=4096, sync=False,
                             metasync=False, lock=True, mode=0o600)
        self.meta = self.env.open_db(b"meta")
        self.specs = self.env.open_db(b"tables")
        with self.env.begin(write=True) as txn:
            version = txn.get(b"format_version", db=self.meta)
            if version is None:
                txn.put(b"format_version", str(FORMAT_VERSION).encode(), db=self.meta)
                txn.put(b"store_id", uuid.uuid4().hex.encode(), db=self.meta)
            elif int(version) != FORMAT_VERSION:
                raise CorruptStore(f"store format {int(version)} is not supported "
                                   f"(this tierstore reads format {FORMAT_VERSION})")
            self.store_id = txn.get(b"store_id", db=self.meta).decode()

    def tables(self) -> dict[str, TableSpec]:
        with self.env.begin(db=self.specs) as txn:
            return {k.decode(): TableSpec.from_json(v) for k, v in txn.cursor()}

    def get(self, name: str) -> TableSpec:
        with self.env.begin(db=self.specs) as txn:
            raw = txn.get(name.encode())
        if raw is None:
            raise UnknownTable(f"unknown table {name!r}; tables: {sorted(self.tables())}")
        return TableSpec.from_json(raw)

    def add(self, spec: TableSpec) -> None:
        with self.env.begin(write=True, db=self.specs) as txn:
            if not txn.put(spec.name.encode(), spec.to_json().encode(), overwrite=False):
                raise TableExists(f"table {spec.name!r} already exists")

    def remove(self, name: str) -> None:
        """Delete a table's spec and, for sparse tables, its rows (one transaction)."""
        with self.env.begin(write=True) as txn:
            if not txn.delete(name.encode(), db=self.specs):
                raise UnknownTable(f"unknown table {name!r}")
            db = self.env.open_db(_rows_db(name), txn=txn)
            txn.drop(db, delete=True)

    def get_meta(self, key: str) -> str | None:
        with self.env.begin(db=self.meta) as txn:
            v = txn.get(key.encode())
        return None if v is None else v.decode()

    def set_meta(self, key: str, value: str) -> None:
        with self.env.begin(write=True, db=self.meta) as txn:
            txn.put(key.encode(), value.encode())

    def sync(self) -> None:
        self.env.sync(True)

    def disk_bytes(self) -> int:
        return self.env.info()["last_pgno"] * self.env.stat()["psize"]

    def close(self) -> None:
        self.env.close()


def _rows_db(name: str) -> bytes:
    return b"rows:" + name.encode()


class LmdbRows:
    """SCM tier of a sparse table: rows in an LMDB database, created on first write."""

    def __init__(self, catalog: Catalog, spec: TableSpec) -> None:
        self.env = catalog.env
        self.spec = spec
        self.layout = spec.layout
        self.db = self.env.open_db(_rows_db(spec.name))
        self._absent = bytes(self.layout.record_bytes)

    @staticmethod
    def _keys(rows: np.ndarray) -> list[bytes]:
        return np.ascontiguousarray(rows, dtype=">u8").view("V8").tolist()

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weights and state of ``rows``; absent rows are generated (not stored until written)."""
        keys = self._keys(rows)
        with self.env.begin(db=self.db) as txn:
            found = dict(txn.cursor().getmulti(keys))
        vals = b"".join(map(found.get, keys, itertools.repeat(self._absent, len(keys))))
        rec = np.frombuffer(vals, dtype=np.uint8).reshape(len(keys), self.layout.record_bytes)
        w, s, written = self.layout.unpack(rec)
        if not written.all():
            fresh = ~written
            w[fresh] = initial_rows(self.spec.init, self.spec.seed, rows[fresh], self.spec.dim,
                                    self.layout.np_dtype)
            s[fresh] = 0.0
        return w, s

    def write(self, rows: np.ndarray, w: np.ndarray, s: np.ndarray) -> None:
        if len(rows) == 0:
            return
        rec = self.layout.pack(w, s)
        vals = rec.view(f"V{self.layout.record_bytes}").reshape(-1).tolist()
        with self.env.begin(write=True, db=self.db) as txn:
            txn.cursor().putmulti(zip(self._keys(rows), vals))

    def flush(self) -> None:
        self.env.sync(True)

    def written_rows(self) -> np.ndarray:
        """Sorted ids of every stored row."""
        with self.env.begin(db=self.db) as txn:
            keys = b"".join(txn.cursor().iternext(keys=True, values=False))
        return np.frombuffer(keys, dtype=">u8").astype(np.int64)

    def clear(self) -> None:
        """Delete every stored row (they read as initial values again)."""
        with self.env.begin(write=True) as txn:
            txn.drop(self.db, delete=False)

    def rows_written(self) -> int:
        with self.env.begin() as txn:
            return txn.stat(self.db)["entries"]

    def disk_bytes(self) -> int:
        with self.env.begin() as txn:
            st = txn.stat(self.db)
        return (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * st["psize"]

    def close(self) -> None:
        """Nothing to release: the LMDB environment belongs to the catalog."""
