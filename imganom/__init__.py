"""imganom: visual anomaly inspection with a convolutional VAE."""

from __future__ import annotations

from imganom.utils.version import __version__

__all__ = ["__version__", "Inspector", "Result", "Region"]


def __getattr__(name: str):
    # Lazy: `import imganom` stays cheap and importable without optional dependencies.
    if name in ("Inspector", "Result"):
        from imganom.inference import inspector as inspector

        return getattr(inspector, name)
    if name == "Region":
        from imganom.ops.postprocess import Region

        return Region
    raise AttributeError(f"module 'imganom' has no attribute {name!r}")
