"""SAE architectures; select one with ``model=<name>``."""

from c2r.sae.base import SAEOutput, SparseAutoencoder, SparseCodes
from c2r.sae.gated import GatedSAE
from c2r.sae.jumprelu import JumpReLUSAE
from c2r.sae.matryoshka import MatryoshkaBatchTopKSAE
from c2r.sae.relu import ReLUSAE
from c2r.sae.topk import BatchTopKSAE, KSparseAutoencoder, TopKSAE

__all__ = [
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "KSparseAutoencoder",
    "MatryoshkaBatchTopKSAE",
    "ReLUSAE",
    "SAEOutput",
    "SparseCodes",
    "SparseAutoencoder",
    "TopKSAE",
]
