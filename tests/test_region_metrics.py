import math
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cefam_lightning.metrics import RegionMetrics
from cefam_lightning.metrics.functional import auc_high, auc_low, epg, iou_auc, nra, region
from cefam_lightning.metrics.functional.region import _auc_rows, _by_chunks

TYPES = ["color", "shape", "color", "texture"]  # concept id -> type


def _reference(map_: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    """EPG, AUC and NRA of one map, pixel by pixel, straight from SPEC §3 (valid without ties only)."""
    r = map_.flatten().tolist()
    m = [bool(x) for x in mask.flatten().tolist()]
    n, size = len(r), sum(m)
    lo, hi = min(r), max(r)
    norm = [(x - lo) / (hi - lo) for x in r]
    epg_value = sum(x for x, inside in zip(norm, m, strict=True) if inside) / sum(norm)
    tp = auc = 0.0
    for k, i in enumerate(sorted(range(n), key=lambda i: -r[i]), start=1):
        tp += m[i]
        auc += tp / (k + size - tp) / n
    high = (sum(k / size for k in range(1, size + 1)) + sum(size / k for k in range(size + 1, n + 1))) / n
    low = size / n / 2
    return epg_value, auc, max(auc - low, 0.0) / (high - low)


def _rect_masks(n: int, side: int, gen: torch.Generator) -> torch.Tensor:
    masks = torch.zeros(n, side, side, dtype=torch.bool)
    for i in range(n):
        y, x = torch.randint(0, side // 2, (2,), generator=gen).tolist()
        h, w = torch.randint(1, side // 2 + 1, (2,), generator=gen).tolist()
        masks[i, y : y + h, x : x + w] = True
    return masks


def _dataset() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """24 (image, concept) pairs of 12x12 with a spread of NRA values, two empty masks and one full mask."""
    gen = torch.Generator().manual_seed(0)
    masks = _rect_masks(24, 12, gen)
    masks[[3, 17]] = False
    masks[8] = True
    strength = torch.linspace(0, 2, 24)[:, None, None]
    maps = torch.rand(24, 12, 12, generator=gen, dtype=torch.float64) + strength * masks
    ids = torch.arange(24) % len(TYPES)
    return maps, masks, ids


def test_perfect_map_reaches_auc_high_and_nra_one():
    masks = _rect_masks(6, 16, torch.Generator().manual_seed(1))
    sizes = masks.flatten(1).sum(1)
    for maps in (masks.double(), masks + 0.5 * torch.rand(masks.shape, dtype=torch.float64)):
        torch.testing.assert_close(iou_auc(maps, masks), auc_high(sizes, 256), rtol=0, atol=1e-12)
        torch.testing.assert_close(nra(maps, masks), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-12)


def test_map_ranking_mask_last_gives_nra_zero():
    masks = _rect_masks(6, 16, torch.Generator().manual_seed(2))
    maps = (~masks) + 0.5 * torch.rand(masks.shape, dtype=torch.float64)
    assert (iou_auc(maps, masks) < auc_low(masks.flatten(1).sum(1), 256)).all()
    assert (nra(maps, masks) == 0).all()


def test_random_map_scores_like_the_expected_curve_and_far_below_a_hit():
    # With the spec's AUC_low = r/2 a random map does not score 0: its IoU curve rises to about r within a
    # fraction r of the image, so its area is about r. Its mean NRA matches that of a constant map, whose
    # tie-interpolated curve is exactly the expected one, TP_k = k r.
    gen = torch.Generator().manual_seed(3)
    for side in (8, 16):
        masks = torch.zeros(300, 32, 32, dtype=torch.bool)
        masks[:, :side, :side] = True
        random_nra = nra(torch.rand(300, 32, 32, generator=gen), masks)
        expected = nra(torch.zeros(1, 32, 32), masks[:1])
        assert abs(random_nra.mean() - expected) < 0.01
        assert random_nra.mean() < 0.2 and random_nra.max() < 0.5


@pytest.mark.parametrize(("m", "n"), [(1, 1), (1, 10), (7, 7), (5, 16), (100, 1024), (3000, 50176), (50175, 50176)])
def test_auc_high_closed_form_equals_explicit_sum(m, n):
    explicit = (sum(k / m for k in range(1, m + 1)) + sum(m / k for k in range(m + 1, n + 1))) / n
    assert auc_high(m, n).item() == pytest.approx(explicit, rel=1e-12)
    assert auc_low(m, n).item() == pytest.approx(m / n / 2, rel=1e-15)


def test_vectorized_metrics_equal_pixel_loop_reference():
    gen = torch.Generator().manual_seed(4)
    masks = _rect_masks(5, 20, gen)
    maps = torch.rand(5, 20, 20, generator=gen, dtype=torch.float64) + masks * torch.rand(5, 1, 1, generator=gen)
    assert all(m.unique().numel() == m.numel() for m in maps)  # the reference has no notion of ties
    expected = torch.tensor([_reference(r, m) for r, m in zip(maps, masks, strict=True)], dtype=torch.float64)
    for got, want in zip((epg(maps, masks), iou_auc(maps, masks), nra(maps, masks)), expected.T, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_ties_do_not_depend_on_pixel_position():
    gen = torch.Generator().manual_seed(5)
    masks = _rect_masks(8, 16, gen)
    maps = torch.randn(8, 16, 16, generator=gen).relu().round(decimals=1)  # about half exact zeros
    flipped = nra(maps.flip(1, 2), masks.flip(1, 2))
    torch.testing.assert_close(nra(maps, masks), flipped, rtol=0, atol=1e-12)

    # A constant map spreads the hits evenly: TP_k = k |M| / N.
    size, n = masks[0].sum().item(), 256
    curve = [(k * size / n) / (k + size - k * size / n) for k in range(1, n + 1)]
    assert iou_auc(torch.zeros(16, 16), masks[0]).item() == pytest.approx(sum(curve) / n, rel=1e-12)


def _tie_patterns(gen: torch.Generator, n: int = 40, h: int = 12, w: int = 12) -> dict[str, torch.Tensor]:
    shape = (n, h, w)
    patterns = {
        "distinct": torch.rand(shape, generator=gen),
        "relu_rounded": torch.randn(shape, generator=gen).relu().round(decimals=1),
        "relu": torch.randn(shape, generator=gen).relu(),  # about half exact zeros, the rest distinct
        "quantized": (torch.rand(shape, generator=gen) * 4).floor() / 4,  # 4 values: groups mixing mask and not
        "mixed_sign": torch.randn(shape, generator=gen).round(decimals=1),
        "non_positive": -torch.rand(shape, generator=gen).round(decimals=2),
        "negative_distinct": torch.randn(shape, generator=gen) * 1e3,
        "constant": torch.zeros(shape),
        "signed_zeros": (torch.rand(shape, generator=gen) * 3).floor() - 1,
        "float16": torch.rand(shape, generator=gen).half(),
        "bfloat16": torch.randn(shape, generator=gen).bfloat16(),
    }
    patterns["signed_zeros"][patterns["signed_zeros"] == 0] = -0.0
    return patterns


PATTERNS = list(_tie_patterns(torch.Generator().manual_seed(0), 1, 1, 1))


@pytest.fixture(params=["numba", "numpy"])
def cpu_backend(request, monkeypatch):
    """Runs a test on the numba kernel, then on the numpy fallback, with numba made unimportable."""
    if request.param == "numba":
        pytest.importorskip("numba")
    else:
        monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now raises ImportError
    region._numba_kernel.cache_clear()
    assert (region._numba_kernel() is None) == (request.param == "numpy")
    yield request.param
    region._numba_kernel.cache_clear()


def _general(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """AUC by the general torch path, the definition of the tie rule, with NaN for empty masks."""
    maps, masks = maps.flatten(1), masks.flatten(1)
    expected = _by_chunks(_auc_rows, maps.double(), masks)
    return torch.where(masks.any(1), expected, torch.nan)


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_cpu_sorted_key_path_equals_the_general_path(pattern, cpu_backend):
    # float32-exact CPU maps take a path of their own (numba: radix-sorted packed keys and one pass per map;
    # without numba, numpy sorts and sums per tie group); it must give the general path's tie-interpolated curve,
    # which the tests above pin to the definition.
    gen = torch.Generator().manual_seed(6)
    maps = _tie_patterns(gen)[pattern]
    masks = torch.rand(maps.shape, generator=gen) < torch.rand(len(maps), 1, 1, generator=gen)
    masks[0], masks[1, 0, 0], masks[2] = False, True, True  # an empty mask, one of a single pixel, a full one
    _assert_same(iou_auc(maps, masks), _general(maps, masks))
    _assert_same(nra(maps, masks), nra(maps.double(), masks))


@pytest.mark.parametrize("seed", range(3))
def test_cpu_paths_equal_the_general_path_on_random_shapes(seed, cpu_backend):
    gen = torch.Generator().manual_seed(100 + seed)
    for _ in range(4):
        n, h, w = torch.randint(1, 30, (3,), generator=gen).tolist()
        for pattern, maps in _tie_patterns(gen, n, h, w).items():
            fraction = torch.rand(n, 1, 1, generator=gen) ** 2  # small masks as well as large ones
            masks = torch.rand(maps.shape, generator=gen) < fraction
            torch.testing.assert_close(
                iou_auc(maps, masks), _general(maps, masks), rtol=1e-12, atol=0, equal_nan=True, msg=pattern
            )


def test_cpu_paths_equal_the_general_path_on_full_size_maps(cpu_backend):
    # 224x224 maps: long runs between mask pixels and large tie groups, where summation order matters most.
    gen = torch.Generator().manual_seed(7)
    masks = _rect_masks(6, 224, gen)
    masks[5] = torch.rand(224, 224, generator=gen) < 0.9
    maps = {
        "benchmark": torch.rand(6, 224, 224, generator=gen) + masks * torch.rand(6, 1, 1, generator=gen),
        "relu": (torch.randn(6, 224, 224, generator=gen) + masks).relu(),
        "quantized": ((torch.rand(6, 224, 224, generator=gen) + masks) * 8).floor(),
        "signed": torch.randn(6, 224, 224, generator=gen) - masks.float(),
    }
    for pattern, values in maps.items():
        torch.testing.assert_close(iou_auc(values, masks), _general(values, masks), rtol=1e-12, atol=0, msg=pattern)


def test_cpu_path_edge_cases(cpu_backend):
    # Single-pixel maps: a mask pixel ranks first, so AUC = 1; NRA is NaN since the mask is empty or full.
    maps, masks = torch.rand(3, 1, 1), torch.tensor([True, False, True]).view(3, 1, 1)
    _assert_same(iou_auc(maps, masks), torch.tensor([1.0, math.nan, 1.0], dtype=torch.float64))
    assert nra(maps, masks).isnan().all()
    # No rows at all.
    assert iou_auc(torch.rand(0, 5, 5), torch.ones(0, 5, 5, dtype=torch.bool)).shape == (0,)
    assert nra(torch.rand(0, 5, 5), torch.ones(0, 5, 5, dtype=torch.bool)).dtype == torch.float64
    # -0.0 and +0.0 tie: the result is the very same as with +0.0 only.
    gen = torch.Generator().manual_seed(8)
    values = (torch.rand(4, 9, 9, generator=gen) * 3).floor() - 1
    masks = torch.rand(4, 9, 9, generator=gen) < 0.3
    negative_zeros = torch.where((values == 0) & (torch.rand(4, 9, 9, generator=gen) < 0.5), -0.0, values)
    assert (negative_zeros == 0).logical_and(negative_zeros.signbit()).any() and not values.signbit()[values == 0].any()
    assert torch.equal(iou_auc(negative_zeros, masks), iou_auc(values, masks))
    # Non-contiguous input and maps that require grad.
    maps = torch.rand(5, 12, 10, generator=gen, requires_grad=True)
    masks = torch.rand(5, 10, 12, generator=gen) < 0.4
    _assert_same(iou_auc(maps.transpose(1, 2), masks), _general(maps.detach().transpose(1, 2), masks))


def test_cpu_path_does_not_depend_on_the_number_of_threads():
    gen = torch.Generator().manual_seed(9)
    maps, masks = torch.rand(37, 30, 30, generator=gen).round(decimals=2), torch.rand(37, 30, 30, generator=gen) < 0.2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = iou_auc(maps, masks)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(iou_auc(maps, masks), one)


def test_epg_normalizes_and_handles_constant_and_empty():
    map_ = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    mask = torch.tensor([[False, True], [False, False]])
    assert epg(map_, mask).item() == pytest.approx((1 / 3) / 2)  # normalized map 0, 1/3, 2/3, 1
    assert epg(5 * map_ - 7, mask).item() == pytest.approx(epg(map_, mask).item())
    assert epg(torch.full((2, 2), 4.0), mask).item() == 0
    assert epg(torch.zeros(2, 2), mask).item() == 0
    assert math.isnan(epg(map_, torch.zeros(2, 2, dtype=torch.bool)).item())


def test_empty_and_full_masks_give_nan():
    maps = torch.rand(3, 4, 4)
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[1, 0, 0] = True
    masks[2] = True
    assert epg(maps, masks).isnan().tolist() == [True, False, False]
    assert iou_auc(maps, masks).isnan().tolist() == [True, False, False]
    assert nra(maps, masks).isnan().tolist() == [True, False, True]


def test_single_map_without_batch_dimension():
    maps, masks, _ = _dataset()
    for fn in (epg, iou_auc, nra):
        torch.testing.assert_close(fn(maps[0], masks[0]), fn(maps[:1], masks[:1]))


def _by_hand(maps, masks, ids) -> dict[str, float]:
    e, s = epg(maps, masks).tolist(), nra(maps, masks).tolist()
    out, skipped = {}, 0
    for t in dict.fromkeys(TYPES):
        rows = [i for i in range(len(ids)) if TYPES[ids[i]] == t and not math.isnan(s[i])]
        skipped += sum(1 for i in range(len(ids)) if TYPES[ids[i]] == t and math.isnan(s[i]))
        out[f"epg/{t}"] = sum(e[i] for i in rows) / len(rows)
        out[f"nra/{t}"] = sum(s[i] for i in rows) / len(rows)
        out[f"hit_rate/{t}"] = sum(s[i] > 0.5 for i in rows) / len(rows)
        out[f"count/{t}"] = len(rows)
    for name in ("epg", "nra", "hit_rate"):
        out[f"{name}/mean"] = sum(out[f"{name}/{t}"] for t in dict.fromkeys(TYPES)) / 3
    out["skipped_empty"] = skipped
    return out


def _assert_matches(got: dict[str, torch.Tensor], want: dict[str, float], atol: float = 1e-12) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].item() == pytest.approx(value, abs=atol), key


def test_region_metrics_match_functional_results_and_accumulate():
    maps, masks, ids = _dataset()
    want = _by_hand(maps, masks, ids)
    assert want["skipped_empty"] == 3 and 0 < want["hit_rate/mean"] < 1  # the data exercise both branches

    one = RegionMetrics(TYPES)
    one.update(maps, masks, ids)
    _assert_matches(one.compute(), want)

    two = RegionMetrics(TYPES)
    two.update(maps[:10], masks[:10], ids[:10])
    two.update(maps[10:], masks[10:], ids[10:])
    _assert_matches(two.compute(), want)


def test_type_without_valid_pairs_is_nan_and_left_out_of_the_mean():
    maps, masks, _ = _dataset()
    masks[:4] = False
    metric = RegionMetrics(TYPES)
    metric.update(maps[:6], masks[:6], torch.tensor([1, 3, 1, 3, 0, 2]))  # every shape/texture mask empty
    out = metric.compute()
    assert out["nra/shape"].isnan() and out["epg/texture"].isnan() and out["count/shape"] == 0
    assert out["nra/mean"].item() == pytest.approx(out["nra/color"].item())
    assert out["skipped_empty"] == 4


def test_shape_mismatch_names_the_shapes():
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 4, 5\)"):
        nra(torch.rand(2, 4, 4), torch.ones(2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(3,\)"):
        RegionMetrics(TYPES).update(torch.rand(2, 4, 4), torch.ones(2, 4, 4), torch.tensor([0, 1, 2]))


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A short timeout turns a rank that died early into a failure instead of a 30-minute hang.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        maps, masks, ids = _dataset()
        metric = RegionMetrics(TYPES)
        metric.update(maps[rank::world_size], masks[rank::world_size], ids[rank::world_size])
        torch.save(metric.compute(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_sync_equals_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    want = _by_hand(*_dataset())
    for rank in range(2):
        _assert_matches(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True), want, atol=1e-6)
