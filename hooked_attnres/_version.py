"""The package version, importable from anywhere without importing the package root."""

__version__ = "0.1.0"
