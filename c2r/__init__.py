"""c2r: sparse autoencoders with Cross-sample Consistency Regularization."""

__version__ = "0.1.0"

__all__ = ["__version__", "load_sae"]


def __getattr__(name: str):
    # ``c2r.load_sae`` is imported on first use: importing any c2r module runs this file, and the CLIs' --help
    # and ``c2r.data.shards`` should not wait for torch.
    if name == "load_sae":
        from c2r.export import load_sae

        return load_sae
    raise AttributeError(f"module 'c2r' has no attribute {name!r}")
