"""Pins: how a client reads and writes the shared DRAM slab while the service evicts.

The service (one process) owns admission and eviction; clients (other processes) read resident
rows straight from the shared slab and the table's writer updates them in place. A row must not
be evicted between the moment a client finds its slot and the moment it is done with it. Two
small shared arrays make that safe without a round trip:

- the table's control words ``ctrl`` (int64[CTRL_WORDS]): ``ctrl[GEN]`` is odd while the service
  is evicting/admitting and is bumped before and after; ``ctrl[RETIRED]`` is 1 once the service
  has replaced this slab (the client must attach again);
- one pin array per (client, table): ``pins`` (uint32[capacity + 1], indexed like the slab) and a
  header (int64[HEADER_WORDS]) whose ``SEQ`` word is the client's current operation number.
  ``pins[p] == SEQ`` means "slab row p is in use by my current operation". Starting the next
  operation (SEQ + 1) releases all pins at once.

Protocol (a seqlock plus Dekker-style pins; both sides issue a full memory fence):

client:  g0 = ctrl[GEN]; fence; p = index[id] for each id; pins[p] = SEQ; fence; g1 = ctrl[GEN]
         -> the positions are valid iff g0 == g1 and g0 is even (else ask the service);
service: ctrl[GEN] += 1; fence; read every client's pins; evict only unpinned slots; admit;
         fence; ctrl[GEN] += 1.

Either the client sees the service's odd generation (and retries through the service) or the
service sees the client's pins (and leaves those slots alone): the two fences forbid both loads
from missing the other side's store. Positions handed out by the service are pinned by the
service itself before it replies.

Reads of a batch whose rows are all resident need no pins: they are a seqlock reader
(:func:`read_begin`, gather, :func:`read_valid`): a result computed while the service
evicted or admitted is thrown away and the batch goes through the pinned path. Writes always
pin (an update cannot be retried).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from tierstore.optim import kernels
from tierstore.tiers.index import IN_RANGE, identity_positions

_JIT = dict(nogil=True, cache=True)

CTRL_WORDS, GEN, RETIRED = 8, 0, 1
HEADER_WORDS, SEQ, LOOKUPS, HITS = 8, 0, 1, 2
HEADER_BYTES = HEADER_WORDS * 8

#: statuses of :func:`pin_positions`: those of ``kernels.gather_positions``, plus two
ALL_RESIDENT, SOME_MISSING, OUT_OF_RANGE = (kernels.ALL_RESIDENT, kernels.SOME_MISSING,
                                           kernels.OUT_OF_RANGE)
RETRY, STALE = 3, 4


@intrinsic
def _fence(typingctx):
    """A sequentially consistent memory fence (mfence on x86), also a compiler barrier."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return sig, codegen


@numba.njit(**_JIT)
def fence() -> None:
    """Full memory fence, callable from Python (the service's side of the protocol)."""
    _fence()


@numba.njit(**_JIT)
def pin_positions(ids, index, pins, seq, ctrl, out):
    """Client side: out[i] = index[ids[i]] and pin every resident position with ``seq``.

    Returns ALL_RESIDENT, SOME_MISSING (out is 0 for rows not in DRAM), OUT_OF_RANGE (an id
    outside the index; out incomplete), RETRY (the service evicted meanwhile: out is not to be
    trusted) or STALE (the slab was retired: attach again).
    """
    g0 = ctrl[GEN]
    _fence()
    n = index.shape[0]
    status = ALL_RESIDENT
    for i in range(ids.shape[0]):
        r = ids[i]
        if r < 0 or r >= n:
            return OUT_OF_RANGE
        p = index[r]
        out[i] = p
        if p == 0:
            status = SOME_MISSING
        else:
            pins[p] = seq
    _fence()
    if ctrl[RETIRED] != 0:
        return STALE
    if ctrl[GEN] != g0 or (g0 & 1) != 0:
        return RETRY
    return status


@numba.njit(**_JIT)
def pin_whole_table(ids, num_rows, pins, seq, ctrl, out):
    """Client side of :func:`pin_positions` for a whole table (row r in slot r, never
    evicted): out[i] = ids[i] + 1 with no index read, and one pin on position 1 (always
    occupied) instead of one per row. Nothing is evicted from such a slab, so the pin only has
    to hold off its retirement, which waits for every pin (and the client sees RETIRED).
    Returns ALL_RESIDENT, OUT_OF_RANGE or STALE."""
    if identity_positions(ids, num_rows, out) != IN_RANGE:
        return OUT_OF_RANGE
    pins[1] = seq
    _fence()
    if ctrl[RETIRED] != 0:
        return STALE
    return ALL_RESIDENT


@numba.njit(**_JIT)
def read_begin(ctrl):
    """Reader side of the seqlock: the generation before reading (then a fence)."""
    g = ctrl[GEN]
    _fence()
    return g


@numba.njit(**_JIT)
def read_valid(ctrl, g0):
    """After reading: True if no eviction/admission overlapped the read (fence, then the
    generation is still the even ``g0``) and the slab is not retired."""
    _fence()
    return ctrl[GEN] == g0 and (g0 & 1) == 0 and ctrl[RETIRED] == 0


@numba.njit(**_JIT)
def pin_given(pos, pins, seq):
    """Service side: pin the (non-zero) positions it hands to a client."""
    for i in range(pos.shape[0]):
        if pos[i] != 0:
            pins[pos[i]] = seq


def pinned_mask(pin_arrays: list[tuple[np.ndarray, np.ndarray]], capacity: int) -> np.ndarray:
    """bool[capacity] of policy slots (position - 1) pinned by any client.

    pin_arrays: (header int64[HEADER_WORDS], pins uint32[capacity + 1]) per attached client.
    Call between the service's fences (see module docstring).
    """
    mask = np.zeros(capacity, dtype=bool)
    for header, pins in pin_arrays:
        mask |= pins[1:] == np.uint32(int(header[SEQ]) & 0xFFFFFFFF)
    return mask
