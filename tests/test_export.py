"""Export folds the normalisation into the weights: the loaded SAE on raw activations equals the trained SAE
on normalised ones."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from c2r import load_sae
from c2r.export import export_sae
from c2r.sae import BatchTopKSAE, GatedSAE, JumpReLUSAE, MatryoshkaBatchTopKSAE, ReLUSAE, TopKSAE


def trained_like(sae):
    """Random non-trivial biases, as after training."""
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    return sae


def build(architecture):
    """An SAE of ``architecture`` with non-trivial values in every tensor its inference form uses."""
    if architecture == "topk":
        return trained_like(TopKSAE(12, 48, k=5))
    if architecture in ("batchtopk", "matryoshka"):
        if architecture == "batchtopk":
            sae = trained_like(BatchTopKSAE(12, 48, k=5, threshold_momentum=0.0))
        else:
            sae = trained_like(MatryoshkaBatchTopKSAE(12, 48, k=5, group_sizes=[12, 36], threshold_momentum=0.0))
        sae.encode(torch.randn(64, 12))  # sets the inference threshold
        return sae
    if architecture == "relu":
        sae = trained_like(ReLUSAE(12, 48))
        with torch.no_grad():
            sae.W_dec.mul_(torch.rand(48, 1) * 3)  # floating decoder norms
        return sae
    if architecture == "jumprelu":
        sae = trained_like(JumpReLUSAE(12, 48))
        with torch.no_grad():
            sae.log_threshold.copy_(torch.empty(48).uniform_(-3, 0))
        return sae
    sae = trained_like(GatedSAE(12, 48))
    with torch.no_grad():
        sae.r_mag.normal_(0, 0.5)
        sae.b_mag.normal_(0, 0.3)
    return sae


# SAELens architecture name and the tensors it reads, per training architecture.
EXPORTED_AS = {
    "topk": ("topk", {"W_enc", "b_enc", "W_dec", "b_dec"}),
    "batchtopk": ("jumprelu", {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}),
    "matryoshka": ("jumprelu", {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}),
    "relu": ("standard", {"W_enc", "b_enc", "W_dec", "b_dec"}),
    "jumprelu": ("jumprelu", {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}),
    "gated": ("gated", {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"}),
}


# The class load_sae returns: the architecture's own, or for BatchTopK and Matryoshka that of their exported form.
LOADED_AS = {"topk": TopKSAE, "batchtopk": JumpReLUSAE, "matryoshka": JumpReLUSAE, "relu": ReLUSAE,
             "jumprelu": JumpReLUSAE, "gated": GatedSAE}


@pytest.mark.parametrize("architecture", list(EXPORTED_AS))
def test_export_round_trip_on_raw_activations(tmp_path, architecture):
    torch.manual_seed(0)
    sae = build(architecture).eval()
    scale = 0.37
    export_sae(sae, tmp_path, normalization_factor=scale, hook_name="blocks.5.hook_resid_post", model_name="m")

    loaded = load_sae(tmp_path)
    raw = torch.randn(200, 12) / scale
    with torch.no_grad():
        expected_acts = sae.encode(raw * scale)
        expected_recon = sae.decode(expected_acts) / scale
        assert (expected_acts != 0).any() and (expected_acts == 0).any()  # a sparse, non-trivial code
        assert torch.allclose(loaded.encode(raw), expected_acts, atol=1e-5)
        assert torch.allclose(loaded(raw), expected_recon, atol=1e-5)

    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["d_in"] == 12 and cfg["d_sae"] == 48
    assert cfg["hook_name"] == "blocks.5.hook_resid_post"
    assert cfg["c2r_training_architecture"] == architecture
    tensors = load_file(tmp_path / "sae_weights.safetensors")
    assert tensors["W_enc"].shape == (12, 48) and tensors["W_dec"].shape == (48, 12)
    name, expected_tensors = EXPORTED_AS[architecture]
    assert cfg["architecture"] == name and set(tensors) == expected_tensors
    assert type(loaded) is LOADED_AS[architecture] and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    # Only W_enc, W_dec and b_dec carry the normalisation; what acts on pre-activations is exported as trained.
    assert torch.allclose(tensors["W_dec"], sae.W_dec.detach() / scale)
    if architecture == "topk":
        assert cfg["k"] == 5
    if architecture in ("batchtopk", "matryoshka"):
        assert torch.allclose(tensors["threshold"], sae.threshold.expand(48))
    if architecture == "jumprelu":
        assert torch.allclose(tensors["threshold"], sae.log_threshold.detach().exp())
    if architecture == "gated":
        assert torch.equal(tensors["b_gate"], sae.b_enc.detach())
        assert torch.equal(tensors["r_mag"], sae.r_mag.detach()) and torch.equal(tensors["b_mag"], sae.b_mag.detach())


def test_a_batchtopk_sae_exported_before_any_training_batch_loads_as_relu(tmp_path):
    # Its threshold is still the "not estimated" -1: a JumpReLU with threshold <= 0 is a ReLU (log θ = -inf, not NaN).
    sae = trained_like(BatchTopKSAE(12, 48, k=5)).eval()
    export_sae(sae, tmp_path, normalization_factor=1.0)
    assert torch.equal(load_file(tmp_path / "sae_weights.safetensors")["threshold"], torch.full((48,), -1.0))
    loaded = load_sae(tmp_path)
    x = torch.randn(30, 12)
    with torch.no_grad():
        assert torch.allclose(loaded.encode(x), sae.pre_activations(x).relu(), atol=1e-6)


def test_an_unknown_exported_architecture_is_refused(tmp_path):
    sae = build("relu")
    export_sae(sae, tmp_path, normalization_factor=1.0)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "transcoder"}))
    with pytest.raises(ValueError, match="unsupported architecture 'transcoder'"):
        load_sae(tmp_path)


@pytest.mark.parametrize("damage", ["drop threshold", "wrong shape"])
def test_weights_that_do_not_fit_cfg_json_are_refused_naming_the_file(tmp_path, damage):
    export_sae(build("jumprelu"), tmp_path, normalization_factor=1.0)
    tensors = load_file(tmp_path / "sae_weights.safetensors")
    if damage == "drop threshold":
        del tensors["threshold"]
    else:
        tensors["W_enc"] = tensors["W_enc"][:, :10].contiguous()
    save_file(tensors, tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="sae_weights.safetensors does not hold the tensors of a 'jumprelu' SAE"):
        load_sae(tmp_path)


def test_loading_a_folder_without_an_export_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path)
