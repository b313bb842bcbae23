"""Gaussian (DDPM-style) diffusion for the latent vector.

Names follow Ho et al. (2020) and Nichol & Dhariwal (2021): `betas`, `alphas_cumprod`,
`sqrt_alphas_cumprod`, `sqrt_one_minus_alphas_cumprod`. Timesteps are either continuous in [0, 1]
(a tensor whose max is <= 1, mapped to index floor(t * (T - 1))) or integer indices in [0, T).
The schedule tables are float32, as upstream, whatever the dtype of the data.
"""

from __future__ import annotations

import logging
import math
import operator

import torch

logger = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "cosine", "sigmoid")
PARAMETERIZATIONS = ("epsilon", "x0", "v_param")


def cosine_betas(num_timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Improved-DDPM cosine schedule, betas clipped to [1e-4, 0.9999]."""
    x = torch.linspace(0, num_timesteps, num_timesteps + 1)
    alphas_cumprod = torch.cos(((x / num_timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return torch.clip(betas, 0.0001, 0.9999)


def sigmoid_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return torch.sigmoid(torch.linspace(-6, 6, num_timesteps)) * (beta_end - beta_start) + beta_start


def _checked_device(device: str | torch.device) -> torch.device:
    """torch.device(device), or a ValueError naming the device when it cannot be used here."""
    try:
        checked = torch.device(device)
        torch.empty(0, device=checked)
    except (RuntimeError, AssertionError, TypeError) as exc:
        raise ValueError(
            f"ContinuousDiffusion: device={str(device)!r} cannot be used on this machine ({exc}); "
            "pass device='cpu' or a device torch can allocate on"
        ) from exc
    return checked


def _checked_batch_size(batch_size) -> int:
    """batch_size as an int, or a ValueError when it is not an integer >= 0."""
    try:
        size = operator.index(batch_size)
    except TypeError:
        size = -1
    if isinstance(batch_size, bool) or size < 0:
        raise ValueError(f"batch_size must be an integer >= 0, got {batch_size!r}")
    return size


def _expand_like(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] with as many axes as x."""
    while values.dim() < x.dim():
        values = values.unsqueeze(-1)
    return values


class ContinuousDiffusion:
    """Forward process q(x_t | x_0) and the conversions between x0, eps and v.

    Args:
        num_timesteps: number of discrete steps T (>= 2).
        beta_schedule: one of "linear", "cosine", "sigmoid".
        beta_start: first beta of the linear and sigmoid schedules.
        beta_end: last beta of the linear and sigmoid schedules.
        parameterization: what the model predicts: "epsilon" (the noise), "x0" (the clean
            latent) or "v_param" (v = sqrt(ab) * eps - sqrt(1 - ab) * x0).
        device: upstream alias (upstream's trainers pass `device="cuda" if available else "cpu"`):
            where the schedule tables live and where `sample_timesteps` /
            `sample_continuous_timesteps` draw by default. None keeps them on the CPU. Unlike
            upstream, the tables are always computed on the CPU and then moved, so every device
            sees the same float32 values.

    Upstream names (what upstream's trainers call): the aliases `predict_x0_from_eps`,
    `predict_eps_from_x0`, `predict_x0_from_v`, `predict_eps_from_v`, `predict_v_from_x0_eps`
    and `get_schedule_values`; `sample_timesteps` and `sample_continuous_timesteps`; the `device`
    argument and attribute.
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_schedule: str = "cosine",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        parameterization: str = "epsilon",
        device: str | torch.device | None = None,
    ):
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; valid: {', '.join(PARAMETERIZATIONS)}")
        if int(num_timesteps) != num_timesteps or num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
        self.num_timesteps = int(num_timesteps)
        self.beta_schedule = beta_schedule
        self.parameterization = parameterization
        if beta_schedule == "linear":
            self.betas = torch.linspace(beta_start, beta_end, self.num_timesteps)
        elif beta_schedule == "cosine":
            self.betas = cosine_betas(self.num_timesteps)
        else:
            self.betas = sigmoid_betas(self.num_timesteps, beta_start, beta_end)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.device = torch.device("cpu") if device is None else _checked_device(device)
        if self.device.type != "cpu":
            for name in ("betas", "alphas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
                setattr(self, name, getattr(self, name).to(self.device))

    # -- timesteps ------------------------------------------------------------------------------
    def timestep_indices(self, t: torch.Tensor) -> torch.Tensor:
        """Continuous t (floating, max <= 1) -> floor(t * (T - 1)); otherwise t is an index. Clamped to [0, T)."""
        if t.dim() != 1:
            raise ValueError(f"timesteps must be a [B] tensor, got shape {tuple(t.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError("timesteps contain NaN or Inf")
        # Floating t with max <= 1 is continuous (as upstream); an integer tensor is always an index
        # (upstream read an index tensor like [0, 1] as continuous: 1 -> T - 1).
        if t.is_floating_point() and t.numel() > 0 and t.max() <= 1.0:
            return (t * (self.num_timesteps - 1)).long().clamp(0, self.num_timesteps - 1)
        return t.long().clamp(0, self.num_timesteps - 1)

    def schedule_values(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alphas_cumprod[t]), sqrt(1 - alphas_cumprod[t])), each [B] float32 on t's device."""
        device = t.device
        if device not in self._tables:
            self._tables[device] = (
                self.sqrt_alphas_cumprod.to(device),
                self.sqrt_one_minus_alphas_cumprod.to(device),
            )
        sqrt_ab, sqrt_1m_ab = self._tables[device]
        idx = self.timestep_indices(t)
        return sqrt_ab[idx], sqrt_1m_ab[idx]

    def x0_error_gain(self, t: torch.Tensor) -> torch.Tensor:
        """|d x0 / d prediction| of `x0_from_prediction` at t, [B]: how much an error in the model's
        output is amplified in the reconstructed x0. epsilon: sqrt(1 - ab) / sqrt(ab) (about 6.4e4
        at t = 1 under the cosine schedule); v_param: sqrt(1 - ab); x0: 1."""
        sqrt_ab, sqrt_1m_ab = self.schedule_values(t)
        if self.parameterization == "epsilon":
            return sqrt_1m_ab / sqrt_ab
        if self.parameterization == "v_param":
            return sqrt_1m_ab
        if self.parameterization == "x0":
            return torch.ones_like(sqrt_ab)
        raise ValueError(f"unknown parameterization {self.parameterization!r}; valid: {', '.join(PARAMETERIZATIONS)}")

    # -- forward process ------------------------------------------------------------------------
    def add_noise(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ):
        """Returns (xt, target): xt = sqrt(ab) x0 + sqrt(1 - ab) noise; target per parameterization.

        Args:
            x0: clean latents [B, ...].
            t: timesteps [B] (continuous in [0, 1] or indices).
            noise: standard normal noise shaped like x0; drawn from `generator` when None.
            generator: torch.Generator for the noise draw when `noise` is None.
        """
        if noise is None:
            noise = torch.randn(
                x0.shape,
                generator=generator,
                dtype=x0.dtype,
                device=generator.device if generator is not None else x0.device,
            ).to(x0.device)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
        if t.shape[0] != x0.shape[0]:
            raise ValueError(f"timesteps have batch {t.shape[0]}, x0 has batch {x0.shape[0]}")
        sqrt_ab, sqrt_1m_ab = self.schedule_values(t)
        sqrt_ab, sqrt_1m_ab = _expand_like(sqrt_ab, x0), _expand_like(sqrt_1m_ab, x0)
        xt = sqrt_ab * x0 + sqrt_1m_ab * noise
        return xt, self.target(x0, noise, sqrt_ab, sqrt_1m_ab)

    def target(self, x0, noise, sqrt_ab, sqrt_1m_ab) -> torch.Tensor:
        if self.parameterization == "epsilon":
            return noise
        if self.parameterization == "x0":
            return x0
        if self.parameterization == "v_param":
            return sqrt_ab * noise - sqrt_1m_ab * x0
        raise ValueError(f"unknown parameterization {self.parameterization!r}; valid: {', '.join(PARAMETERIZATIONS)}")

    # -- conversions ----------------------------------------------------------------------------
    def _coeffs(self, t: torch.Tensor, like: torch.Tensor):
        sqrt_ab, sqrt_1m_ab = self.schedule_values(t)
        return _expand_like(sqrt_ab, like), _expand_like(sqrt_1m_ab, like)

    def x0_from_eps(self, xt, t, eps):
        sqrt_ab, sqrt_1m_ab = self._coeffs(t, xt)
        return (xt - sqrt_1m_ab * eps) / sqrt_ab

    def eps_from_x0(self, xt, t, x0):
        sqrt_ab, sqrt_1m_ab = self._coeffs(t, xt)
        return (xt - sqrt_ab * x0) / sqrt_1m_ab

    def x0_from_v(self, xt, t, v):
        sqrt_ab, sqrt_1m_ab = self._coeffs(t, xt)
        return sqrt_ab * xt - sqrt_1m_ab * v

    def eps_from_v(self, xt, t, v):
        sqrt_ab, sqrt_1m_ab = self._coeffs(t, xt)
        return sqrt_ab * v + sqrt_1m_ab * xt

    def v_from_x0_eps(self, x0, eps, t):
        sqrt_ab, sqrt_1m_ab = self._coeffs(t, x0)
        return sqrt_ab * eps - sqrt_1m_ab * x0

    def x0_from_prediction(self, xt, t, prediction):
        """x0 from a model output under this parameterization."""
        if self.parameterization == "epsilon":
            return self.x0_from_eps(xt, t, prediction)
        if self.parameterization == "x0":
            return prediction
        if self.parameterization == "v_param":
            return self.x0_from_v(xt, t, prediction)
        raise ValueError(f"unknown parameterization {self.parameterization!r}; valid: {', '.join(PARAMETERIZATIONS)}")

    # Upstream aliases, for trainers written against upstream (tests/test_upstream_names.py).
    predict_x0_from_eps = x0_from_eps
    predict_eps_from_x0 = eps_from_x0
    predict_x0_from_v = x0_from_v
    predict_eps_from_v = eps_from_v

    def predict_v_from_x0_eps(self, x0, eps, t):
        """Upstream alias of `v_from_x0_eps` (same argument order: x0, eps, t)."""
        return self.v_from_x0_eps(x0, eps, t)

    def get_schedule_values(self, t: torch.Tensor, device: str | torch.device | None = None):
        """Upstream alias of `schedule_values`: (sqrt(ab[t]), sqrt(1 - ab[t])), each [B] float32.

        Args:
            t: timesteps [B] (continuous in [0, 1] or indices).
            device: where the two [B] tensors are returned (default: t's device).
        """
        sqrt_ab, sqrt_1m_ab = self.schedule_values(t)
        if device is None:
            return sqrt_ab, sqrt_1m_ab
        return sqrt_ab.to(device), sqrt_1m_ab.to(device)

    def _draw_device(self, device, generator: torch.Generator | None) -> tuple[torch.device, torch.device]:
        """(device the draw is made on, device it is returned on)."""
        target = self.device if device is None else _checked_device(device)
        return (generator.device if generator is not None else target), target

    def sample_timesteps(
        self, batch_size: int, device: str | torch.device | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Upstream name: integer timestep indices [B] uniform in [0, T).

        Args:
            batch_size: B.
            device: where the indices are returned (default: this diffusion's `device`).
            generator: torch.Generator for the draw. None draws from torch's global RNG, as
                upstream's callers expect.
        """
        size = _checked_batch_size(batch_size)
        draw_on, target = self._draw_device(device, generator)
        return torch.randint(0, self.num_timesteps, (size,), generator=generator, device=draw_on).to(target)

    def sample_continuous_timesteps(
        self, batch_size: int, device: str | torch.device | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Upstream name: continuous timesteps [B], U[0, 1) float32.

        Args:
            batch_size: B.
            device: where the timesteps are returned (default: this diffusion's `device`).
            generator: torch.Generator for the draw. None draws from torch's global RNG, as
                upstream's callers expect.
        """
        size = _checked_batch_size(batch_size)
        draw_on, target = self._draw_device(device, generator)
        return torch.rand((size,), generator=generator, device=draw_on).to(target)
