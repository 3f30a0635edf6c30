"""c2r: sparse autoencoders with Cross-sample Consistency Regularization."""

__version__ = "0.1.0"

from c2r.export import load_sae

__all__ = ["__version__", "load_sae"]
