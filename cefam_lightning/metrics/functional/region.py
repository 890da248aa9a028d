"""Region metrics against ground-truth masks (docs/method.md#region-metrics): EPG, the IoU-curve AUC and NRA.

Every function takes a batch of saliency maps ``(n, H, W)`` and binary masks of the same shape (a single
``(H, W)`` pair counts as ``n = 1``) and returns one float64 value per map, on the maps' device. An empty
mask gives NaN. Maps must be finite.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from cefam_lightning.metrics.functional.maps import minmax_normalize

# Rows go through in chunks of about this many pixels, so that the float64 temporaries of a few hundred
# 224x224 maps stay in the low hundreds of MB.
_CHUNK_PIXELS = 1 << 21


def _flatten_inputs(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Validate shapes and return ``(n, N)`` maps and boolean masks."""
    if maps.shape != masks.shape:
        raise ValueError(
            f"maps and masks must have the same shape, got maps {tuple(maps.shape)} and masks {tuple(masks.shape)}"
        )
    if maps.ndim not in (2, 3):
        raise ValueError(f"maps must have shape (n, H, W) or (H, W), got {tuple(maps.shape)}")
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    return maps.flatten(1), masks.flatten(1).bool()


def _by_chunks(fn: Callable[[Tensor, Tensor], Tensor], maps: Tensor, masks: Tensor) -> Tensor:
    """Apply ``fn`` to row chunks of ``(n, N)`` maps and masks and concatenate the results."""
    rows = max(1, _CHUNK_PIXELS // max(maps.shape[1], 1))
    out = [fn(r, m) for r, m in zip(maps.split(rows), masks.split(rows), strict=True)]
    return torch.cat(out) if out else maps.new_empty(0, dtype=torch.float64)


def _mask_sizes(masks: Tensor) -> Tensor:
    """``|M|`` of ``(n, N)`` boolean masks as int64; on CPU by numpy, several times faster than torch's bool sum."""
    if masks.device.type == "cpu":
        return torch.from_numpy(np.count_nonzero(masks.contiguous().numpy(), axis=1).astype(np.int64))
    return masks.sum(1)


def _epg_rows(maps: Tensor, masks: Tensor) -> Tensor:
    # A constant map becomes all zeros: its energy and its energy inside the mask are both 0, which scores 0.
    maps = minmax_normalize(maps.to(torch.float64))
    energy = maps.sum(1)
    return (maps * masks).sum(1) / torch.where(energy > 0, energy, 1.0)


def _auc_rows(maps: Tensor, masks: Tensor) -> Tensor:
    n, num_pixels = maps.shape
    # Only the order and the ties of the values matter, so the sort runs in the input's dtype.
    values, order = maps.sort(dim=1, descending=True)
    hits = masks.new_zeros(n, num_pixels + 1, dtype=torch.float64)
    hits[:, 1:] = masks.gather(1, order).cumsum(1, dtype=torch.float64)  # hits[:, j] = TP of the top j pixels

    # Tied pixels have no order among them, so within a tie group TP grows linearly from the group's first to
    # its last pixel (its expectation under a random order inside the group). Without this, the many exact
    # zeros of a ReLU'd map would be ranked by their position in the image. Without ties, TP_k = hits[:, k].
    pos = torch.arange(num_pixels, device=maps.device, dtype=torch.int32)  # int32 makes cummax/cummin ~4x faster
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, pos, 0).cummax(1).values
    stop = torch.where(ends, pos, num_pixels - 1).flip(1).cummin(1).values.flip(1) + 1
    tp_first, tp_stop = hits.gather(1, first.long()), hits.gather(1, stop.long())
    k = pos + 1
    tp = tp_first + (k - first) * (tp_stop - tp_first) / (stop - first)

    size = hits[:, -1:]
    return (tp / (k + size - tp)).mean(1)  # k + |M| - TP >= k >= 1


# dtypes whose values float32 holds exactly, so that the CPU path can rank their bit patterns.
_FLOAT32_EXACT = (torch.float32, torch.float16, torch.bfloat16)


def _sorted_keys(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Ascending sort keys of one float32 map, the mask bit packed below the value's order-preserving bits.

    The keys order pixels exactly as their values (equal values give equal upper bits), so one sort of the keys
    alone ranks the pixels and carries their mask bits, with no index array and no gather.
    """
    values = values + np.float32(0.0)  # -0.0 becomes +0.0: equal as floats, so they must tie as keys
    bits = values.view(np.uint32)
    if values.min() >= 0:  # the common case (ReLU'd maps): the bit pattern already orders them, in 31 bits
        keys = (bits << np.uint32(1)) | mask.view(np.uint8).astype(np.uint32)
    else:  # flip negatives so that unsigned order is float order, which needs all 32 bits, then one more
        order_bits = np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(1 << 31)).astype(np.uint64)
        keys = (order_bits << np.uint64(1)) | mask.view(np.uint8).astype(np.uint64)
    keys.sort()
    return keys


def _auc_sum_of_row(values: np.ndarray, mask: np.ndarray, harmonic: np.ndarray) -> float:
    """``Σ_k TP_k / (k + |M| - TP_k)`` of one map, by pieces, in time proportional to the mask size.

    In descending order, the pixels split into tie groups (equal values) that hold mask pixels, and runs of
    other pixels between them. In a run TP is constant, so its sum is ``a (H_hi - H_lo)`` with ``H`` the
    harmonic numbers (``harmonic``, ``H_0 .. H_2N``). In a group TP rises linearly (``_auc_rows``' tie rule);
    a group of mask pixels only has a constant denominator, and the few groups that mix mask and other pixels
    are summed pixel by pixel.
    """
    keys = _sorted_keys(values, mask)
    num_pixels = len(keys)
    one = keys.dtype.type(1)
    descending = keys[::-1]
    # A value's mask pixels sort after its other pixels, so in descending order they come first in its group.
    in_mask = np.flatnonzero(descending & one)
    size = len(in_mask)
    if size == 0:
        return 0.0
    mask_values = descending[in_mask] >> one
    first = np.ones(size, dtype=bool)
    first[1:] = mask_values[1:] != mask_values[:-1]
    starts = np.flatnonzero(first)
    a = starts  # mask pixels before each group
    f = in_mask[starts]  # pixels before each group: all of them are above its value
    count = np.diff(np.append(starts, size))  # the group's mask pixels
    length = count.copy()
    # Other pixels of a group's value follow its mask pixels; look them up only where the next pixel ties.
    after = f + count
    inside = after < num_pixels
    tied = np.flatnonzero(inside)[(descending[after[inside]] >> one) == mask_values[starts][inside]]
    if len(tied):
        tied_values = mask_values[starts[tied]]
        below = np.searchsorted(keys, tied_values << one)  # pixels of smaller values
        length[tied] = num_pixels - below - f[tied]

    end = f + length
    prev_end = np.concatenate(([0], end[:-1]))
    total = (a * (harmonic[f + size - a] - harmonic[prev_end + size - a])).sum()  # runs before each group
    total += size * (harmonic[num_pixels] - harmonic[end[-1]])  # the run after the last group, TP = |M|

    d = f + size - a  # >= 1, since the group's own mask pixels are not among the a before it
    pure = count == length
    lp, ap = length[pure], a[pure]
    total += ((lp * ap + lp * (lp + 1) / 2) / d[pure]).sum()  # TP = a + u, denominator d
    if not pure.all():
        mixed = ~pure
        lm = length[mixed]
        group = np.repeat(np.arange(len(lm)), lm)
        u = np.arange(lm.sum()) - np.repeat(np.cumsum(lm) - lm, lm) + 1
        slope = (count[mixed] / lm)[group]
        tp = a[mixed][group] + slope * u
        total += (tp / (d[mixed][group] + u - slope * u)).sum()
    return float(total)


def _auc_rows_numpy(maps: Tensor, masks: Tensor) -> Tensor:
    """``_auc_rows`` for float32-exact CPU maps without numba: one value-only sort per map, then work per tie group.

    Maps are sorted by numpy (a sort of plain keys, several times faster here than ``torch.sort``, which also
    returns indices), one thread per core; numpy releases the GIL while sorting.
    """
    n, num_pixels = maps.shape
    values = maps.detach().to(torch.float32).contiguous().numpy()
    bits = masks.contiguous().numpy()
    harmonic = np.concatenate(([0.0], np.cumsum(1.0 / np.arange(1, 2 * num_pixels + 1))))
    workers = max(1, min(torch.get_num_threads(), os.cpu_count() or 1, n))
    with ThreadPoolExecutor(workers) as pool:
        sums = list(pool.map(_auc_sum_of_row, values, bits, [harmonic] * n))
    return torch.tensor(sums, dtype=torch.float64) / num_pixels


def _auc_sums_kernel(bits, masks, start, stop, out):  # compiled by numba: see _numba_kernel
    """``out[i] = (1/N) Σ_k TP_k / (k + |M| - TP_k)`` for rows ``start <= i < stop``, numba-compiled.

    ``bits`` are the ``(n, N)`` uint32 bit patterns of float32 maps, ``masks`` the ``(n, N)`` 0/1 uint8 masks.
    Per row: 33-bit keys that order pixels as their values (``_sorted_keys``' keys: the mask bit packed low,
    -0.0 made +0.0, negatives flipped), an LSD radix sort of 3 passes of 11 bits (a pass whose digit is the
    same for every key is skipped), then one pass in descending order that adds the terms of ``_auc_rows``:
    ``TP = a`` (the mask pixels so far) over a run of other pixels, and within a tie group holding mask pixels
    TP rising linearly from ``a`` to ``a + c``. Every term is the general path's own; only the order of the
    additions differs.
    """
    num_pixels = bits.shape[1]
    keys = np.empty(num_pixels, np.uint64)
    scratch = np.empty(num_pixels, np.uint64)
    counts = np.zeros((3, 2048), np.int64)
    one, digit, sign, low32 = np.uint64(1), np.uint64(2047), np.uint64(1 << 31), np.uint64(0xFFFFFFFF)
    for row in range(start, stop):
        size = 0
        for i in range(num_pixels):
            b = np.uint64(bits[row, i])
            if b == sign:  # -0.0: equal to +0.0 as a float, so it must tie with it as a key
                b = np.uint64(0)
            b = (~b & low32) if b & sign else (b | sign)  # unsigned order of these 32 bits is float order
            keys[i] = (b << one) | np.uint64(masks[row, i])
            size += masks[row, i]
        if size == 0:
            out[row] = 0.0
            continue

        counts[:] = 0
        for i in range(num_pixels):
            k = keys[i]
            counts[0, k & digit] += 1
            counts[1, (k >> np.uint64(11)) & digit] += 1
            counts[2, (k >> np.uint64(22)) & digit] += 1
        src, dst = keys, scratch
        for p in range(3):
            shift = np.uint64(11 * p)
            count = counts[p]
            if count[(src[0] >> shift) & digit] == num_pixels:
                continue
            offset = 0
            for d in range(2048):
                offset, count[d] = offset + count[d], offset
            for i in range(num_pixels):
                k = src[i]
                d = (k >> shift) & digit
                dst[count[d]] = k
                count[d] += 1
            src, dst = dst, src

        # Descending order: r pixels are above the current one. A value's mask pixels have the larger keys, so
        # a tie group holding mask pixels starts with them; a group without any is part of a run (TP constant).
        total = 0.0
        a = 0  # TP before the current pixel
        r = 0
        last = num_pixels - 1
        while r < num_pixels:
            k = src[last - r]
            if not k & one:
                total += a / (r + 1 + size - a)
                r += 1
                continue
            value = k >> one
            first = r
            while r < num_pixels and src[last - r] == k:
                r += 1
            c = r - first  # the group's mask pixels
            while r < num_pixels and src[last - r] >> one == value:
                r += 1
            length = r - first
            if c == length:  # TP_k = a + u and k = first + u: the denominator is constant
                total += (length * a + length * (length + 1) / 2) / (first + size - a)
            else:
                for u in range(1, length + 1):
                    tp = a + u * c / length
                    total += tp / (first + u + size - tp)
            a += c
        out[row] = total / num_pixels


@functools.cache
def _numba_kernel() -> Callable | None:
    """``_auc_sums_kernel`` compiled by numba (nogil, cached on disk), or None where numba is not importable.

    Compiling takes a second or two the first time; later processes load it from numba's cache.
    """
    try:
        import numba
    except ImportError:
        return None
    try:
        return numba.njit(nogil=True, cache=True)(_auc_sums_kernel)
    except RuntimeError:  # no writable cache location: compile once per process instead
        return numba.njit(nogil=True)(_auc_sums_kernel)


def _auc_rows_numba(maps: Tensor, masks: Tensor, kernel: Callable) -> Tensor:
    """``_auc_rows`` for float32-exact CPU maps by the compiled kernel, on ``torch.get_num_threads()`` threads.

    The kernel releases the GIL, so a plain thread pool runs it on row chunks in parallel. (numba's own
    ``parallel=True`` would tie this to its threading layer: the default one aborts when two Python threads call
    in at once, the OpenMP one does not survive a fork.)
    """
    n = maps.shape[0]
    bits = maps.detach().to(torch.float32).contiguous().numpy().view(np.uint32)
    flags = masks.contiguous().numpy().view(np.uint8)
    out = np.empty(n, dtype=np.float64)
    workers = max(1, min(torch.get_num_threads(), os.cpu_count() or 1, n))
    if workers == 1:
        kernel(bits, flags, 0, n, out)
    else:
        step = -(-n // (4 * workers))  # a few chunks per thread, so that a slow one does not hold the rest

        def run(start: int) -> None:
            kernel(bits, flags, start, min(start + step, n), out)

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, range(0, n, step)))
    return torch.from_numpy(out)


def _auc_rows_cpu(maps: Tensor, masks: Tensor) -> Tensor:
    """``_auc_rows`` for float32-exact CPU maps: the numba kernel, or the numpy path where numba is missing."""
    kernel = _numba_kernel()
    if kernel is None:
        return _auc_rows_numpy(maps, masks)
    return _auc_rows_numba(maps, masks, kernel)


def _auc(maps: Tensor, masks: Tensor) -> Tensor:
    """Exact AUC of ``(n, N)`` rows, by the fastest exact path for the input's device and dtype."""
    if maps.device.type == "cpu" and maps.dtype in _FLOAT32_EXACT and maps.shape[1] > 0:
        return _auc_rows_cpu(maps, masks)
    return _by_chunks(_auc_rows, maps, masks)


def epg(maps: Tensor, masks: Tensor) -> Tensor:
    """Energy-based pointing game: the share of a min-max normalized map's energy that falls inside the mask.

    Args:
        maps: Saliency maps, ``(n, H, W)`` or ``(H, W)``.
        masks: Binary masks (bool or 0/1) of the same shape.

    Returns:
        ``(n,)`` float64 EPG in ``[0, 1]``; 0 for a constant map, NaN for an empty mask.

    Raises:
        ValueError: If the shapes of ``maps`` and ``masks`` differ or are not 2-D/3-D.
    """
    maps, masks = _flatten_inputs(maps, masks)
    values = _by_chunks(_epg_rows, maps, masks)
    return torch.where(masks.any(1), values, torch.nan)


def iou_auc(maps: Tensor, masks: Tensor) -> Tensor:
    """Exact area under the IoU curve of the top-k pixels, ``AUC = (1/N) Σ_{k=1..N} TP_k / (k + |M| - TP_k)``.

    Pixels are ranked by decreasing map value. Within a group of tied values, ``TP_k`` is interpolated
    linearly across the group, so the result does not depend on where tied pixels lie in the image.

    Args:
        maps: Saliency maps, ``(n, H, W)`` or ``(H, W)``.
        masks: Binary masks (bool or 0/1) of the same shape.

    Returns:
        ``(n,)`` float64 AUC in ``[0, 1]``; NaN for an empty mask.

    Raises:
        ValueError: If the shapes of ``maps`` and ``masks`` differ or are not 2-D/3-D.
    """
    maps, masks = _flatten_inputs(maps, masks)
    values = _auc(maps, masks)
    return torch.where(masks.any(1), values, torch.nan)


def auc_high(mask_sizes: Tensor | int, num_pixels: Tensor | int) -> Tensor:
    """AUC of the ideal map, whose curve is ``k/m`` for ``k <= m`` and ``m/k`` after (``m = |M|``).

    Closed form: ``AUC_high = ((m + 1)/2 + m (H_N - H_m)) / N`` with harmonic numbers
    ``H_n = digamma(n + 1) + γ``.

    Args:
        mask_sizes: Mask sizes ``m`` (any shape).
        num_pixels: Number of pixels ``N`` of the image.

    Returns:
        float64 tensor shaped like ``mask_sizes``; NaN where ``m = 0``.
    """
    m = torch.as_tensor(mask_sizes, dtype=torch.float64)
    n = torch.as_tensor(num_pixels, dtype=torch.float64, device=m.device)
    tail = m * (torch.special.digamma(n + 1) - torch.special.digamma(m + 1))
    return torch.where(m > 0, ((m + 1) / 2 + tail) / n, torch.nan)


def auc_low(mask_sizes: Tensor | int, num_pixels: Tensor | int) -> Tensor:
    """AUC of a random map, ``r/2`` with ``r = m/N`` (docs/method.md#auc_high-and-auc_low).

    Args:
        mask_sizes: Mask sizes ``m`` (any shape).
        num_pixels: Number of pixels ``N`` of the image.

    Returns:
        float64 tensor shaped like ``mask_sizes``; NaN where ``m = 0``.
    """
    m = torch.as_tensor(mask_sizes, dtype=torch.float64)
    return torch.where(m > 0, m / (2 * torch.as_tensor(num_pixels, dtype=torch.float64, device=m.device)), torch.nan)


def nra(maps: Tensor, masks: Tensor) -> Tensor:
    """Normalized region AUC, ``max(AUC - AUC_low, 0) / (AUC_high - AUC_low)``.

    A mask covering the whole image gives NaN like an empty one: every map then has the ideal curve
    (``AUC = AUC_high``), and ``AUC_high - AUC_low`` is only the ``1/(2N)`` discretization term, so the score
    would be 1 whatever the map.

    Args:
        maps: Saliency maps, ``(n, H, W)`` or ``(H, W)``.
        masks: Binary masks (bool or 0/1) of the same shape.

    Returns:
        ``(n,)`` float64 NRA in ``[0, 1]``; NaN where the mask is empty or full.

    Raises:
        ValueError: If the shapes of ``maps`` and ``masks`` differ or are not 2-D/3-D.

    Example:
        >>> masks = torch.zeros(2, 4, 4, dtype=torch.bool)
        >>> masks[:, :2, :2] = True
        >>> maps = torch.stack([masks.float()[0], 1 - masks.float()[1]])
        >>> nra(maps, masks).round(decimals=6)
        tensor([1., 0.], dtype=torch.float64)
    """
    maps, masks = _flatten_inputs(maps, masks)
    num_pixels = maps.shape[1]
    sizes = _mask_sizes(masks)
    auc = _auc(maps, masks)
    low, high = auc_low(sizes, num_pixels), auc_high(sizes, num_pixels)
    score = (auc - low).clamp_min(0) / (high - low)
    return torch.where((sizes > 0) & (sizes < num_pixels), score, torch.nan)
