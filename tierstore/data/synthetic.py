"""Synthetic click data in the Criteo schema: skewed ids with temporal locality, labels from a
planted click model whose own loss is the best any model can reach.

Samples are made in blocks of :data:`BLOCK` samples; block ``b`` of split ``s`` depends only on
(seed, s, b), so any sample index can be reached directly and the stream does not depend on the
batch size. Per feature ``f`` with ``N_f`` rows, exponent ``a_f``, reuse probability ``p`` and
window ``K`` (all from the profile):

1. popularity: a rank ``r`` from the power law ``x ** -a_f`` on [1, N_f + 1) by inverse CDF,
   ``r = floor(x) - 1``; the row is ``(r * m_f + c_f) mod N_f`` with ``m_f`` coprime to ``N_f``
   (an affine permutation fixed by the seed, so hot rows are spread over the table);
2. temporal locality: with probability ``p`` a lookup instead repeats the id of this feature
   ``d`` lookups earlier in the block, ``d = floor(K ** u)`` (log-uniform in [1, K));
3. dense: ``log1p(floor(exp(mu_j + s_j z)))`` with z ~ N(0, 1), missing (0) with prob. q_j;
4. label ~ Bernoulli(sigmoid(planted logit)), see :class:`PlantedModel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import numpy as np

from tierstore.data.base import Dataset, check_split
from tierstore.data.schema import (
    NUM_DENSE,
    NUM_SPARSE,
    Chunk,
    splitmix64,
    splitmix64_int,
)

BLOCK = 8192          # samples per generated block
LATENT_DIM = 4        # planted latent factors per (feature, id)
TARGET_CTR = 0.25     # planted mean click probability (Criteo Kaggle: 0.256)
MAX_ROWS = 1 << 31    # per feature (the affine permutation multiplies two ranks in int64)

# --------------------------------------------------------------------------------------- profiles

CRITEO_KAGGLE_ROWS = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683,
                      8351593, 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15,
                      286181, 105, 142572)


@dataclass(frozen=True)
class Profile:
    """Per-feature rows and skew, plus the temporal locality of the id stream."""

    name: str
    cardinalities: tuple[int, ...]
    alpha: tuple[float, ...]          # power-law exponent per feature
    reuse_p: float = 0.0              # probability a lookup repeats a recent one
    reuse_window: int = 1024          # ... from the last `reuse_window` lookups of the feature
    description: str = ""
    scale: float = 1.0

    def __post_init__(self) -> None:
        if len(self.cardinalities) != NUM_SPARSE or len(self.alpha) != NUM_SPARSE:
            raise ValueError(f"profile {self.name!r}: need {NUM_SPARSE} cardinalities and "
                             f"exponents, got {len(self.cardinalities)} and {len(self.alpha)}")
        bad = [c for c in self.cardinalities if not 1 <= c <= MAX_ROWS]
        if bad:
            raise ValueError(f"profile {self.name!r}: cardinalities must be in [1, 2**31], "
                             f"got {bad}")
        if not 0.0 <= self.reuse_p < 1.0 or self.reuse_window < 2:
            raise ValueError(f"profile {self.name!r}: need 0 <= reuse_p < 1 and "
                             f"reuse_window >= 2")

    def scaled(self, scale: float) -> Profile:
        """The same profile with every cardinality times ``scale`` (at least 1 row)."""
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        rows = tuple(min(MAX_ROWS, max(1, round(c * scale))) for c in self.cardinalities)
        return replace(self, cardinalities=rows, scale=self.scale * scale)


#: The fit of the `meta` profile to the 2021 locality stats (python -m tierstore.data.calibrate):
#: rows log-spaced from rows_min to rows_max over the 26 features, the exponent linear in the
#: same order from alpha_min to alpha_max (small tables flat, large ones skewed), and reuse.
META_FIT: dict[str, Any] = {"rows_min": 42_000, "rows_max": 4_700_000, "alpha_min": 0.555,
                            "alpha_max": 1.23, "reuse_p": 0.17, "reuse_window": 4096}


def meta_like(rows_min: float, rows_max: float, alpha_min: float, alpha_max: float,
              reuse_p: float, reuse_window: int, name: str = "meta") -> Profile:
    """26 features with rows log-spaced in [rows_min, rows_max] and exponents linear in
    [alpha_min, alpha_max] in the same order."""
    t = [i / (NUM_SPARSE - 1) for i in range(NUM_SPARSE)]
    rows = tuple(int(round(rows_min * (rows_max / rows_min) ** ti)) for ti in t)
    alpha = tuple(round(alpha_min + (alpha_max - alpha_min) * ti, 4) for ti in t)
    return Profile(name, rows, alpha, reuse_p, reuse_window,
                   description="calibrated to the reuse histograms of Meta's 2021 DLRM "
                               "embedding_bag dataset (docs/data.md)")


PROFILES: dict[str, Profile] = {
    "small": Profile("small", tuple(1000 + 250 * (i % 13) for i in range(NUM_SPARSE)),
                     (1.05,) * NUM_SPARSE, reuse_p=0.2, reuse_window=256,
                     description="26 features of 1,000-4,000 rows (tests, the embedded default)"),
    "criteo_kaggle": Profile("criteo_kaggle", CRITEO_KAGGLE_ROWS, (1.05,) * NUM_SPARSE,
                             reuse_p=0.2, reuse_window=1024,
                             description="Criteo Kaggle's per-feature cardinalities (DLRM's "
                                         "preprocessing), power law 1.05"),
    "meta": meta_like(**META_FIT),
}


def get_profile(name: str | Profile, scale: float = 1.0) -> Profile:
    """The profile called ``name`` (scaled); an unknown name raises ValueError listing the valid
    ones."""
    if isinstance(name, Profile):
        prof = name
    else:
        try:
            prof = PROFILES[name]
        except KeyError:
            raise ValueError(f"unknown synthetic profile {name!r}; valid: "
                             f"{', '.join(sorted(PROFILES))}") from None
    return prof if scale == 1.0 else prof.scaled(scale)


# ------------------------------------------------------------------------------- id generation


def power_law_ranks(u: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Ranks in [0, n) from uniforms ``u`` under the density x ** -alpha on [1, n + 1)."""
    if abs(alpha - 1.0) < 1e-9:
        x = np.exp(u * math.log(n + 1.0))
    else:
        e = 1.0 - alpha
        x = np.power(1.0 + u * ((n + 1.0) ** e - 1.0), 1.0 / e)
    r = x.astype(np.int64) - 1
    np.clip(r, 0, n - 1, out=r)
    return r


def repeat_recent(ids: np.ndarray, rng: np.random.Generator, p: float, window: int,
                  period: int = 1) -> np.ndarray:
    """With probability ``p`` replace ``ids[i]`` by the (final) id ``d`` positions earlier,
    d log-uniform in [1, window); within the array only. ``period``: d is a multiple of it (the
    pooling, so a bag repeats ids of earlier samples)."""
    m = len(ids)
    if p <= 0.0 or m < 2:
        return ids
    i = np.arange(m)
    d = np.exp(rng.random(m) * math.log(window)).astype(np.int64) * period
    src = np.where((rng.random(m) < p) & (d <= i), i - d, i)
    while True:  # pointer jumping: every chain of repeats ends at a drawn id
        nxt = src[src]
        if np.array_equal(nxt, src):
            break
        src = nxt
    return ids[src]


def _affine(seed: int, f: int, n: int) -> tuple[int, int]:
    """(multiplier coprime to n, offset) of feature f's rank -> row permutation."""
    h = splitmix64_int(splitmix64_int(seed) ^ (0xA5A5 + f))
    if n == 1:
        return 1, 0
    m = 1 + h % (n - 1)
    while math.gcd(m, n) != 1:
        m = 1 + m % (n - 1)
    return m, splitmix64_int(h) % n


# ------------------------------------------------------------------------------ planted model


def _normal_table() -> np.ndarray:
    """Normal quantiles of the 65536 midpoints (i + 0.5) / 65536 (float32)."""
    import torch
    q = (torch.arange(65536, dtype=torch.float64) + 0.5) / 65536
    return torch.special.ndtri(q).numpy().astype(np.float32)


@dataclass
class PlantedModel:
    """The click model behind synthetic labels.

    Latent factors: ``u(f, id)`` in R^4, four 16-bit slices of
    ``splitmix64(id + key_f)`` mapped through the normal quantile function (so ~N(0, I),
    fixed by (seed, feature, id); a bag's factor is the mean over its ids). Then

        logit = bias + w . (dense - c) + sum_f beta_f u_f . v_f / 2
                + sum_{(f, g) in pairs} gamma_fg u_f . u_g / 2

    All weights come from the seed: beta (26) with sum beta^2 = 1.2, ten pairs of features with
    sum gamma^2 = 0.8, w with sum of w_j^2 var(dense_j) = 0.5, and the bias set so that the mean
    click probability is about 0.25. Everything DLRM's dot interaction can represent: a per-id
    effect, dense effects and dot products between pairs of embeddings.
    """

    seed: int
    beta: np.ndarray = field(init=False)
    v: np.ndarray = field(init=False)
    pairs: list[tuple[int, int]] = field(init=False)
    gamma: np.ndarray = field(init=False)
    w: np.ndarray = field(init=False)
    center: np.ndarray = field(init=False)
    bias: float = field(init=False)
    keys: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng([self.seed, 0x91A27])
        beta = np.abs(rng.standard_normal(NUM_SPARSE)) + 0.2
        self.beta = beta * math.sqrt(1.2 / float((beta ** 2).sum()))
        self.v = rng.standard_normal((NUM_SPARSE, LATENT_DIM)).astype(np.float32)
        all_pairs = [(f, g) for f in range(NUM_SPARSE) for g in range(f + 1, NUM_SPARSE)]
        pick = rng.choice(len(all_pairs), 10, replace=False)
        self.pairs = [all_pairs[i] for i in sorted(pick)]
        gamma = rng.standard_normal(len(self.pairs))
        self.gamma = gamma * math.sqrt(0.8 / float((gamma ** 2).sum()))
        mean, var = dense_moments()
        w = rng.standard_normal(NUM_DENSE)
        self.w = (w * math.sqrt(0.5 / float((w ** 2 * var).sum()))).astype(np.float32)
        self.center = mean.astype(np.float32)
        total_var = 1.2 + 0.8 + 0.5
        self.bias = math.log(TARGET_CTR / (1 - TARGET_CTR)) * math.sqrt(1 + math.pi * total_var / 8)
        self.keys = np.array([splitmix64_int(splitmix64_int(self.seed + 0x5EED) + f)
                              for f in range(NUM_SPARSE)], dtype=np.uint64)

    def latents(self, f: int, ids: np.ndarray) -> np.ndarray:
        """u(f, id) for every id: float32 [len(ids), 4]."""
        h = splitmix64(ids.astype(np.uint64) + self.keys[f])
        return _NORMAL[h.view(np.uint16).reshape(-1, 4)]

    def logit(self, dense: np.ndarray, sparse: Sequence[np.ndarray],
              pooling: Sequence[int]) -> np.ndarray:
        """Planted logits (float64 [n]) of n samples: dense [n, 13], per feature its
        n * pooling[f] ids (sample-major)."""
        n = len(dense)
        z = (dense - self.center) @ self.w
        out = z.astype(np.float64) + self.bias
        pair_f = {f for pr in self.pairs for f in pr}
        u_of: dict[int, np.ndarray] = {}
        acc = np.zeros(n, np.float32)
        for f in range(NUM_SPARSE):
            u = self.latents(f, sparse[f])
            if pooling[f] != 1:
                u = u.reshape(n, pooling[f], LATENT_DIM).mean(1)
            acc += (u @ (self.v[f] * np.float32(self.beta[f] / 2)))
            if f in pair_f:
                u_of[f] = u
        for (f, g), c in zip(self.pairs, self.gamma):
            acc += np.einsum("ij,ij->i", u_of[f], u_of[g]) * np.float32(c / 2)
        return out + acc


_NORMAL = _normal_table()

# dense features: raw count floor(exp(mu + s z)), missing with probability q
_DENSE_MU = np.linspace(0.3, 4.0, NUM_DENSE)
_DENSE_SIGMA = np.linspace(1.5, 0.8, NUM_DENSE)
_DENSE_MISSING = np.array([0.45, 0.0, 0.2, 0.22, 0.03, 0.23, 0.04, 0.0, 0.04, 0.45, 0.04,
                           0.77, 0.22])  # roughly Criteo Kaggle's missing shares


def dense_values(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 [n, 13] dense features after the reader's transform."""
    z = rng.standard_normal((n, NUM_DENSE))
    d = np.log1p(np.floor(np.exp(_DENSE_MU + _DENSE_SIGMA * z)))  # counts >= 0
    d[rng.random((n, NUM_DENSE)) < _DENSE_MISSING] = 0.0
    return d.astype(np.float32)


def dense_moments() -> tuple[np.ndarray, np.ndarray]:
    """(mean, variance) per dense feature, estimated once on 65536 fixed samples."""
    global _MOMENTS
    if _MOMENTS is None:
        d = dense_values(np.random.default_rng(0), 65536).astype(np.float64)
        _MOMENTS = (d.mean(0), d.var(0))
    return _MOMENTS


_MOMENTS: tuple[np.ndarray, np.ndarray] | None = None


# ------------------------------------------------------------------------------------ dataset


def _parse_options(spec: str) -> tuple[str, dict[str, str]]:
    """"synthetic[:PROFILE][,key=value...]" -> (profile, options)."""
    body = spec[len("synthetic"):]
    if body and body[0] not in ":,":
        raise ValueError(f"bad synthetic data spec {spec!r}; expected synthetic[:PROFILE]"
                         "[,key=value...]")
    profile, opts = "", {}
    for i, part in enumerate(body[1:].split(",") if body else []):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if eq:
            opts[key.strip()] = value.strip()
        elif i == 0 and body[0] == ":":
            profile = part.strip()
        else:
            raise ValueError(f"bad option {part!r} in {spec!r}; expected key=value")
    return profile or "small", opts


class SyntheticDataset(Dataset):
    """An endless, seeded stream of synthetic samples (see the module docstring).

    profile: a name in :data:`PROFILES` or a :class:`Profile`; scale multiplies its
    cardinalities; pooling: ids per sample per feature (an int or 26 ints; > 1 is multi-hot);
    split: ``train`` (= ``all``) and ``eval`` are independent streams of the same distribution;
    num_samples: stop after that many (None: endless).
    """

    kind = "synthetic"

    def __init__(self, profile: str | Profile = "small", seed: int = 0, scale: float = 1.0,
                 pooling: int | Sequence[int] = 1, split: str = "train",
                 num_samples: int | None = None) -> None:
        self.profile = get_profile(profile, scale)
        self.seed = int(seed)
        self.split = check_split(split)
        pool = (pooling,) * NUM_SPARSE if isinstance(pooling, int) else tuple(pooling)
        if len(pool) != NUM_SPARSE or min(pool) < 1:
            raise ValueError(f"pooling must be an int >= 1 or {NUM_SPARSE} of them, got {pooling}")
        self.pooling = tuple(int(p) for p in pool)
        self.cardinalities = self.profile.cardinalities
        self.num_samples = None if num_samples is None else int(num_samples)
        self.model = PlantedModel(self.seed)
        self._affine = [_affine(self.seed, f, n) for f, n in enumerate(self.cardinalities)]
        self._stream = 1 if self.split == "eval" else 0

    @classmethod
    def from_spec(cls, spec: str, **overrides: Any) -> SyntheticDataset:
        """From "synthetic[:PROFILE][,scale=S][,seed=N][,pooling=P][,num_samples=N]"."""
        profile, opts = _parse_options(spec)
        kw: dict[str, Any] = {}
        conv = {"scale": float, "seed": int, "num_samples": int, "pooling": int}
        for k, v in opts.items():
            if k not in conv:
                raise ValueError(f"unknown synthetic option {k!r} in {spec!r}; valid: "
                                 f"{', '.join(sorted(conv))}")
            try:
                kw[k] = conv[k](v)
            except ValueError:
                raise ValueError(f"synthetic option {k}={v!r}: expected {conv[k].__name__}") from None
        kw.update(overrides)
        return cls(profile, **kw)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "profile": self.profile.name, "scale": self.profile.scale,
                "seed": self.seed, "pooling": list(self.pooling), "split": self.split,
                "num_samples": self.num_samples}

    # -- generation

    def block(self, b: int) -> Chunk:
        """The ``b``-th block of :data:`BLOCK` samples of this split."""
        rng = np.random.default_rng([self.seed, self._stream, b])
        prof = self.profile
        sparse = []
        for f, n in enumerate(self.cardinalities):
            m = BLOCK * self.pooling[f]
            ranks = power_law_ranks(rng.random(m), n, prof.alpha[f])
            mult, add = self._affine[f]
            rows = (ranks * mult + add) % n
            sparse.append(repeat_recent(rows, rng, prof.reuse_p, prof.reuse_window,
                                        self.pooling[f]))
        dense = dense_values(rng, BLOCK)
        p = 1.0 / (1.0 + np.exp(-self.model.logit(dense, sparse, self.pooling)))
        labels = (rng.random(BLOCK) < p).astype(np.float32)
        return Chunk(labels, dense, sparse)

    def start(self, sample: int) -> tuple[dict[str, Any], int]:
        return {"sample": int(sample)}, 0

    def chunks(self, position: dict[str, Any]) -> Iterator[tuple[dict[str, Any], Chunk]]:
        s = int(position["sample"])
        end = self.num_samples
        while end is None or s < end:
            b, r = divmod(s, BLOCK)
            c = self.block(b)
            stop = BLOCK if end is None else min(BLOCK, end - b * BLOCK)
            if r or stop < BLOCK:
                c = Chunk(c.labels[r:stop], c.dense[r:stop],
                          [x[r * p:stop * p] for x, p in zip(c.sparse, self.pooling)])
            yield {"sample": s}, c
            s = b * BLOCK + stop

    # -- the planted model's view

    def planted_logit(self, batch: Any) -> np.ndarray:
        """Planted logits (float64 [B]) of a :class:`~tierstore.data.batches.Batch` from this
        dataset (ids as generated, not remapped)."""
        dense = np.asarray(batch.dense, dtype=np.float32)
        values = np.asarray(batch.values)
        n = len(dense)
        sparse, at = [], 0
        for p in self.pooling:
            sparse.append(values[at:at + n * p])
            at += n * p
        return self.model.logit(dense, sparse, self.pooling)

    def bayes_logloss(self, num_samples: int = 65536) -> dict[str, float]:
        """The planted model's expected logloss on this split's first ``num_samples`` samples
        (mean binary entropy of its click probabilities: the best any model can do), its
        normalized entropy (logloss / entropy of the mean rate) and the mean probability."""
        ps, left = [], num_samples
        for _, c in self.chunks(self.start(0)[0]):
            logit = self.model.logit(c.dense, c.sparse, self.pooling)[:left]
            ps.append(1.0 / (1.0 + np.exp(-logit)))
            left -= len(logit)
            if left <= 0:
                break
        p = np.clip(np.concatenate(ps), 1e-12, 1 - 1e-12)
        ll = float(np.mean(-(p * np.log(p) + (1 - p) * np.log1p(-p))))
        ctr = float(p.mean())
        h = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
        return {"logloss": ll, "ne": ll / h, "ctr": ctr}


def binary_logloss(p: np.ndarray, y: np.ndarray) -> float:
    """Mean logloss of probabilities ``p`` for labels ``y``."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(y, dtype=np.float64)
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log1p(-p))))
