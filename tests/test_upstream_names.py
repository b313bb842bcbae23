"""Drop-in names for code written against upstream (LGDLM).

A trainer written for upstream imports `latentDLM_mmdit.<module>` and gets this repo's module of
that name. Each upstream name its trainers and training scripts use is checked here against the
method it stands for, bit-exactly (rtol = atol = 0): the upstream call spellings are written out
as upstream's callers write them (keywords included), the expected values come from this repo's
own methods or from plain torch draws on an identically seeded RNG.
"""

from __future__ import annotations

import pytest
import torch

from compat.oracle import tol
from latentDLM_mmdit.continuous_diffusion import ContinuousDiffusion
from latentDLM_mmdit.diffusion_process import MaskedDiffusion
from latentDLM_mmdit.models.multimodal_mmdit import MultimodalMMDiT
from latentDLM_mmdit.seeding import seed_everything
from tests.builders import TINY_VOCAB

EXACT = {"rtol": 0.0, "atol": 0.0}
SCHEDULES = ("linear", "cosine", "sigmoid")
PARAMETERIZATIONS = ("epsilon", "x0", "v_param")
VOCAB = TINY_VOCAB


def problem(seed: int = 0, batch: int = 5, width: int = 6):
    """(x0 [B, D], t [B] continuous in [0, 1), noise [B, D], prediction [B, D]) from one generator."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, width, generator=gen)
    t = torch.rand(batch, generator=gen)
    return x0, t, torch.randn(batch, width, generator=gen), torch.randn(batch, width, generator=gen)


# -- ContinuousDiffusion ------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_constructor_as_upstream_trainers_call_it(schedule, parameterization):
    """Upstream's stable and cycle trainers pass `device=` (a TypeError here before); the result
    must be the same diffusion as without it."""
    upstream_style = ContinuousDiffusion(
        num_timesteps=1000,
        beta_schedule=schedule,
        parameterization=parameterization,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    plain = ContinuousDiffusion(1000, schedule, parameterization=parameterization)
    expected_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert upstream_style.device.type == expected_device.type
    assert upstream_style.sqrt_alphas_cumprod.device.type == expected_device.type
    assert plain.device == torch.device("cpu")
    for table in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
        torch.testing.assert_close(
            getattr(upstream_style, table).cpu(),
            getattr(plain, table),
            **EXACT,
            msg=lambda m, table=table: f"{table} differs with device=\n{m}",
        )
    x0, t, noise, _ = problem()
    for got, want in zip(upstream_style.add_noise(x0, t, noise), plain.add_noise(x0, t, noise)):
        torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.parametrize("device", ["bogus", "cuda:99"])
def test_unusable_device_is_a_clear_error(device):
    if device.startswith("cuda") and torch.cuda.device_count() > 99:
        pytest.skip("this machine has a 100th CUDA device")
    with pytest.raises(ValueError, match=rf"device='{device}' cannot be used on this machine.*pass device='cpu'"):
        ContinuousDiffusion(num_timesteps=10, device=device)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_predict_aliases_equal_the_conversions(schedule):
    d = ContinuousDiffusion(1000, schedule)
    x0, t, noise, prediction = problem(seed=3)
    xt, _ = d.add_noise(x0, t, noise)
    pairs = {
        "predict_x0_from_eps": (d.predict_x0_from_eps(xt, t, prediction), d.x0_from_eps(xt, t, prediction)),
        "predict_eps_from_x0": (d.predict_eps_from_x0(xt, t, prediction), d.eps_from_x0(xt, t, prediction)),
        "predict_x0_from_v": (d.predict_x0_from_v(xt, t, prediction), d.x0_from_v(xt, t, prediction)),
        "predict_eps_from_v": (d.predict_eps_from_v(xt, t, prediction), d.eps_from_v(xt, t, prediction)),
        "predict_v_from_x0_eps": (d.predict_v_from_x0_eps(x0, noise, t), d.v_from_x0_eps(x0, noise, t)),
    }
    for name, (got, want) in pairs.items():
        torch.testing.assert_close(got, want, **EXACT, msg=lambda m, name=name: f"{name}\n{m}")


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_upstream_cycle_x0_dispatch_equals_x0_from_prediction(parameterization):
    """Upstream's cycle trainer picks the conversion by `.parameterization` itself."""
    d = ContinuousDiffusion(num_timesteps=1000, beta_schedule="cosine", parameterization=parameterization, device="cpu")
    x0, t, noise, prediction = problem(seed=4)
    xt, _ = d.add_noise(x0, t, noise)
    by_name = {
        "epsilon": lambda: d.predict_x0_from_eps(xt, t, prediction),
        "x0": lambda: prediction,
        "v_param": lambda: d.predict_x0_from_v(xt, t, prediction),
    }[d.parameterization]()
    torch.testing.assert_close(by_name, d.x0_from_prediction(xt, t, prediction), **EXACT)


def test_get_schedule_values_equals_schedule_values():
    d = ContinuousDiffusion(1000, "cosine")
    t = torch.tensor([0.0, 0.25, 0.999, 1.0])
    indices = torch.tensor([0, 17, 998, 999])
    for timesteps in (t, indices):
        got = d.get_schedule_values(timesteps)
        got_on_cpu = d.get_schedule_values(timesteps, device="cpu")
        want = d.schedule_values(timesteps)
        for g, g_cpu, w in zip(got, got_on_cpu, want):
            torch.testing.assert_close(g, w, **EXACT)
            torch.testing.assert_close(g_cpu, w, **EXACT)


@pytest.mark.parametrize(
    "name, reference",
    [
        ("sample_continuous_timesteps", lambda n, gen: torch.rand(n, generator=gen)),
        ("sample_timesteps", lambda n, gen: torch.randint(0, 1000, (n,), generator=gen)),
    ],
)
def test_timestep_samplers_draw_like_upstream(name, reference):
    """Upstream's stable trainer calls `sample_continuous_timesteps(B, device=...)`, its older
    trainer `sample_timesteps(B, device=...)`; both draw from the global RNG. With a generator
    they draw from it instead and leave the global RNG alone."""
    d = ContinuousDiffusion(num_timesteps=1000, beta_schedule="cosine", parameterization="epsilon", device="cpu")
    sampler = getattr(d, name)
    torch.manual_seed(11)
    got = sampler(7, device=torch.device("cpu"))
    torch.manual_seed(11)
    want = reference(7, None)
    torch.testing.assert_close(got, want, **EXACT)
    assert got.shape == (7,) and got.device == torch.device("cpu")

    global_state = torch.get_rng_state()
    got_gen = sampler(7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), global_state), f"{name}(generator=...) used the global RNG"
    torch.testing.assert_close(got_gen, reference(7, torch.Generator().manual_seed(5)), **EXACT)
    if name == "sample_continuous_timesteps":
        assert got.dtype == torch.float32 and bool(((got >= 0) & (got < 1)).all())
    else:
        assert got.dtype == torch.int64 and bool(((got >= 0) & (got < 1000)).all())


@pytest.mark.parametrize("batch_size", [-1, 2.5, True, "4"])
def test_timestep_samplers_refuse_bad_batch_sizes(batch_size):
    d = ContinuousDiffusion(num_timesteps=10)
    for sampler in (d.sample_timesteps, d.sample_continuous_timesteps):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 0"):
            sampler(batch_size)


def test_add_noise_without_noise_draws_like_randn_like():
    """Upstream's `add_noise(x0, t)` draws `torch.randn_like(x0)` from the global RNG."""
    d = ContinuousDiffusion(num_timesteps=1000, beta_schedule="cosine", parameterization="v_param", device="cpu")
    x0, t, _, _ = problem(seed=6)
    torch.manual_seed(21)
    got = d.add_noise(x0, t)
    torch.manual_seed(21)
    want = d.add_noise(x0, t, torch.randn_like(x0))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **EXACT)


# -- MaskedDiffusion ----------------------------------------------------------------------------
def test_sample_zt_without_generator_draws_like_rand_like():
    """Upstream masks where `torch.rand_like(input_ids.float()) < move_chance[:, None]`."""
    schedule = MaskedDiffusion(VOCAB)
    ids = torch.randint(1, 15, (4, 9), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.1, 0.5, 0.9, 1.0])
    torch.manual_seed(8)
    got = schedule.sample_zt(ids, t)
    torch.manual_seed(8)
    is_masked = torch.rand_like(ids.float()) < schedule.move_chance(t).unsqueeze(-1)
    want = torch.where(is_masked, torch.full_like(ids, schedule.mask_id), ids)
    assert torch.equal(got, want)
    assert bool((got == schedule.mask_id).any()) and bool((got != schedule.mask_id).any())


def test_get_sigmas_matches_sigma_and_its_derivative():
    schedule = MaskedDiffusion(VOCAB)
    t = torch.tensor([0.0, 1e-5, 0.2, 0.5, 0.9, 1.0])
    dsigma, sigma = schedule.get_sigmas(t)
    torch.testing.assert_close(sigma, schedule.sigma(t), **EXACT)
    inside = torch.tensor([0.2, 0.5, 0.9], requires_grad=True)
    (grad,) = torch.autograd.grad(schedule.sigma(inside).sum(), inside)
    torch.testing.assert_close(schedule.get_sigmas(inside.detach())[0], grad, **tol("float32_arithmetic"))
    torch.testing.assert_close(dsigma[[2, 3, 4]], grad, **tol("float32_arithmetic"))
    # An explicit eps equal to the schedule's own gives the same numbers.
    for got, want in zip(schedule.get_sigmas(t, eps=1e-4), (dsigma, sigma)):
        torch.testing.assert_close(got, want, **EXACT)


# -- MultimodalMMDiT ----------------------------------------------------------------------------
def test_model_built_and_called_as_upstream_scripts_do():
    """Upstream's training script builds the model with keywords and its trainers call it with
    keywords; the outputs equal a positional call."""
    model_config = {
        "hidden_size": 32,
        "n_blocks": 1,
        "cond_dim": 32,
        "max_seq_len": 16,
        "dropout": 0.0,
        "num_residual_streams": 2,
    }
    seed_everything(0)
    model = MultimodalMMDiT(config=model_config, vocab_size=len(VOCAB), latent_dim=8, cluster_size=0)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 16, (3, 10), generator=gen)
    latents = torch.randn(3, 8, generator=gen)
    t_text, t_latent = torch.rand(3, generator=gen), torch.rand(3, generator=gen)
    mask = torch.ones(3, 10, dtype=torch.bool)
    by_keyword = model(
        text_tokens=ids,
        latents=latents.unsqueeze(1),
        text_timesteps=t_text,
        latent_timesteps=t_latent,
        attention_mask=mask,
    )
    positional = model(ids, latents.unsqueeze(1), t_text, t_latent, mask)
    assert len(by_keyword) == 2
    for got, want in zip(by_keyword, positional):
        torch.testing.assert_close(got, want, **EXACT)
    assert by_keyword[1].shape == (3, 1, 8)
