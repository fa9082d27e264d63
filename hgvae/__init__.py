"""hgvae: physics-guided VAE for the 2D XY model, from Monte Carlo to a gRPC scoring service."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hgvae")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0"
