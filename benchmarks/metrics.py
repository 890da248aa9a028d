"""Speed of the vectorized NRA against a per-pixel Python loop, on 1000 random 224x224 maps.

The loop is timed on a few maps and scaled to the full set. The vectorized NRA is timed after one call on two
small maps, which compiles its CPU kernel (numba, on the first run after a change) or loads it from numba's cache;
that call's time is printed on its own line. Run: ``python benchmarks/metrics.py``.
"""

from __future__ import annotations

import time

import torch

from cefam_lightning.metrics.functional import nra

NUM_MAPS, SIDE, LOOP_MAPS = 1000, 224, 3


def loop_nra(map_: torch.Tensor, mask: torch.Tensor) -> float:
    """NRA of one map, pixel by pixel, as docs/method.md#nra-and-hit-rate defines it (ties broken by pixel order)."""
    r = map_.flatten().tolist()
    m = mask.flatten().tolist()
    n, size = len(r), sum(m)
    tp = auc = 0.0
    for k, i in enumerate(sorted(range(n), key=lambda i: -r[i]), start=1):
        tp += m[i]
        auc += tp / (k + size - tp) / n
    high = (sum(k / size for k in range(1, size + 1)) + sum(size / k for k in range(size + 1, n + 1))) / n
    low = size / n / 2
    return max(auc - low, 0.0) / (high - low)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(NUM_MAPS, SIDE, SIDE, dtype=torch.bool)
    corners = torch.randint(0, SIDE // 2, (NUM_MAPS, 2), generator=gen).tolist()
    for mask, (y, x) in zip(masks, corners, strict=True):
        mask[y : y + SIDE // 3, x : x + SIDE // 3] = True
    maps = torch.rand(NUM_MAPS, SIDE, SIDE, generator=gen) + masks * torch.rand(NUM_MAPS, 1, 1, generator=gen)

    start = time.perf_counter()
    nra(maps[:2, :16, :16], masks[:2, :16, :16])
    warm_up = time.perf_counter() - start

    start = time.perf_counter()
    fast = nra(maps, masks)
    vectorized = time.perf_counter() - start

    start = time.perf_counter()
    slow = [loop_nra(maps[i], masks[i]) for i in range(LOOP_MAPS)]
    loop = (time.perf_counter() - start) * NUM_MAPS / LOOP_MAPS

    # float32 maps of 50k pixels have a few exact ties, ranked differently by the two, hence the tolerance.
    assert torch.allclose(fast[:LOOP_MAPS], torch.tensor(slow, dtype=torch.float64), atol=1e-6)
    print(f"NRA of {NUM_MAPS} maps of {SIDE}x{SIDE} on {torch.get_num_threads()} threads")
    print(f"  first call (compile or cache load): {warm_up:6.2f} s  (on 2 maps of 16x16, not in the timing)")
    print(f"  vectorized:           {vectorized:8.2f} s")
    print(f"  python loop (scaled): {loop:8.2f} s  (timed on {LOOP_MAPS} maps)")
    print(f"  speed-up:             {loop / vectorized:8.1f}x")


if __name__ == "__main__":
    main()
