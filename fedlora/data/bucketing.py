"""Length bucketing: batches of examples of similar length, so that padding wastes little compute.

Examples are drawn as a stream of seeded permutations (without replacement within an epoch,
reshuffled each epoch). The stream is cut into pools of ``pool_batches`` batches; each pool is
sorted by length and cut into batches of ``batch_size``, and the pool's batches are yielded in a
seeded random order, so that long and short batches alternate.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

POOL_BATCHES = 16
"""Batches per pool that is sorted by length."""


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    rng: np.random.Generator,
    pool_batches: int = POOL_BATCHES,
) -> Iterator[np.ndarray]:
    """An endless stream of index batches of ``batch_size``, each pool of ``pool_batches``
    batches sorted by ``lengths`` (longest first) before it is cut."""
    lengths = np.asarray(lengths)
    pool_size = batch_size * pool_batches
    stream = np.empty(0, dtype=np.int64)
    while True:
        while len(stream) < pool_size:
            stream = np.concatenate([stream, rng.permutation(len(lengths))])
        pool, stream = stream[:pool_size], stream[pool_size:]
        pool = pool[np.argsort(-lengths[pool], kind="stable")]
        cut = [pool[start : start + batch_size] for start in range(0, pool_size, batch_size)]
        for position in rng.permutation(len(cut)):
            yield cut[position]
