"""Randomness that is a pure function of (seed, sample position): masks, noise, diffusion times.

Per-rank RNG states depend on the world size and on what each rank drew before; a resume at another
world size could not reproduce them. Here every draw is a counter-based hash (SplitMix64's finaliser,
Steele et al. 2014) of (seed, the sample's global position, a stream number naming what is drawn, the
element index), so the same sample gets the same mask on any rank, at any world size, after any resume.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def uniform(seed: int, positions: np.ndarray, n: int, stream: int) -> np.ndarray:
    """(len(positions), n) floats in [0, 1): element i of sample p is a hash of (seed, p, stream, i)."""
    with np.errstate(over="ignore"):
        key = _mix(np.full(1, seed % 2**64, dtype=np.uint64))
        key = _mix(key ^ np.uint64(stream % 2**64))
        rows = _mix(key ^ np.asarray(positions, dtype=np.int64).astype(np.uint64))[:, None]
        z = _mix(rows ^ (np.arange(n, dtype=np.uint64)[None, :] * _GOLDEN))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def normal(seed: int, positions: np.ndarray, n: int, stream: int) -> np.ndarray:
    """(len(positions), n) standard normals (float32) by Box–Muller from two uniform draws of `stream`."""
    u1 = uniform(seed, positions, n, stream)
    u2 = uniform(seed, positions, n, stream + (1 << 32))
    r = np.sqrt(-2.0 * np.log1p(-u1))  # 1 - u1 lies in (0, 1]: no log(0)
    return (r * np.cos(2.0 * np.pi * u2)).astype(np.float32)
