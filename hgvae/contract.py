"""The ONNX graph contract between training and serving (shared/design.md): names only, no dependencies."""

INPUT_NAME = "lattice"
OUTPUT_NAMES = (
    "latent_mean",
    "latent_logvar",
    "theta",
    "sigma",
    "energy",
    "energy_recon",
    "energy_discrepancy",
    "nll",
    "vortex_density",
    "anomaly_score",
    "anomaly_map",
)
