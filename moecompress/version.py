"""The package version (a leaf module: `pipeline` records it without importing the package root)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
