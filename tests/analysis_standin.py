"""A small, real ONNX model with the hgvae output contract, for testing `hgvae analyze` without training.

It is not a VAE: the "encoder" is the magnetization (times a scale), the "decoder" a local average of
the spins (θ = its angle, σ from its resultant length, the wrapped-Gaussian moment match). Its physics
head is training.physics exported to ONNX, exactly like the product's, so every number the analysis
derives from it can be checked against a direct computation.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx
import torch

from hgvae.contract import OUTPUT_NAMES
from training import physics


class StandIn(torch.nn.Module):
    def __init__(self, smooth: int = 1) -> None:
        super().__init__()
        self.smooth = smooth

    def forward(self, lattice: torch.Tensor):
        x = torch.remainder(lattice, physics.TWO_PI)
        c, s = torch.cos(x), torch.sin(x)
        mc, ms = c, s
        for _ in range(self.smooth):  # 5-point average of the unit vectors
            mc = (
                mc + torch.roll(mc, 1, -1) + torch.roll(mc, -1, -1) + torch.roll(mc, 1, -2) + torch.roll(mc, -1, -2)
            ) / 5
            ms = (
                ms + torch.roll(ms, 1, -1) + torch.roll(ms, -1, -1) + torch.roll(ms, 1, -2) + torch.roll(ms, -1, -2)
            ) / 5
        theta = torch.atan2(ms, mc)
        resultant = torch.sqrt(mc * mc + ms * ms).clamp(1e-3, 1 - 1e-6)
        sigma = torch.sqrt(-2 * torch.log(resultant))
        m = torch.stack([c.mean(dim=(-2, -1)), s.mean(dim=(-2, -1))], dim=1)
        latent_mean = 3.0 * m
        latent_logvar = torch.log(1.0 - m.square().sum(dim=1, keepdim=True) + 0.01).expand(-1, 2)
        energy = physics.energy_per_site(x)
        energy_recon = physics.expected_energy_per_site(theta, sigma)
        z = physics.wrap_angle(x - theta) / sigma
        site_nll = 0.5 * z * z + torch.log(sigma) + 0.5 * math.log(2 * math.pi)
        nll = site_nll.mean(dim=(-2, -1))
        return (
            latent_mean,
            latent_logvar,
            theta,
            sigma,
            energy,
            energy_recon,
            energy_recon - energy,
            nll,
            physics.vortex_density(x),
            nll,
            site_nll,
        )



OUTPUTS = list(OUTPUT_NAMES)


def export_standin(path: str | Path, size: int, kind: str = "hgvae", run_id: str = "", smooth: int = 1) -> Path:
    path = Path(path)
    example = torch.rand(2, size, size) * physics.TWO_PI
    torch.onnx.export(
        StandIn(smooth),
        (example,),
        str(path),
        input_names=["lattice"],
        output_names=OUTPUTS,
        dynamic_axes={"lattice": {0: "batch"}, **{n: {0: "batch"} for n in OUTPUTS}},
        opset_version=17,
        dynamo=False,
    )
    model = onnx.load(str(path))
    meta = {
        "hgvae.lattice_size": str(size),
        "hgvae.model_kind": kind,
        "hgvae.latent_dim": "2",
        "hgvae.run_id": run_id,
        "hgvae.calibration": "{}",
        "hgvae.version": "test",
    }
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))
    return path
