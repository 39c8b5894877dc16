"""Shared-memory segments: named ones are shared by name; a private one (the embedded store's
slab, huge=True) is anonymous memory that leaves no name behind."""

import os

import numpy as np

from tierstore.tiers import shm


def test_named_segment_is_seen_by_an_attacher_and_is_0600():
    name = f"tierstore-test-{os.getpid()}-named"
    seg = shm.create(name, (4, 3), np.float32, unlink=False)
    try:
        assert os.stat(os.path.join(shm.SHM_DIR, name)).st_mode & 0o777 == 0o600
        seg.array[2] = 7.0
        other = shm.attach(name, (4, 3), np.float32, writable=False)
        assert (other.array[2] == 7.0).all() and (other.array[0] == 0).all()
        other.close()
    finally:
        seg.close()
        shm.unlink(name)


def test_private_huge_segment_is_zeroed_writable_and_nameless():
    name = f"tierstore-test-{os.getpid()}-private"
    seg = shm.create(name, (1 << 20, 8), np.float32, unlink=True, huge=True)
    assert not os.path.exists(os.path.join(shm.SHM_DIR, name))
    assert seg.array.shape == (1 << 20, 8) and not seg.array[::4096].any()
    seg.array[12345] = 3.0
    assert seg.array.sum() == 24.0
    seg.close()
