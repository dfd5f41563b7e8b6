"""medhybrid: anomaly detection in medical images with ResNet-Transformer hybrids."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medhybrid")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
