"""SAE architectures; select one with ``model=<name>``."""

from c2r.sae.base import SAEOutput, SparseAutoencoder
from c2r.sae.topk import BatchTopKSAE, TopKSAE

__all__ = ["BatchTopKSAE", "SAEOutput", "SparseAutoencoder", "TopKSAE"]
