"""The absorbing-state (masked) text diffusion: masking rates, injected uniforms, buffers, errors."""

from __future__ import annotations

import math

import pytest
import torch

from compat import oracle
from compat.oracle import tol
from latentDLM_mmdit.diffusion_process import MaskedDiffusion
from latentDLM_mmdit.tokenizer import SyntheticVocab

V, MASK_ID, PAD_ID = 50, 49, 0
EPS = 1e-4
VOCAB = SyntheticVocab(V, MASK_ID, PAD_ID)


@pytest.fixture(scope="module")
def process() -> MaskedDiffusion:
    return MaskedDiffusion(VOCAB)


def clean_ids(batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Ids that never equal the mask id, so that a masked position is recognisable."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, MASK_ID, (batch, seq_len), generator=gen)


# -- move chance -----------------------------------------------------------------------------------
def test_move_chance_formula(process):
    """move chance = 1 - exp(-sigma), sigma = -log1p(-(1-eps) clip(t, eps, 1)) = (1-eps) clip(t)."""
    t = torch.tensor([0.0, 1e-5, 1e-4, 0.01, 0.3, 0.5, 0.9, 1.0])
    clipped = t.double().clamp(EPS, 1)
    expected_sigma = -torch.log1p(-(1 - EPS) * clipped)
    # float32_amplified: at t = 1 the float32 argument 1 - (1 - eps) = 1e-4 carries a relative rounding
    # error of ~6e-4 into log1p, i.e. ~2e-5 relative in sigma ~ 9.2.
    torch.testing.assert_close(process.sigma(t).double(), expected_sigma, **tol("float32_amplified"))
    torch.testing.assert_close(process.move_chance(t).double(), oracle.move_chance(t, EPS), **tol("float32_formula"))
    torch.testing.assert_close(oracle.move_chance(t, EPS), (1 - EPS) * clipped, **tol("float32_formula"))
    assert float(process.move_chance(torch.tensor([1.0]))) < 1.0, "t = 1 leaves a 1e-4 chance of no mask"


# Rate check: n = 64 * 1024 = 65536 tokens per t; the masked count is Binomial(n, p). The
# empirical rate must lie within 5 standard deviations sqrt(p (1 - p) / n) (<= 0.0098 at p = 0.5)
# of p, plus 1e-4 for p's float32 rounding: a false alarm has probability < 1e-6 per t.
RATE_TS = [0.05, 0.25, 0.5, 0.75, 0.95]


@pytest.mark.parametrize("t", RATE_TS, ids=[f"t={t}" for t in RATE_TS])
def test_empirical_mask_rate_matches_move_chance(process, t):
    batch, seq_len = 64, 1024
    ids = clean_ids(batch, seq_len)
    tt = torch.full((batch,), t)
    noisy = process.sample_zt(ids, tt, generator=torch.Generator().manual_seed(1234))
    n = ids.numel()
    p = float(process.move_chance(tt)[0])
    rate = float((noisy == MASK_ID).float().mean())
    tolerance = 5 * math.sqrt(p * (1 - p) / n) + 1e-4
    assert abs(rate - p) <= tolerance, f"t={t}: mask rate {rate:.4f}, move chance {p:.4f} (tol {tolerance:.4f})"
    # Positions that were not masked keep their token.
    kept = noisy != MASK_ID
    assert torch.equal(noisy[kept], ids[kept])


def test_per_row_times_give_per_row_rates(process):
    """Each row uses its own t: rows with t = 0.1 and t = 0.9 mask about 10% and 90%."""
    ids = clean_ids(2, 20000)
    noisy = process.sample_zt(ids, torch.tensor([0.1, 0.9]), generator=torch.Generator().manual_seed(7))
    rates = (noisy == MASK_ID).float().mean(dim=1)
    for rate, p in zip(rates.tolist(), (0.1 * (1 - EPS), 0.9 * (1 - EPS))):
        assert abs(rate - p) <= 5 * math.sqrt(p * (1 - p) / 20000), (rate, p)


def test_t_one_masks_everything_with_injected_uniforms(process):
    """At t = 1 the move chance is 1 - 1e-4: every uniform draw below it masks its token."""
    ids = clean_ids(4, 256)
    t = torch.ones(4)
    chance = float(process.move_chance(t)[0])
    uniform = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) * chance  # all < chance
    assert float(uniform.max()) < chance
    noisy = process.sample_zt(ids, t, uniform=uniform)
    assert bool((noisy == MASK_ID).all())
    # A draw in the top 1e-4 of [0, 1) leaves its token unmasked: the schedule's eps, as upstream.
    uniform[0, 0] = 0.99995
    noisy = process.sample_zt(ids, t, uniform=uniform)
    assert int(noisy[0, 0]) == int(ids[0, 0])
    assert int((noisy == MASK_ID).sum()) == ids.numel() - 1


def test_t_one_with_generator_masks_almost_everything(process):
    ids = clean_ids(64, 1024)
    noisy = process.sample_zt(ids, torch.ones(64), generator=torch.Generator().manual_seed(5))
    unmasked = int((noisy != MASK_ID).sum())
    # Expected 65536 * 1e-4 = 6.6 unmasked tokens (Poisson); 40 is more than 10 standard deviations.
    assert unmasked <= 40


def test_t_zero_masks_almost_nothing(process):
    ids = clean_ids(64, 1024)
    t = torch.zeros(64)
    noisy = process.sample_zt(ids, t, generator=torch.Generator().manual_seed(9))
    # t is clipped to eps = 1e-4: expected 6.6 masked tokens out of 65536 (Poisson).
    assert int((noisy == MASK_ID).sum()) <= 40
    # With every uniform above the move chance (1e-4, give or take float32's ~6e-8 in 1 - exp(-x))
    # nothing is masked at all.
    chance = float(process.move_chance(t).max())
    assert abs(chance - 1e-4) < 1e-6
    uniform = torch.full(ids.shape, 2e-4)
    torch.testing.assert_close(process.sample_zt(ids, t, uniform=uniform), ids, rtol=0, atol=0)


def test_injected_uniforms_give_exactly_the_expected_mask(process):
    gen = torch.Generator().manual_seed(11)
    ids = clean_ids(6, 33)
    t = torch.rand(6, generator=gen)
    uniform = torch.rand(ids.shape, generator=gen)
    noisy = process.sample_zt(ids, t, uniform=uniform)
    expected_mask = uniform < process.move_chance(t)[:, None]
    expected = torch.where(expected_mask, torch.full_like(ids, MASK_ID), ids)
    torch.testing.assert_close(noisy, expected, rtol=0, atol=0)
    assert 0 < int(expected_mask.sum()) < ids.numel(), "the case must mix masked and kept tokens"


def test_sample_zt_does_not_modify_inputs_or_global_rng(process):
    ids = clean_ids(3, 17)
    t = torch.tensor([0.2, 0.5, 0.8])
    ids_before, t_before = ids.clone(), t.clone()
    rng_before = torch.get_rng_state()
    first = process.sample_zt(ids, t, generator=torch.Generator().manual_seed(21))
    second = process.sample_zt(ids, t, generator=torch.Generator().manual_seed(21))
    assert torch.equal(torch.get_rng_state(), rng_before), "sample_zt(generator=...) touched the global RNG"
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(ids, ids_before, rtol=0, atol=0)
    torch.testing.assert_close(t, t_before, rtol=0, atol=0)
    assert first.dtype == ids.dtype and first.shape == ids.shape


# -- buffers ---------------------------------------------------------------------------------------
def test_buffers_have_upstream_names_and_values(process):
    """Upstream checkpoints carry these as text_noise_schedule.{log_prior,log_gamma,log_B}."""
    state = process.state_dict()
    assert sorted(state) == ["log_B", "log_gamma", "log_prior"]
    assert list(dict(process.named_parameters())) == [], "the schedule has no trainable parameters"
    log_prior = state["log_prior"]
    assert log_prior.shape == (V,) and log_prior.dtype == torch.float32
    expected_prior = torch.full((V,), -1e3)
    expected_prior[MASK_ID] = 0.0  # log-normalised: all the prior mass sits on the mask id
    torch.testing.assert_close(log_prior, expected_prior, rtol=0, atol=0)
    torch.testing.assert_close(log_prior.logsumexp(0), torch.tensor(0.0), **tol("float32_arithmetic"))
    torch.testing.assert_close(state["log_gamma"], torch.tensor(0.0), rtol=0, atol=0)
    torch.testing.assert_close(state["log_B"], torch.tensor(-20.0), rtol=0, atol=0)


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("t_shape", [(3,), (2, 1), ()], ids=["wrong-batch", "two-dims", "scalar"])
def test_bad_t_shape_raises(process, t_shape):
    with pytest.raises(ValueError, match=r"t must be \[B\]=\[2\]"):
        process.sample_zt(clean_ids(2, 5), torch.rand(t_shape))


@pytest.mark.parametrize("u_shape", [(2, 4), (2, 5, 1), (5,)], ids=["short", "extra-axis", "flat"])
def test_bad_uniform_shape_raises(process, u_shape):
    with pytest.raises(ValueError, match=r"uniform draws must be \[B, S\]=\(2, 5\)"):
        process.sample_zt(clean_ids(2, 5), torch.rand(2), uniform=torch.rand(u_shape))


class _NoSpecials:
    def __len__(self):
        return 10


class _NoLen:
    mask_token_id = 3
    pad_token_id = 0


class _MaskOutside:
    mask_token_id = 10
    pad_token_id = 0

    def __len__(self):
        return 10


@pytest.mark.parametrize(
    "tokenizer, names",
    [
        pytest.param(_NoSpecials(), ["mask_token_id", "pad_token_id"], id="no-special-ids"),
        pytest.param(_NoLen(), ["__len__"], id="no-len"),
        pytest.param(object(), ["mask_token_id", "pad_token_id", "__len__"], id="nothing"),
    ],
)
def test_tokenizer_missing_attributes_raise_type_error(tokenizer, names):
    with pytest.raises(TypeError) as info:
        MaskedDiffusion(tokenizer)
    for name in names:
        assert name in str(info.value), f"{name} not named in: {info.value}"


def test_mask_id_outside_vocab_raises():
    with pytest.raises(ValueError, match=r"mask_token_id=10 is outside the vocabulary \[0, 10\)"):
        MaskedDiffusion(_MaskOutside())
