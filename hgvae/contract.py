"""The ONNX graph contract between training and serving (shared/design.md): names only, no dependencies."""

INPUT_NAME = "lattice"
# Optional second input: the nominal temperature (float32 [batch] or [1]). It is an overridable
# initializer with default NaN, so onnxruntime lists it under get_overridable_initializers(), not
# get_inputs(), and callers that send only "lattice" keep working. NaN or <= 0 means unknown: the
# anomaly score then uses the input's own energy per site as the temperature proxy.
TEMPERATURE_INPUT = "temperature"
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
