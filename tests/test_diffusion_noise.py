"""Tests for noise schedules, stratified block times and response corruption."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_automodel_bard.diffusion import (
    CosineSchedule,
    LinearSchedule,
    NoiseMode,
    NoiseSchedule,
    PolynomialSchedule,
    corrupt_response,
    get_schedule,
    mix_probabilities,
    ordinary_token_ids,
    sample_block_levels,
    sample_generator,
    stratified_times,
)

MASK_ID = 151671


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------- schedules


def test_linear_schedule():
    s = torch.tensor([0.01, 0.25, 0.5, 1.0])
    sch = LinearSchedule()
    assert isinstance(sch, NoiseSchedule)
    torch.testing.assert_close(sch.level(s), s)
    torch.testing.assert_close(sch.loss_weight(s), 1.0 / s)


@pytest.mark.parametrize("sch", [CosineSchedule(), PolynomialSchedule(2.0), PolynomialSchedule(0.5), LinearSchedule()])
def test_schedule_weight_is_dt_ds_over_t(sch):
    s = torch.linspace(0.05, 1.0, 20, dtype=torch.float64)
    h = 1e-6
    dt_ds = (sch.level(s + h) - sch.level(s - h)) / (2 * h)
    torch.testing.assert_close(sch.loss_weight(s), dt_ds / sch.level(s), rtol=1e-5, atol=1e-6)
    t = sch.level(s)
    assert torch.all((t > 0) & (t <= 1 + 1e-12))
    assert math.isclose(float(sch.level(torch.tensor(1.0, dtype=torch.float64))), 1.0, abs_tol=1e-12)


def test_cosine_and_polynomial_closed_forms():
    s = torch.tensor([0.2, 0.6, 1.0], dtype=torch.float64)
    torch.testing.assert_close(CosineSchedule().level(s), 1 - torch.cos(math.pi * s / 2))
    torch.testing.assert_close(PolynomialSchedule(3.0).level(s), s**3)
    torch.testing.assert_close(PolynomialSchedule(3.0).loss_weight(s), 3.0 / s)


def test_get_schedule():
    assert isinstance(get_schedule("linear"), LinearSchedule)
    assert isinstance(get_schedule("CondOT"), LinearSchedule)
    assert isinstance(get_schedule("cosine"), CosineSchedule)
    poly = get_schedule("polynomial", exponent=1.5)
    assert isinstance(poly, PolynomialSchedule) and poly.exponent == 1.5
    with pytest.raises(ValueError) as err:
        get_schedule("sigmoid")
    for name in ("linear", "cosine", "polynomial"):
        assert name in str(err.value)


# ---------------------------------------------------------------------------- stratification


@pytest.mark.parametrize("n", [1, 2, 5, 16, 64])
def test_stratified_times_one_per_stratum(n):
    for seed in range(20):
        s = stratified_times(n, _gen(seed), eps=0.0)
        assert s.shape == (n,) and s.dtype == torch.float32
        strata = torch.floor(s.double() * n).long().clamp(max=n - 1)
        assert sorted(strata.tolist()) == list(range(n))


def test_stratified_times_are_permuted_and_clamped():
    orders = set()
    for seed in range(30):
        s = stratified_times(6, _gen(seed))
        orders.add(tuple(torch.argsort(s).tolist()))
        assert torch.all((s >= 1e-3) & (s <= 1.0))
    assert len(orders) > 10  # blocks get their levels in random order
    assert torch.all(stratified_times(4, _gen(0), eps=0.5) >= 0.5)
    assert stratified_times(0, _gen(0)).numel() == 0


def test_stratified_times_deterministic():
    assert torch.equal(stratified_times(9, _gen(7)), stratified_times(9, _gen(7)))


def test_sample_block_levels():
    levels, weights = sample_block_levels(8, _gen(3), CosineSchedule())
    s = stratified_times(8, _gen(3))
    torch.testing.assert_close(levels, CosineSchedule().level(s))
    torch.testing.assert_close(weights, CosineSchedule().loss_weight(s))
    lv, w = sample_block_levels(8, _gen(3))
    torch.testing.assert_close(lv, s)
    torch.testing.assert_close(w, 1 / s)


# ------------------------------------------------------------------------------ corruption


def _clean(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (n,), generator=_gen(seed + 1000))


@pytest.mark.parametrize("mode", [NoiseMode.MASK, NoiseMode.UNIFORM])
@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_fraction_corrupted_matches_level(mode, t):
    block, nblocks = 16, 64
    clean = _clean(block * nblocks)
    subs = ordinary_token_ids(1000)
    fracs = []
    for seed in range(8):
        levels = torch.full((nblocks,), t)
        noisy, corrupted = corrupt_response(clean, block, levels, mode, MASK_ID, subs, _gen(seed))
        fracs.append(corrupted.float().mean().item())
        assert torch.equal(noisy[~corrupted], clean[~corrupted])
        if mode is NoiseMode.MASK:
            assert torch.all(noisy[corrupted] == MASK_ID)
        else:
            assert not torch.any(noisy == MASK_ID)
    assert abs(sum(fracs) / len(fracs) - t) < 0.02


def test_levels_apply_per_block():
    block = 8
    clean = _clean(4 * block)
    levels = torch.tensor([1.0, 1e-9, 1.0, 1e-9])
    for seed in range(10):
        noisy, corrupted = corrupt_response(clean, block, levels, "mask", MASK_ID, None, _gen(seed))
        per_block = corrupted.view(4, block).sum(dim=1).tolist()
        assert per_block[0] == block and per_block[2] == block
        assert per_block[1] == 0 and per_block[3] == 0


def test_outputs_keep_dtype_and_shape():
    clean = _clean(12).to(torch.int32)
    noisy, corrupted = corrupt_response(clean, 4, torch.tensor([0.5, 0.5, 0.5]), "uniform", MASK_ID,
                                        ordinary_token_ids(1000), _gen(0))
    assert noisy.dtype == torch.int32 and noisy.shape == (12,)
    assert corrupted.dtype == torch.bool and corrupted.shape == (12,)
    with pytest.raises(ValueError):
        corrupt_response(clean, 5, torch.tensor([0.5, 0.5]), "mask", MASK_ID, None, _gen(0))
    with pytest.raises(ValueError):
        corrupt_response(clean, 4, torch.tensor([0.5] * 3), "uniform", MASK_ID, None, _gen(0))
    with pytest.raises(ValueError):
        corrupt_response(clean, 4, torch.tensor([0.5] * 3), "gaussian", MASK_ID, None, _gen(0))


@pytest.mark.parametrize("mode", ["mask", "uniform", "mix"])
def test_at_least_one_corrupted(mode):
    clean = _clean(32)
    subs = ordinary_token_ids(1000)
    positions = set()
    for seed in range(40):
        noisy, corrupted = corrupt_response(clean, 4, torch.full((8,), 1e-9), mode, MASK_ID, subs, _gen(seed))
        assert int(corrupted.sum()) == 1
        positions.add(int(corrupted.nonzero()))
    assert len(positions) > 5  # the forced position is random, not always the same


def test_substitution_never_draws_excluded_ids():
    excluded = list(range(0, 1000, 2)) + [997]
    subs = ordinary_token_ids(1000, exclude=excluded)
    allowed = set(subs.tolist())
    assert allowed.isdisjoint(excluded) and len(allowed) == 1000 - len(set(excluded))
    clean = torch.full((256,), 4)  # an excluded id as clean token
    for mode in ("uniform", "mix"):
        for seed in range(10):
            noisy, corrupted = corrupt_response(clean, 16, torch.full((16,), 0.8), mode, MASK_ID, subs, _gen(seed))
            drawn = noisy[corrupted & (noisy != MASK_ID)]
            assert drawn.numel() > 0
            assert set(drawn.tolist()) <= allowed


def test_ordinary_token_ids_qwen():
    ids = ordinary_token_ids(151646, exclude=[151643, 151644, 151645, 151671, 10**7, -3])
    assert ids.dtype == torch.int64 and ids.numel() == 151643
    assert int(ids.max()) == 151642 and int(ids.min()) == 0
    assert not torch.isin(torch.tensor([151643, 151645, 151652, 151653, 151655, 151656, 151671]), ids).any()


def test_mix_probabilities_reference_points():
    p0 = mix_probabilities(torch.tensor(1e-6))
    assert p0.shape == (3,)
    torch.testing.assert_close(p0.sum(), torch.tensor(1.0))
    assert p0[2] > 0.99 and p0[0] < 0.002 and p0[1] < 0.002  # t -> 0: keep almost everything

    p_half = mix_probabilities(torch.tensor(0.5, dtype=torch.float64))
    c = math.cos(math.pi / 4)
    torch.testing.assert_close(p_half, torch.tensor([1 - c, 2 * c - 1, 1 - c], dtype=torch.float64))
    assert p_half[1] > p_half[0] and p_half[1] > p_half[2]  # mostly substitution mid-way

    p1 = mix_probabilities(torch.tensor(1.0))
    assert p1[0] > 0.99 and p1[1] < 0.002 and p1[2] < 0.002  # t = 1: (almost) all MASK
    # clamping: every column at least ~0.001 after normalisation
    grid = mix_probabilities(torch.linspace(0, 1, 101))
    assert grid.shape == (101, 3)
    assert torch.all(grid >= 0.00099)
    torch.testing.assert_close(grid.sum(-1), torch.ones(101))


def test_mix_mode_empirical_frequencies():
    clean = _clean(64 * 64)
    subs = ordinary_token_ids(1000)
    counts = torch.zeros(3)
    for seed in range(4):
        noisy, corrupted = corrupt_response(clean, 64, torch.full((64,), 0.5), "mix", MASK_ID, subs, _gen(seed))
        is_mask = noisy == MASK_ID
        counts += torch.tensor([is_mask.sum(), (corrupted & ~is_mask).sum(), (~corrupted).sum()]).float()
        assert torch.equal(noisy[~corrupted], clean[~corrupted])
    freq = counts / counts.sum()
    torch.testing.assert_close(freq, mix_probabilities(torch.tensor(0.5)), atol=0.02, rtol=0)


# ----------------------------------------------------------------------------- determinism


def test_sample_generator_deterministic_and_distinct():
    def draw(seed, epoch, idx):
        g = sample_generator(seed, epoch, idx)
        levels = stratified_times(8, g)
        return corrupt_response(_clean(64), 8, levels, "mix", MASK_ID, ordinary_token_ids(1000), g)

    a, b = draw(1, 0, 5), draw(1, 0, 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for other in (draw(1, 0, 6), draw(1, 1, 5), draw(2, 0, 5)):
        assert not torch.equal(a[0], other[0])


def test_sample_generator_seed_is_stable():
    # blake2b-based: the value must never change between runs, processes or Python versions.
    assert sample_generator(1234, 2, 17).initial_seed() == 1793208196249773195
    seeds = {sample_generator(0, 0, i).initial_seed() for i in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)


def test_level_range_maps_levels_affinely():
    s = stratified_times(6, _gen(5))
    levels, weights = sample_block_levels(6, _gen(5), level_range=(0.1, 0.5))
    torch.testing.assert_close(levels, 0.1 + 0.4 * s)
    torch.testing.assert_close(weights, 1 / levels)
    assert float(levels.min()) >= 0.1 and float(levels.max()) <= 0.5
    for bad in ((0.0, 0.5), (0.6, 0.5), (0.1, 1.5), "x", (0.1,)):
        with pytest.raises(ValueError, match="level_range"):
            sample_block_levels(2, _gen(0), level_range=bad)
