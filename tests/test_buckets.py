"""training/buckets.py: bucket generation, closest-aspect assignment, and the bucket batch sampler."""
from __future__ import annotations

import itertools

import pytest

from training.buckets import BucketBatchSampler, closest_bucket, make_buckets


def test_sdxl_style_buckets_at_1024():
    buckets = make_buckets((1024, 1024), multiple=64, max_aspect=4.0)
    # hand-computed members: width = largest multiple of 64 with h * w <= 1024 * 1024
    for b in [(1024, 1024), (512, 2048), (2048, 512), (576, 1792), (768, 1344), (960, 1088), (1088, 960)]:
        assert b in buckets
    assert (448, 2304) not in buckets  # 2304 / 448 = 5.1 > 4
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0
        assert max(h, w) / min(h, w) <= 4.0
        assert 1024 * 1024 - 64 * max(h, w) < h * w <= 1024 * 1024  # about equal area, never above it
        assert (w, h) in buckets
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios) and len(set(buckets)) == len(buckets)


def test_small_images_with_multiple_8():
    buckets = make_buckets((32, 32), multiple=8, max_aspect=2.0)
    # h=24: 1024 / 24 = 42.7 -> 40; h=16: 64 (aspect 4 > 2, left out); h=48: 21.3 -> 16 (aspect 3, left out)
    assert buckets == [(24, 40), (32, 32), (40, 24)]
    with pytest.raises(ValueError, match="bucket_multiple"):
        make_buckets((32, 32), multiple=64)


def test_closest_bucket_by_log_aspect():
    buckets = [(64, 64), (64, 128), (128, 64)]
    assert closest_bucket((100, 190), buckets) == 1  # h/w 0.53: closest to 0.5
    assert closest_bucket((190, 100), buckets) == 2
    assert closest_bucket((100, 120), buckets) == 0  # |log(0.83)| = 0.18 < |log(0.83 / 0.5)| = 0.51
    assert closest_bucket((1, 1000), buckets) == 1
    assert closest_bucket((1, 1), buckets) == 0
    # log distance, not linear: h/w = 0.72 is nearer 0.5 linearly (0.22 vs 0.28) but nearer 1.0 in log
    # (|log 0.72| = 0.33 < |log 1.44| = 0.36); the boundary is the geometric mean sqrt(0.5) = 0.707
    assert closest_bucket((72, 100), [(64, 128), (64, 64)]) == 1
    assert closest_bucket((70, 100), [(64, 128), (64, 64)]) == 0


def ids_fixture():
    # 3 buckets of sizes 10, 7, 5 interleaved, plus two unreadable rows (None)
    ids = [0] * 10 + [1] * 7 + [2] * 5 + [None, None]
    order = [5, 12, 0, 21, 22, 3, 17, 8, 14, 1, 19, 9, 23, 2, 11, 16, 4, 20, 6, 13, 18, 7, 10, 15]
    return [ids[i] for i in order]


def test_batches_are_homogeneous_and_skip_unreadable():
    ids = ids_fixture()
    sampler = BucketBatchSampler(ids, batch_size=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 10 // 3 + 7 // 3 + 5 // 3  # drop: 3 + 2 + 1
    for batch in batches:
        assert len(batch) == 3 and len({ids[i] for i in batch}) == 1 and None not in {ids[i] for i in batch}
    flat = list(itertools.chain(*batches))
    assert len(flat) == len(set(flat))


def test_deterministic_given_seed_and_epoch():
    ids = ids_fixture()
    a = BucketBatchSampler(ids, batch_size=2, seed=7)
    b = BucketBatchSampler(ids, batch_size=2, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    c = BucketBatchSampler(ids, batch_size=2, seed=8)
    assert list(c) != first
    ordered = BucketBatchSampler(ids, batch_size=2, shuffle=False)
    assert list(ordered)[0] == sorted(i for i, b in enumerate(ids) if b == 0)[:2]


def test_ranks_get_disjoint_batches_of_equal_count():
    ids = ids_fixture()
    per_rank = [list(BucketBatchSampler(ids, batch_size=2, seed=3, num_replicas=3, rank=r)) for r in range(3)]
    # 5 + 3 + 2 = 10 full batches of 2 -> 9 usable for 3 ranks, 3 each
    assert [len(p) for p in per_rank] == [3, 3, 3]
    assert all(len(BucketBatchSampler(ids, batch_size=2, num_replicas=3, rank=r)) == 3 for r in range(3))
    seen = [i for p in per_rank for batch in p for i in batch]
    assert len(seen) == len(set(seen)) == 18
    for p in per_rank:
        assert all(len({ids[i] for i in batch}) == 1 for batch in p)


def test_pad_keeps_every_readable_index():
    ids = ids_fixture()
    ranks = [BucketBatchSampler(ids, batch_size=4, seed=0, incomplete="pad", num_replicas=2, rank=r) for r in range(2)]
    batches = [list(s) for s in ranks]
    # ceil(10/4) + ceil(7/4) + ceil(5/4) = 3 + 2 + 2 = 7 batches -> padded to 8, 4 per rank
    assert [len(b) for b in batches] == [4, 4] == [len(s) for s in ranks]
    seen = {i for b in batches for batch in b for i in batch}
    assert seen == {i for i, b in enumerate(ids) if b is not None}
    for b in batches:
        assert all(len(batch) == 4 and len({ids[i] for i in batch}) == 1 for batch in b)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler([0], batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler([0], batch_size=1, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="incomplete"):
        BucketBatchSampler([0], batch_size=1, incomplete="keep")
