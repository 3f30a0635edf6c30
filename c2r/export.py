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
``b_enc``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from c2r.jsonfile import write_json
from c2r.sae import SparseAutoencoder

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


class InferenceSAE(nn.Module):
    """A trained SAE on raw activations: ``encode(x) -> f``, ``decode(f) -> x̂``, ``forward(x) -> x̂``."""

    ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")

    def __init__(self, cfg: dict, tensors: dict[str, Tensor]) -> None:
        super().__init__()
        if cfg["architecture"] not in self.ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {cfg['architecture']!r}; expected one of {', '.join(self.ARCHITECTURES)}"
            )
        self.cfg = cfg
        for name, tensor in tensors.items():
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    def encode(self, x: Tensor) -> Tensor:
        centred = x - self.b_dec
        architecture = self.cfg["architecture"]
        if architecture == "gated":
            shared = centred @ self.W_enc
            magnitude = (shared * self.r_mag.exp() + self.b_mag).relu()
            return magnitude * (shared + self.b_gate > 0)
        pre_acts = centred @ self.W_enc + self.b_enc
        if architecture == "topk":
            values, indices = pre_acts.topk(self.cfg["k"], dim=-1)
            return torch.zeros_like(pre_acts).scatter(-1, indices, values.relu())
        if architecture == "jumprelu":
            return pre_acts.relu() * (pre_acts > self.threshold)
        return pre_acts.relu()

    def decode(self, acts: Tensor) -> Tensor:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def load_sae(path: str | Path) -> InferenceSAE:
    """Load an exported SAE (a folder with ``cfg.json`` and ``sae_weights.safetensors``); a damaged or incomplete
    folder raises ``ValueError`` naming the file, before any work is done with it."""
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
        raise ValueError(f"{path / CONFIG_FILE} is not valid JSON ({error}): {fix}") from None
    missing = [key for key in required_cfg_keys(cfg) if key not in cfg]
    if missing:
        raise ValueError(f"{path / CONFIG_FILE} lacks the key(s) {', '.join(missing)}: {fix}")
    try:
        tensors = load_file(path / WEIGHTS_FILE)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path / WEIGHTS_FILE} cannot be read ({error}): {fix}") from None
    return InferenceSAE(cfg, tensors)


def required_cfg_keys(cfg: dict) -> list[str]:
    """The ``cfg.json`` keys inference needs: the architecture, the sizes, and ``k`` for TopK."""
    return ["architecture", "d_in", "d_sae", *(["k"] if cfg.get("architecture") == "topk" else [])]
