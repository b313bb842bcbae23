"""Properties of the latent (Gaussian) diffusion: schedules, timestep mapping, forward process,
conversions between x0 / eps / v, and generator-driven noise."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compat import oracle
from compat.oracle import scaled_tol, tol
from latentDLM_mmdit.continuous_diffusion import (
    BETA_SCHEDULES,
    PARAMETERIZATIONS,
    ContinuousDiffusion,
)

T = 1000
_CACHE: dict[tuple[str, str, int], ContinuousDiffusion] = {}


def diffusion(schedule: str, parameterization: str = "epsilon", num_timesteps: int = T) -> ContinuousDiffusion:
    key = (schedule, parameterization, num_timesteps)
    if key not in _CACHE:
        _CACHE[key] = ContinuousDiffusion(num_timesteps, schedule, parameterization=parameterization)
    return _CACHE[key]


PROPERTY = settings(max_examples=40, deadline=None)
schedules = st.sampled_from(BETA_SCHEDULES)
parameterizations = st.sampled_from(PARAMETERIZATIONS)
seeds = st.integers(0, 2**31 - 1)
shapes = st.lists(st.integers(1, 5), min_size=0, max_size=2)  # trailing dims after the batch axis


@st.composite
def timesteps(draw, batch: int):
    """[B] timesteps, either continuous floats in [0, 1] or integer indices in [0, T)."""
    if draw(st.booleans()):
        values = draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=batch, max_size=batch))
        return torch.tensor(values, dtype=torch.float32)
    values = draw(st.lists(st.integers(0, T - 1), min_size=batch, max_size=batch))
    return torch.tensor(values, dtype=torch.long)


@st.composite
def problems(draw):
    """(t, x0, noise) with a random batch size and trailing shape."""
    batch = draw(st.integers(1, 6))
    shape = (batch, *draw(shapes))
    gen = torch.Generator().manual_seed(draw(seeds))
    scale = draw(st.floats(0.1, 10.0))
    x0 = torch.randn(shape, generator=gen) * scale
    noise = torch.randn(shape, generator=gen)
    return draw(timesteps(batch)), x0, noise


def amplification(d: ContinuousDiffusion, t: torch.Tensor) -> float:
    """max over the batch of 1 / sqrt(alphas_cumprod[t]): the gain of x0_from_eps on xt's rounding."""
    return float((1.0 / d.schedule_values(t)[0]).max())


# -- conversions -----------------------------------------------------------------------------------
@PROPERTY
@given(problem=problems(), schedule=schedules, parameterization=parameterizations)
def test_x0_recovered_from_model_target(problem, schedule, parameterization):
    """add_noise's target, converted back with x0_from_prediction, gives x0.

    Under `epsilon`, x0 = (xt - sqrt(1-ab) eps) / sqrt(ab): the float32 rounding error of xt (a few
    ulp of |xt|) is divided by sqrt(ab), which at the last cosine index is ~1.6e-5, i.e. amplified
    ~6e4 times. The absolute tolerance is therefore scaled by max 1/sqrt(ab) over the batch rather
    than t restricted away from 1. `x0` and `v_param` are well conditioned everywhere.
    """
    t, x0, noise = problem
    d = diffusion(schedule, parameterization)
    xt, target = d.add_noise(x0, t, noise)
    recovered = d.x0_from_prediction(xt, t, target)
    scale = 1.0 + float(x0.abs().max()) + float(noise.abs().max()) if x0.numel() else 1.0
    amp = amplification(d, t) if parameterization == "epsilon" else 1.0
    torch.testing.assert_close(recovered, x0, **scaled_tol("float32_formula", scale * amp))


@PROPERTY
@given(problem=problems(), schedule=schedules)
def test_x0_from_eps_and_from_v(problem, schedule):
    """The two explicit conversions, regardless of the configured parameterization."""
    t, x0, noise = problem
    d = diffusion(schedule)
    xt, _ = d.add_noise(x0, t, noise)
    v = d.v_from_x0_eps(x0, noise, t)
    scale = 1.0 + float(x0.abs().max()) + float(noise.abs().max())
    torch.testing.assert_close(d.x0_from_v(xt, t, v), x0, **scaled_tol("float32_formula", scale))
    # See test_x0_recovered_from_model_target for why the tolerance grows with 1/sqrt(ab).
    torch.testing.assert_close(
        d.x0_from_eps(xt, t, noise), x0, **scaled_tol("float32_formula", scale * amplification(d, t))
    )


@PROPERTY
@given(problem=problems(), schedule=schedules)
def test_eps_round_trips(problem, schedule):
    """eps from x0 and eps from v give the noise back; v from (x0, eps) is the v_param target."""
    t, x0, noise = problem
    d = diffusion(schedule)
    xt, _ = d.add_noise(x0, t, noise)
    scale = 1.0 + float(x0.abs().max()) + float(noise.abs().max())
    # eps = (xt - sqrt(ab) x0) / sqrt(1 - ab): amplified by 1/sqrt(1 - ab) (about 100 at t = 0).
    sqrt_1m_ab = d.schedule_values(t)[1]
    torch.testing.assert_close(
        d.eps_from_x0(xt, t, x0), noise, **scaled_tol("float32_formula", scale / float(sqrt_1m_ab.min()))
    )
    v = d.v_from_x0_eps(x0, noise, t)
    torch.testing.assert_close(d.eps_from_v(xt, t, v), noise, **scaled_tol("float32_formula", scale))
    _, v_target = diffusion(schedule, "v_param").add_noise(x0, t, noise)
    torch.testing.assert_close(v, v_target, rtol=0, atol=0)


@PROPERTY
@given(problem=problems(), schedule=schedules, parameterization=parameterizations)
def test_add_noise_matches_formula_and_target(problem, schedule, parameterization):
    """xt = sqrt(ab) x0 + sqrt(1-ab) noise; target = noise | x0 | sqrt(ab) noise - sqrt(1-ab) x0."""
    t, x0, noise = problem
    d = diffusion(schedule, parameterization)
    xt, target = d.add_noise(x0, t, noise)
    ab = d.alphas_cumprod.double()[d.timestep_indices(t)]  # [B]: this table, the oracle's formulas
    expected_xt = oracle.noised(x0, noise, ab).float()
    scale = 1.0 + float(x0.abs().max()) + float(noise.abs().max())
    torch.testing.assert_close(xt, expected_xt, **scaled_tol("float32_formula", scale))
    if parameterization == "epsilon":
        torch.testing.assert_close(target, noise, rtol=0, atol=0)
    elif parameterization == "x0":
        torch.testing.assert_close(target, x0, rtol=0, atol=0)
    else:
        expected = oracle.target(x0, noise, ab, "v_param").float()
        torch.testing.assert_close(target, expected, **scaled_tol("float32_formula", scale))
    assert xt.shape == target.shape == x0.shape


# -- schedules -------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    schedule=schedules,
    num_timesteps=st.integers(2, 2000),
    beta_start=st.floats(1e-5, 1e-3),
    beta_end=st.floats(2e-3, 0.05),
)
def test_schedule_tables_are_valid(schedule, num_timesteps, beta_start, beta_end):
    d = ContinuousDiffusion(num_timesteps, schedule, beta_start=beta_start, beta_end=beta_end)
    ab = d.alphas_cumprod
    assert ab.shape == d.betas.shape == (num_timesteps,)
    assert ab.dtype == torch.float32
    assert bool((ab[1:] < ab[:-1]).all()), "alphas_cumprod must be strictly decreasing"
    assert bool((ab > 0).all()) and bool((ab <= 1).all()), "alphas_cumprod must lie in (0, 1]"
    lo, hi = (1e-4, 0.9999) if schedule == "cosine" else (beta_start, beta_end)
    # float32 storage of the bounds: allow one float32 ulp around them.
    assert float(d.betas.min()) >= lo * (1 - 1e-6), f"{schedule}: beta below {lo}"
    assert float(d.betas.max()) <= hi * (1 + 1e-6), f"{schedule}: beta above {hi}"
    torch.testing.assert_close(
        d.sqrt_alphas_cumprod**2 + d.sqrt_one_minus_alphas_cumprod**2,
        torch.ones(num_timesteps),
        **tol("float32_arithmetic"),
    )


def test_linear_schedule_values():
    d = diffusion("linear")
    torch.testing.assert_close(d.betas, torch.linspace(1e-4, 0.02, T), rtol=0, atol=0)
    torch.testing.assert_close(d.alphas_cumprod, torch.cumprod(1 - torch.linspace(1e-4, 0.02, T), 0), rtol=0, atol=0)


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
def test_schedule_tables_equal_the_oracle(schedule):
    """alphas_cumprod of every schedule (cosine: Improved-DDPM, s = 0.008) against the float64 oracle."""
    expected = oracle.alphas_cumprod(schedule, T)
    torch.testing.assert_close(diffusion(schedule).alphas_cumprod.double(), expected, **tol("float32_schedule_table"))


def test_cosine_schedule_values():
    # The cosine schedule's last sqrt(alphas_cumprod) is tiny: 1/sqrt(ab) amplifies eps errors.
    assert float(diffusion("cosine").sqrt_alphas_cumprod[-1]) < 1e-4


def test_sigmoid_schedule_values():
    expected = torch.sigmoid(torch.linspace(-6, 6, T)) * (0.02 - 1e-4) + 1e-4
    torch.testing.assert_close(diffusion("sigmoid").betas, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, names",
    [
        pytest.param({"beta_schedule": "quadratic"}, BETA_SCHEDULES, id="unknown-schedule"),
        pytest.param({"parameterization": "score"}, PARAMETERIZATIONS, id="unknown-parameterization"),
    ],
)
def test_unknown_names_raise_listing_valid_ones(kwargs, names):
    with pytest.raises(ValueError) as info:
        ContinuousDiffusion(T, **kwargs)
    message = str(info.value)
    assert next(iter(kwargs.values())) in message
    for name in names:
        assert name in message, f"{name!r} not listed in: {message}"


@pytest.mark.parametrize("num_timesteps", [1, 0, 2.5], ids=["one", "zero", "fractional"])
def test_bad_num_timesteps_raise(num_timesteps):
    with pytest.raises(ValueError, match="num_timesteps"):
        ContinuousDiffusion(num_timesteps)


# -- timestep mapping ------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(0.0, 1.0, width=32), min_size=1, max_size=8), num_timesteps=st.integers(2, 5000))
def test_continuous_timesteps_map_to_floor_index(values, num_timesteps):
    """A tensor whose max is <= 1 is continuous: index floor(t * (T - 1)).

    The product is taken in float32, so next to an integer boundary the index may be the one above
    the exact float64 floor; anything else is wrong.
    """
    d = diffusion("linear", num_timesteps=num_timesteps)
    t = torch.tensor(values, dtype=torch.float32)
    idx = d.timestep_indices(t)
    assert idx.dtype == torch.long and idx.shape == t.shape
    exact = t.double() * (num_timesteps - 1)
    assert bool((idx >= 0).all()) and bool((idx <= num_timesteps - 1).all())
    gap = exact - idx.double()
    assert bool((gap < 1).all()) and bool((gap > -1e-3).all()), f"{values} -> {idx.tolist()}"
    assert bool(idx[t == 1.0].eq(num_timesteps - 1).all()), "t = 1 must map to the last index"
    assert bool(idx[t == 0.0].eq(0).all())


@pytest.mark.parametrize(
    "values, expected",
    [
        pytest.param([1.0], [T - 1], id="one-is-last"),
        pytest.param([0.0, 1.0], [0, T - 1], id="zero-and-one"),
        pytest.param([0.5, 0.25], [499, 249], id="halves"),  # floor(0.5*999)=499, floor(0.25*999)=249
        pytest.param([2, 500, T - 1], [2, 500, T - 1], id="indices"),
        pytest.param([3, T, T + 50], [3, T - 1, T - 1], id="indices-clamped-high"),
        pytest.param([-0.5, 0.5], [0, 499], id="negative-continuous-clamped"),
    ],
)
def test_timestep_index_examples(values, expected):
    dtype = torch.long if all(isinstance(v, int) for v in values) else torch.float32
    idx = diffusion("cosine").timestep_indices(torch.tensor(values, dtype=dtype))
    assert idx.tolist() == expected


@settings(max_examples=40, deadline=None)
@given(indices=st.lists(st.integers(2, T - 1), min_size=1, max_size=8))
def test_integer_indices_are_used_as_is(indices):
    d = diffusion("cosine")
    idx = d.timestep_indices(torch.tensor(indices))
    assert idx.tolist() == indices
    sqrt_ab, sqrt_1m_ab = d.schedule_values(torch.tensor(indices))
    torch.testing.assert_close(sqrt_ab, d.sqrt_alphas_cumprod[indices], rtol=0, atol=0)
    torch.testing.assert_close(sqrt_1m_ab, d.sqrt_one_minus_alphas_cumprod[indices], rtol=0, atol=0)


@pytest.mark.parametrize(
    "t, match",
    [
        pytest.param(torch.zeros(2, 1), "timesteps must be a \\[B\\] tensor", id="two-dims"),
        pytest.param(torch.tensor([0.5, float("nan")]), "NaN or Inf", id="nan"),
        pytest.param(torch.tensor([0.5, float("inf")]), "NaN or Inf", id="inf"),
    ],
)
def test_bad_timesteps_raise(t, match):
    with pytest.raises(ValueError, match=match):
        diffusion("cosine").timestep_indices(t)


# -- add_noise errors and generator noise ----------------------------------------------------------
def test_noise_shape_mismatch_raises():
    d = diffusion("cosine")
    x0 = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"noise shape \(3, 1, 4\) differs from x0 shape \(3, 4\)"):
        d.add_noise(x0, torch.rand(3), torch.randn(3, 1, 4))
    with pytest.raises(ValueError, match="noise shape"):
        d.add_noise(x0, torch.rand(3), torch.randn(3, 5))


def test_timestep_batch_mismatch_raises():
    with pytest.raises(ValueError, match="timesteps have batch 2, x0 has batch 3"):
        diffusion("cosine").add_noise(torch.randn(3, 4), torch.rand(2), torch.randn(3, 4))


@settings(max_examples=20, deadline=None)
@given(
    seed=seeds, schedule=schedules, parameterization=parameterizations, batch=st.integers(1, 5), width=st.integers(1, 7)
)
def test_generator_noise_is_reproducible_and_leaves_global_rng(seed, schedule, parameterization, batch, width):
    d = diffusion(schedule, parameterization)
    x0 = torch.linspace(-1, 1, batch * width).reshape(batch, width)
    t = torch.linspace(0, 1, batch)
    before = torch.get_rng_state()
    first = d.add_noise(x0, t, generator=torch.Generator().manual_seed(seed))
    second = d.add_noise(x0, t, generator=torch.Generator().manual_seed(seed))
    other = d.add_noise(x0, t, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(torch.get_rng_state(), before), "add_noise(generator=...) touched the global RNG"
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The noise actually used is the generator's standard normal draw.
    expected_noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    expected_xt, _ = d.add_noise(x0, t, expected_noise)
    torch.testing.assert_close(first[0], expected_xt, rtol=0, atol=0)
    assert not torch.equal(first[0], other[0]), "different seeds must give different noise"
