"""HG-VAE and plain VAE for XY configurations (Cristoforetti et al., arXiv:1705.09524).

Input angles θ [B, L, L] enter as the two channels (cos θ, sin θ), so the network never sees the 2π
cut. Every convolution is circular (the lattice is a torus). The latent is Gaussian; the decoder gives
per site a mean angle θ̂ = atan2(b, a) and a spread σ ∈ [σ_min, σ_max] of a wrapped Gaussian. The
plain VAE is the same network trained with λ = 0 (no energy term); only the loss differs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from training import physics

TWO_PI = 2.0 * math.pi
KINDS = ("hgvae", "vae")


LATENTS = ("spatial", "global")
GLOBAL_LATENT_DIM = 64


def default_latent_dim(lattice_size: int, latent: str = "spatial") -> int:
    """2 channels on the (L/2)² grid for a spatial latent (128 at L = 16, 512 at L = 32); 64 for a global one."""
    return 2 * (lattice_size // 2) ** 2 if latent == "spatial" else GLOBAL_LATENT_DIM


@dataclass(frozen=True)
class ModelConfig:
    lattice_size: int = 16
    latent_dim: int = 0  # 0: default_latent_dim(lattice_size, latent)
    width: int = 24
    sigma_min: float = 0.02  # floor against σ collapse (NLL → −∞ on a perfect fit)
    # Cap below "flat": near a uniform density the likelihood has no gradient in θ̂ and the latent
    # collapses (seen with σ_max = 2.5). exp(−σ_max²) ≈ 0.08 still covers e ≈ −0.16 (T ≫ 2).
    sigma_max: float = 1.6
    kind: str = "hgvae"
    # "spatial": the latent is a c×(L/2)² grid (latent_dim = c·(L/2)²), flattened channel-major in
    # latent_mean, so the decoder can place local structure such as vortices (a global latent gives a
    # smooth θ̂ without vortices: sampled reconstructions then carry 9-67% of the input's vortex
    # density); "global": one vector through dense layers (the default until s2).
    latent: str = "spatial"

    @property
    def latent_channels(self) -> int:
        return self.latent_dim // (self.lattice_size // 2) ** 2

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.lattice_size < 8 or self.lattice_size % 4:
            raise ValueError(f"lattice size must be a multiple of 4 and ≥ 8, got {self.lattice_size}")
        if self.latent not in LATENTS:
            raise ValueError(f"latent must be one of {LATENTS}, got {self.latent!r}")
        if self.latent_dim == 0:
            object.__setattr__(self, "latent_dim", default_latent_dim(self.lattice_size, self.latent))
        if self.latent_dim < 1 or self.width < 4:
            raise ValueError(f"latent_dim must be ≥ 1 and width ≥ 4, got {self.latent_dim} and {self.width}")
        cells = (self.lattice_size // 2) ** 2
        if self.latent == "spatial" and self.latent_dim % cells:
            raise ValueError(
                f"latent_dim must be a multiple of (L/2)² = {cells} for the spatial latent at L = {self.lattice_size} "
                f"(channels on the {self.lattice_size // 2}×{self.lattice_size // 2} grid: {cells}, {2 * cells}, "
                f"{3 * cells}, ...; default {default_latent_dim(self.lattice_size)}), got {self.latent_dim}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def _conv(c_in: int, c_out: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    # padding k//2 - (stride-1)//... : k=3,s=1 keeps L; k=4,s=2,p=1 halves an even L.
    pad = 1
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, padding_mode="circular")


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w, L = cfg.width, cfg.lattice_size
        self.body = nn.Sequential(
            _conv(2, w), nn.GELU(),
            _conv(w, w, 4, 2), nn.GELU(),  # L/2
            _conv(w, 2 * w), nn.GELU(),
            _conv(2 * w, 2 * w, 4, 2), nn.GELU(),  # L/4
            nn.Flatten(),
        )  # fmt: skip
        feat = 2 * w * (L // 4) ** 2
        # Global features (energy, magnetisation) help the latent carry the temperature.
        self.head = nn.Sequential(nn.Linear(feat + 4, 4 * w), nn.GELU(), nn.Linear(4 * w, 2 * cfg.latent_dim))
        with torch.no_grad():
            self.head[-1].bias[cfg.latent_dim :].fill_(-5.0)

    def forward(self, cs: torch.Tensor, glob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.head(torch.cat([self.body(cs), glob], dim=1))
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 6.0)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w, L = cfg.width, cfg.lattice_size
        self.cfg = cfg
        self.q = L // 4
        self.fc = nn.Sequential(nn.Linear(cfg.latent_dim, 4 * w), nn.GELU(), nn.Linear(4 * w, 2 * w * self.q**2))
        self.body = nn.Sequential(
            nn.GELU(),
            nn.Upsample(scale_factor=2, mode="nearest"), _conv(2 * w, w), nn.GELU(),  # L/2
            nn.Upsample(scale_factor=2, mode="nearest"), _conv(w, w), nn.GELU(),  # L
        )  # fmt: skip
        self.heads = Heads(cfg, w)

    def trunk(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.fc(z).reshape(z.shape[0], -1, self.q, self.q))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.trunk(z))


class Heads(nn.Module):
    """Per-site outputs from the decoder trunk's features: θ̂ = atan2(b, a) and σ ∈ [σ_min, σ_max].

    σ has its own small head so that the energy term can train it on detached trunk features
    (`XYVAE.decode_split`): the physics then sets the spread without reshaping the features that
    carry the mean angles (and the vortices in them).
    """

    def __init__(self, cfg: ModelConfig, w: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.theta = _conv(w, 2)
        self.sigma = nn.Sequential(_conv(w, w), nn.GELU(), _conv(w, 1))
        # Start with moderate spreads: a σ near σ_max flattens the likelihood in θ̂ (no gradient) and
        # lets the latent collapse before the decoder has learned anything.
        with torch.no_grad():
            self.sigma[-1].bias.fill_(0.0)

    def angle(self, h: torch.Tensor) -> torch.Tensor:
        ab = self.theta(h)
        return torch.remainder(torch.atan2(ab[:, 1], ab[:, 0]), TWO_PI)

    def spread(self, h: torch.Tensor) -> torch.Tensor:
        span = self.cfg.sigma_max - self.cfg.sigma_min
        return self.cfg.sigma_min + span * torch.sigmoid(self.sigma(h)[:, 0])

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.angle(h), self.spread(h)


def global_features(theta: torch.Tensor) -> torch.Tensor:
    """[B, 4]: energy per site, |m|, and the mean x/y bond cosines (rotation-invariant summaries)."""
    dx, dy = physics.bond_differences(theta)
    cx, cy = torch.cos(dx).mean(dim=(-2, -1)), torch.cos(dy).mean(dim=(-2, -1))
    return torch.stack([-(cx + cy), physics.magnetization(theta), cx, cy], dim=1)


class SpatialEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w, c = cfg.width, cfg.latent_channels
        self.body = nn.Sequential(
            _conv(2, w), nn.GELU(),
            _conv(w, w), nn.GELU(),
            _conv(w, 2 * w, 4, 2), nn.GELU(),  # L/2
            _conv(2 * w, 2 * w), nn.GELU(),
        )  # fmt: skip
        self.glob = nn.Linear(4, 2 * w)
        self.head = nn.Conv2d(2 * w, 2 * c, 1)
        # Start with a narrow posterior: with unit noise on a small μ the decoder first learns to
        # ignore z and the latent collapses (observed); the KL term widens it later as needed.
        with torch.no_grad():
            self.head.bias[c:].fill_(-5.0)

    def forward(self, cs: torch.Tensor, glob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(cs) + self.glob(glob)[:, :, None, None]
        mu, logvar = self.head(h).chunk(2, dim=1)
        return mu.flatten(1), logvar.flatten(1).clamp(-12.0, 6.0)


class SpatialDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w, c = cfg.width, cfg.latent_channels
        self.cfg = cfg
        self.c, self.h = c, cfg.lattice_size // 2
        self.body = nn.Sequential(
            _conv(c, 2 * w), nn.GELU(),
            _conv(2 * w, 2 * w), nn.GELU(),
            nn.Upsample(scale_factor=2, mode="nearest"), _conv(2 * w, w), nn.GELU(),  # L
            _conv(w, w), nn.GELU(),
        )  # fmt: skip
        self.heads = Heads(cfg, w)

    def trunk(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z.reshape(z.shape[0], self.c, self.h, self.h))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.trunk(z))


class XYVAE(nn.Module):
    """Encoder + decoder; `forward` returns (μ_z, log σ_z², θ̂, σ) using z = μ_z (deterministic)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        spatial = cfg.latent == "spatial"
        self.encoder = SpatialEncoder(cfg) if spatial else Encoder(cfg)
        self.decoder = SpatialDecoder(cfg) if spatial else Decoder(cfg)

    def encode(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = torch.remainder(theta, TWO_PI)
        cs = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
        return self.encoder(cs, global_features(theta))

    def latent(
        self, theta: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(μ_z, log σ_z², z) with z = μ_z, or a reparameterised draw when `sample`."""
        mu, logvar = self.encode(theta)
        z = mu
        if sample:
            eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
            z = mu + torch.exp(0.5 * logvar) * eps
        return mu, logvar, z

    def forward(
        self, theta: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar, z = self.latent(theta, sample, generator)
        theta_hat, sigma = self.decoder(z)
        return mu, logvar, theta_hat, sigma


# ---------------------------------------------------------------------------------------------- loss

WRAPS = torch.arange(-3, 4, dtype=torch.float32) * TWO_PI  # 7 windings: exact to ~1e-10 for σ ≤ 2.5


def wrapped_normal_nll(x: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """−log p(x) per site for a wrapped Gaussian WN(mean, σ) on the circle; x, mean, σ broadcast."""
    d = physics.wrap_angle(x - mean).unsqueeze(-1) + WRAPS.to(x.dtype).to(x.device)
    s = sigma.unsqueeze(-1)
    log_terms = -0.5 * (d / s).square()
    return -torch.logsumexp(log_terms, dim=-1) + torch.log(sigma) + 0.5 * math.log(TWO_PI)


def sample_reconstruction(
    theta_hat: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    eps = torch.randn(theta_hat.shape, generator=generator, dtype=theta_hat.dtype, device=theta_hat.device)
    return torch.remainder(theta_hat + sigma * eps, TWO_PI)


def sampled_vortex_surrogate(
    theta_hat: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vortex density of a sampled reconstruction θ̂ + σ·ε and a surrogate for its gradient in σ.

    The vortex count of a sample is piecewise constant in (θ̂, σ), so it has no pathwise gradient. The
    score-function identity ∂E[V]/∂σ_i = E[V · ∂log p(ε_i)/∂σ_i] has one, and it is local: only the four
    plaquettes around site i depend on ε_i, so each site is credited with those alone, against the same
    count in another independent draw (leave-one-out baseline, two draws). A third draw gives the
    returned density, so that a loss coefficient built from it is independent of the surrogate (the
    same draws in both would also penalise the variance of the count, i.e. push towards fewer
    vortices). Returns (V̂ [B], detached; S [B], whose gradient in σ estimates ∇_σ E[V] without bias).
    θ̂ gets no gradient from it (like the energy term, it shapes the spread only).
    """
    th, sg = theta_hat.detach(), sigma
    eps = torch.randn((3, *th.shape), generator=generator, dtype=th.dtype, device=th.device)
    with torch.no_grad():
        v = physics.vortex_map(th + sg.detach() * eps).abs()  # [3, B, L, L], plaquette (y, x) at corner (y, x)
        density = v[2].mean(dim=(-2, -1))
        v = v[:2]
        touching = v + v.roll(1, -1) + v.roll(1, -2) + v.roll((1, 1), (-2, -1))  # the 4 plaquettes of each site
        credit = touching - touching.flip(0)  # against the other draw
    # log N(s | θ̂, σ) at the fixed sample s = θ̂ + σ₀ε, as a function of σ: −ε²σ₀²/(2σ²) − log σ
    e2 = eps[:2]
    s2 = (sg.detach() * e2).square()
    logp = -0.5 * s2 / sg.square() - torch.log(sg)
    n_plaq = th.shape[-1] * th.shape[-2]
    surrogate = 0.5 * (credit * logp).sum(dim=(0, -2, -1)) / n_plaq
    return density, surrogate


@dataclass
class LossTerms:
    total: torch.Tensor
    nll: torch.Tensor  # mean per site
    kl: torch.Tensor  # per configuration (sum over latent dims)
    energy: torch.Tensor  # mean (Δe)²
    abs_de: torch.Tensor  # mean |Δe| (monitoring)
    vortex: torch.Tensor = torch.tensor(0.0)  # mean ((v_sampled − v_input)/VORTEX_SCALE)² (monitoring)


VORTEX_SCALE = 0.02  # vortex density per plaquette at T ≈ 1 (L = 16-32): the term is ~1 when off by that


def vae_loss(
    model: XYVAE,
    theta: torch.Tensor,
    beta: float,
    lam: float,
    generator: torch.Generator | None = None,
    detach_theta: bool = True,
    relative: bool = True,
    vortex_weight: float = 0.0,
) -> LossTerms:
    """Per-site NLL + β·KL/N + λ·((e_recon − e_input)/|e_input|)² + λ_v·((v̂ − v)/0.02)², batch means.

    KL is divided by the number of sites so that β and λ mean the same thing at every L. v̂ is the
    vortex density of sampled reconstructions (θ̂ + σ·ε), v the input's; its gradient reaches σ only,
    through a score-function surrogate (`sampled_vortex_surrogate`).
    """
    mu, logvar, z = model.latent(theta, sample=True, generator=generator)
    h = model.decoder.trunk(z)
    theta_hat, sigma = model.decoder.heads(h)
    n_sites = theta.shape[-1] * theta.shape[-2]
    nll = wrapped_normal_nll(theta, theta_hat, sigma).mean()
    kl = (0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(dim=1)).mean()
    # The energy term acts on the spread only (θ̂ detached): the likelihood shapes the mean angles, the
    # physics shapes how much disorder the reconstruction carries. Letting it move θ̂ too makes the
    # decoder buy energy with rough means and small σ, which costs likelihood and vortex statistics.
    # (Training σ from detached trunk features instead, so that the energy term cannot touch the shared
    # features at all, collapsed the latent: the σ head alone could not find the temperature.)
    th_e = theta_hat.detach() if detach_theta else theta_hat
    e_in = physics.energy_per_site(theta)
    de = physics.expected_energy_per_site(th_e, sigma) - e_in
    # Relative by default: the acceptance is |Δe|/|e| at every T, and |e| falls from 2 to ~0.5 with T,
    # so an absolute square would neglect the hot configurations.
    e_term = (de / e_in.abs().clamp_min(0.1)).square().mean() if relative else de.square().mean()
    total = nll + beta * kl / n_sites + lam * e_term
    v_term = torch.zeros(())
    if vortex_weight > 0:
        v_hat, surrogate = sampled_vortex_surrogate(theta_hat, sigma, generator)
        gap = (v_hat - physics.vortex_density(theta)) / VORTEX_SCALE
        v_term = gap.square().mean()
        # d/dσ of mean(gap²) = mean(2·gap·∂v̂/∂σ / scale); the surrogate carries ∂v̂/∂σ. Its value is
        # meaningless, so it enters as (g − g.detach()): the total reads as NLL + β·KL + λ·E + λ_v·V.
        g = (2.0 * gap * surrogate / VORTEX_SCALE).mean()
        total = total + vortex_weight * (v_term + g - g.detach())
    return LossTerms(total, nll, kl, e_term, de.abs().mean(), v_term)
