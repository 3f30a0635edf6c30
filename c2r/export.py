"""The inference form of a trained SAE: SAELens/SAEBench-compatible files and ``load_sae``.

Training works on normalised activations (E‖x‖² = 1); export folds the normalisation factor ``s`` into the
weights so the exported SAE works on raw activations: with ``x_n = s·x``,
``(x_n − b_dec) W_enc = (x − b_dec/s)(s·W_enc)`` and ``x̂ = (f W_dec + b_dec)/s``.

So the pre-activations, and with them the codes ``f``, are the same before and after folding: only ``W_enc``
(×s), ``W_dec`` and ``b_dec`` (÷s) change, and every tensor that acts on pre-activations stays as trained —
``b_enc``, JumpReLU's ``threshold``, Gated's ``b_gate``, ``b_mag`` and ``r_mag`` (the magnitude path
``(x − b_dec/s)(s·W_enc ⊙ exp(r_mag)) + b_mag`` equals the trained one).

Inference forms (SAELens names): ``standard`` (ReLU), ``topk`` (``k`` in cfg.json), ``jumprelu`` (``threshold``;
also BatchTopK and Matryoshka, with one shared threshold) and ``gated`` (``b_gate``, ``r_mag``, ``b_mag``, no
``b_enc``). Each architecture's class writes its form (``export_state``) and reads it back
(``from_export_state``): ``load_sae`` returns ``ReLUSAE``, ``TopKSAE``, ``JumpReLUSAE`` or ``GatedSAE``.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from c2r.errors import UserError
from c2r.jsonfile import write_json
from c2r.sae import GatedSAE, JumpReLUSAE, ReLUSAE, SparseAutoencoder, TopKSAE

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"


def export_sae(
    sae: SparseAutoencoder,
    directory: str | Path,
    *,
    normalization_factor: float,
    hook_name: str = "",
    model_name: str = "",
    extra_cfg: dict | None = None,
) -> Path:
    """Write ``sae_weights.safetensors`` + ``cfg.json`` (SAELens format) for raw activations."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    architecture, tensors, extra_fields = sae.export_state()
    s = float(normalization_factor)
    scale = {"W_enc": s, "W_dec": 1 / s, "b_dec": 1 / s}  # everything else acts on the unchanged pre-activations
    tensors = {name: t.detach().float() * scale.get(name, 1.0) for name, t in tensors.items()}
    save_file({name: t.contiguous().cpu() for name, t in tensors.items()}, directory / WEIGHTS_FILE)
    cfg = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.dict_size,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "hook_name": hook_name,
        "model_name": model_name,
        "c2r_training_architecture": sae.architecture,
        "c2r_folded_normalization_factor": s,
        **extra_fields,
        **(extra_cfg or {}),
    }
    write_json(directory / CONFIG_FILE, cfg)
    return directory


# The class ``load_sae`` rebuilds for each SAELens architecture name in cfg.json. BatchTopK and Matryoshka SAEs are
# exported as JumpReLU with one shared threshold (SAELens's convention), so they come back as ``JumpReLUSAE``.
ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    "standard": ReLUSAE,
    "topk": TopKSAE,
    "jumprelu": JumpReLUSAE,
    "gated": GatedSAE,
}


def sae_from_export(cfg: dict, tensors: dict[str, Tensor]) -> SparseAutoencoder:
    """The SAE of an exported ``cfg`` and its tensors, as its architecture's class in eval mode without
    gradients; ``cfg`` stays readable as ``sae.cfg`` (hook, model, training architecture)."""
    if cfg["architecture"] not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {cfg['architecture']!r}; expected one of {', '.join(ARCHITECTURES)}"
        )
    sae = ARCHITECTURES[cfg["architecture"]].from_export_state(cfg, tensors)
    sae.cfg = cfg
    return sae.eval().requires_grad_(False)


class ExportError(UserError, ValueError):
    """An exported SAE folder that cannot be loaded; the message names the file and the fix."""


def load_sae(path: str | Path) -> SparseAutoencoder:
    """Load an exported SAE (a folder with ``cfg.json`` and ``sae_weights.safetensors``) for raw activations:
    ``encode(x) -> f``, ``decode(f) -> x̂``, ``forward(x) -> x̂``, ``W_dec [F, d]``. A damaged or incomplete folder
    raises :class:`ExportError` naming the file, before any work is done with it."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not an exported SAE: expected {CONFIG_FILE} and {WEIGHTS_FILE} in it "
            "(a training run writes them to <run dir>/sae)"
        )
    fix = "re-export it (training writes <run dir>/sae) or restore the file"
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{path / CONFIG_FILE} is not valid JSON ({error}): {fix}") from None
    missing = [key for key in required_cfg_keys(cfg) if key not in cfg]
    if missing:
        raise ExportError(f"{path / CONFIG_FILE} lacks the key(s) {', '.join(missing)}: {fix}")
    try:
        tensors = load_file(path / WEIGHTS_FILE)
    except (SafetensorError, OSError) as error:
        raise ExportError(f"{path / WEIGHTS_FILE} cannot be read ({error}): {fix}") from None
    try:
        return sae_from_export(cfg, tensors)
    except (KeyError, RuntimeError) as error:  # a tensor missing, or of the wrong shape for cfg.json's sizes
        raise ExportError(
            f"{path / WEIGHTS_FILE} does not hold the tensors of a {cfg['architecture']!r} SAE of cfg.json's sizes "
            f"({type(error).__name__}: {error}): {fix}"
        ) from None


def required_cfg_keys(cfg: dict) -> list[str]:
    """The ``cfg.json`` keys inference needs: the architecture, the sizes, and ``k`` for TopK."""
    return ["architecture", "d_in", "d_sae", *(["k"] if cfg.get("architecture") == "topk" else [])]
