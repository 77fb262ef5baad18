"""The Coupled Mamba sentiment service."""

__version__ = "1.0.0"
"""The one version string: the package's (pyproject reads it), the API's (OpenAPI
``info.version``), ``cmamba --version`` and the server metadata."""
