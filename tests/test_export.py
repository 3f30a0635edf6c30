"""Export folds the normalisation into the weights: the loaded SAE on raw activations equals the trained SAE
on normalised ones."""

import json

import pytest
import torch
from safetensors.torch import load_file

from c2r import load_sae
from c2r.export import export_sae
from c2r.sae import BatchTopKSAE, TopKSAE


def trained_like(sae):
    """Random non-trivial biases, as after training."""
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    return sae


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_export_round_trip_on_raw_activations(tmp_path, architecture):
    torch.manual_seed(0)
    if architecture == "topk":
        sae = trained_like(TopKSAE(12, 48, k=5))
    else:
        sae = trained_like(BatchTopKSAE(12, 48, k=5, threshold_momentum=0.0))
        sae.encode(torch.randn(64, 12))  # sets the inference threshold
    sae.eval()
    scale = 0.37
    export_sae(sae, tmp_path, normalization_factor=scale, hook_name="blocks.5.hook_resid_post", model_name="m")

    loaded = load_sae(tmp_path)
    raw = torch.randn(20, 12) / scale
    with torch.no_grad():
        expected_acts = sae.encode(raw * scale)
        expected_recon = sae.decode(expected_acts) / scale
        assert torch.allclose(loaded.encode(raw), expected_acts, atol=1e-5)
        assert torch.allclose(loaded(raw), expected_recon, atol=1e-5)

    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["d_in"] == 12 and cfg["d_sae"] == 48
    assert cfg["hook_name"] == "blocks.5.hook_resid_post"
    tensors = load_file(tmp_path / "sae_weights.safetensors")
    assert tensors["W_enc"].shape == (12, 48) and tensors["W_dec"].shape == (48, 12)
    if architecture == "topk":
        assert cfg["architecture"] == "topk" and cfg["k"] == 5
    else:
        assert cfg["architecture"] == "jumprelu"
        assert torch.allclose(tensors["threshold"], sae.threshold.expand(48))


def test_loading_a_folder_without_an_export_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path)
