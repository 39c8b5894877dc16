"""Exceptions raised by tierstore. Every error names the table/argument at fault."""


class TierstoreError(Exception):
    """Base class of all tierstore errors."""


class StoreLocked(TierstoreError):
    """The store directory is already open in another process (or another Store object)."""


class UnknownTable(TierstoreError, KeyError):
    """No table of that name exists in the store."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown table"


class TableExists(TierstoreError):
    """create_table() with a name that is already in the catalog."""


class InvalidInput(TierstoreError, ValueError):
    """Bad ids, offsets, weights or gradients passed to a store operation."""


class InvalidSpec(TierstoreError, ValueError):
    """A TableSpec that cannot be stored (bad name, shape, dtype, or it does not fit)."""


class CorruptStore(TierstoreError):
    """On-disk state that fails its own consistency checks."""


class ConnectionLost(TierstoreError):
    """The ``tierstored`` service is not there (not started, or it died); connect() again."""


class AccessDenied(TierstoreError, PermissionError):
    """The service refused this client (another uid than the service's)."""
