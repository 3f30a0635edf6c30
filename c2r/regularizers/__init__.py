"""Penalties on (latent activations, decoder rows) added to the SAE loss."""

from .base import Regularizer
from .c2r import C2R, c2r_loss
from .ortho import Ortho, ortho_loss

__all__ = ["C2R", "Ortho", "Regularizer", "c2r_loss", "ortho_loss"]
