"""Storage tiers: DRAM (shared-memory slab + index) and SCM (row file, LMDB)."""
