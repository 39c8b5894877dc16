"""tierstore: tiered embedding storage (DRAM / SCM) for recommendation models.

    import tierstore
    with tierstore.Store("/tmp/ts", ddr_bytes=64 << 20) as store:
        t = store.create_table(tierstore.TableSpec("user", num_rows=10**6, dim=64,
                                                   optimizer=tierstore.RowWiseAdagrad(lr=0.05)))
        out = store.pooled("user", indices, offsets)            # [B, 64]
        store.apply_pooled_gradients("user", indices, offsets, grad_out)
"""

from tierstore.config import TableSpec
from tierstore.errors import (ConnectionLost, CorruptStore, InvalidInput, InvalidSpec, StoreLocked, TableExists,
                              TierstoreError, UnknownTable)
from tierstore.optim.sparse import SGD, Adagrad, RowWiseAdagrad
from tierstore.store import Store, Table

__version__ = "0.1.0"

__all__ = ["Store", "Table", "TableSpec", "SGD", "RowWiseAdagrad", "Adagrad", "TierstoreError",
           "StoreLocked", "UnknownTable", "TableExists", "InvalidInput", "InvalidSpec",
           "CorruptStore", "ConnectionLost"]
