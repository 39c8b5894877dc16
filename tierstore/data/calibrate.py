"""Fit of the synthetic `meta` profile to Meta's reuse histograms (and the check of any profile).

    python -m tierstore.data.calibrate [--stats PATH] [--fit] [--profile meta]

Meta's ``locality_stats.txt`` (facebookresearch/dlrm_datasets, embedding_bag/2021) gives, for a
batch file of 65,536 samples over 856 tables (887,017,990 lookups, i.e. about 1.04 M per table),
the share of distinct rows touched 1, 2, (2, 4], ... times and the share of all lookups that
fall on the rows of each bin. The same histograms are computed here on a window of
:data:`WINDOW` lookups per feature of the synthetic id stream (ids of different features are
different rows) and compared bin by bin.

The `meta` profile has 26 features whose rows are log-spaced between ``rows_min`` and
``rows_max``, power-law exponents linear from ``alpha_min`` (smallest table) to ``alpha_max``
(largest) and the reuse probability of the temporal-locality step; ``--fit`` runs a
Nelder-Mead search of these on quarter-size windows and tables (a few minutes on one core) and
prints the best fit and its residual at full size. The result is
:data:`tierstore.data.synthetic.META_FIT`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

import numpy as np

from tierstore.data.synthetic import (
    META_FIT,
    Profile,
    _affine,
    get_profile,
    meta_like,
    power_law_ranks,
    repeat_recent,
)

DEFAULT_STATS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data",
                             "real", "meta-dlrm-locality-stats",
                             "locality_stats_2021_t856_bs65536.txt")
WINDOW = 887_017_990 // 856  # lookups per table in the 2021 batch file
BINS = 17                    # (0,1], (1,2], (2,4], ..., (16384,32768], 32768+


def load_locality_stats(path: str) -> list[dict[str, Any]]:
    """Every entry of a ``locality_stats.txt``: name, indices, unique, row_share [17] and
    lookup_share [17] (fractions, as printed)."""
    text = open(path).read()
    out = []
    for block in re.split(r"\n(?=\S+\.pt\n)", text.strip()):
        lines = block.splitlines()
        name = lines[0].strip()
        indices = int(re.search(r"Avg # of indices: (\d+)", block).group(1))
        unique = int(re.search(r"Avg # of unique cols: (\d+)", block).group(1))
        hists = []
        for head in ("Histogram of col sizes:", "Ratio of index distribution"):
            i = next(k for k, ln in enumerate(lines) if ln.startswith(head))
            hists.append(np.array([float(ln.rsplit(":", 1)[1]) for ln in lines[i + 1:i + 1 + BINS]]))
        out.append({"name": name, "indices": indices, "unique": unique,
                    "row_share": hists[0], "lookup_share": hists[1]})
    return out


def reuse_histogram(ids_per_feature: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(row share, lookup share) per reuse bin over all features' lookups."""
    rows = np.zeros(BINS)
    lookups = np.zeros(BINS)
    for ids in ids_per_feature:
        counts = np.unique(ids, return_counts=True)[1]
        b = np.minimum(np.ceil(np.log2(counts)).astype(np.int64), BINS - 1)
        rows += np.bincount(b, minlength=BINS)
        lookups += np.bincount(b, weights=counts, minlength=BINS)
    return rows / rows.sum(), lookups / lookups.sum()


def simulate(profile: Profile, window: int = WINDOW, seed: int = 0) -> list[np.ndarray]:
    """``window`` consecutive lookups per feature of the profile's id stream (the generator's
    steps 1-2 over one long block)."""
    rng = np.random.default_rng([seed, 0xCA1])
    out = []
    for f, n in enumerate(profile.cardinalities):
        ranks = power_law_ranks(rng.random(window), n, profile.alpha[f])
        mult, add = _affine(seed, f, n)
        out.append(repeat_recent((ranks * mult + add) % n, rng, profile.reuse_p,
                                 profile.reuse_window))
    return out


def residual(target: dict[str, Any], got: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    dr = got[0] - target["row_share"]
    dl = got[1] - target["lookup_share"]
    return {"l1_rows": float(np.abs(dr).sum()), "l1_lookups": float(np.abs(dl).sum()),
            "max_abs": float(max(np.abs(dr).max(), np.abs(dl).max())),
            "score": float(np.abs(dr).sum() + np.abs(dl).sum())}


def fit(target: dict[str, Any], scale: float = 0.25, iterations: int = 50,
        x0: tuple[float, ...] = (4.0, 7.0, 0.9, 0.9, 0.1), verbose: bool = True) -> dict[str, Any]:
    """Nelder-Mead over (log10 rows_min, log10 rows_max, alpha_min, alpha_max, reuse_p) at
    reuse_window 4096, on a window and tables ``scale`` times the real ones (faster; the shape
    of the histograms barely moves with the scale)."""

    def params(x: np.ndarray) -> dict[str, Any]:
        return {"rows_min": 10 ** x[0], "rows_max": 10 ** x[1], "alpha_min": x[2],
                "alpha_max": x[3], "reuse_p": x[4], "reuse_window": 4096}

    def score(x: np.ndarray) -> float:
        if not (0 <= x[4] < 0.9 and min(x[2], x[3]) > 0.3 and x[0] <= x[1] and x[0] > 1):
            return 9.0
        p = params(x)
        prof = meta_like(**{**p, "rows_min": p["rows_min"] * scale,
                            "rows_max": p["rows_max"] * scale})
        r = residual(target, reuse_histogram(simulate(prof, int(WINDOW * scale))))
        if verbose:
            print(f"{np.round(x, 3)}: L1 rows {r['l1_rows']:.3f} lookups {r['l1_lookups']:.3f}",
                  file=sys.stderr)
        return r["score"]

    step = np.array([0.7, 0.7, 0.15, 0.15, 0.15])
    pts = [np.array(x0, float)] + [np.array(x0, float) + np.eye(5)[i] * step[i] for i in range(5)]
    vals = [score(p) for p in pts]
    for _ in range(iterations):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        c = np.mean(pts[:-1], axis=0)
        xr = c + (c - pts[-1])
        fr = score(xr)
        if fr < vals[0]:
            xe = c + 2 * (c - pts[-1])
            fe = score(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = c + 0.5 * (pts[-1] - c)
            fc = score(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [score(p) for p in pts[1:]]
    return params(pts[int(np.argmin(vals))])


def report(target: dict[str, Any], profile: Profile, window: int = WINDOW) -> str:
    ids = simulate(profile, window)
    got = reuse_histogram(ids)
    r = residual(target, got)
    reuse = sum(len(x) for x in ids) / sum(len(np.unique(x)) for x in ids)
    edges = ["1", "2", "4", "8", "16", "32", "64", "128", "256", "512", "1K", "2K", "4K", "8K",
             "16K", "32K", "32K+"]
    lines = [f"{target['name']} vs {profile.name} ({window:,} lookups per feature)",
             "bin (<= reuse) | rows: Meta  synth | lookups: Meta  synth"]
    for i, e in enumerate(edges):
        lines.append(f"{e:>14} | {target['row_share'][i]:10.3f} {got[0][i]:6.3f} | "
                     f"{target['lookup_share'][i]:12.3f} {got[1][i]:6.3f}")
    lines.append(f"L1 rows {r['l1_rows']:.3f}, L1 lookups {r['l1_lookups']:.3f}, "
                 f"max |bin diff| {r['max_abs']:.3f}; lookups per distinct row: Meta "
                 f"{target['indices'] / target['unique']:.1f}, synthetic {reuse:.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tierstore.data.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stats", default=DEFAULT_STATS, help="a locality_stats.txt")
    ap.add_argument("--entry", type=int, default=0, help="which entry of the file (0: first)")
    ap.add_argument("--profile", default="meta")
    ap.add_argument("--window", type=int, default=WINDOW)
    ap.add_argument("--fit", action="store_true", help="grid-search the meta profile first")
    a = ap.parse_args(argv)
    target = load_locality_stats(a.stats)[a.entry]
    if a.fit:
        best = fit(target)
        print("best:", best)
        prof = meta_like(**best, name="meta-fit")
    else:
        prof = get_profile(a.profile)
    print(report(target, prof, a.window))
    print("META_FIT in use:", META_FIT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
