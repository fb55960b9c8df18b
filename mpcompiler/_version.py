"""The package version: pyproject.toml reads it from here (setuptools dynamic), mpcompiler exports it."""

__version__ = "0.1.0"
