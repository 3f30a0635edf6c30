"""The CE-loss and KL scores (c2r/evaluation/ce_loss.py): the SAE spliced into the LM.

On the tiny random-weight Llama (byte-level tokenizer: one token per byte) harvested from a few sentences; the
reference is a plain Hugging Face forward pass with a PyTorch hook, and log-softmax per position in a loop.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from c2r.data import HarvestedShards, Manifest, SyntheticShards
from c2r.data.lm import load_model, tiny_random_llama
from c2r.evaluation import run_evaluation, selected_evals
from c2r.evaluation.ce_loss import heldout_contexts

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPECIAL_IDS = [0, 1, 2, 3]  # <unk> <s> </s> <pad> of the tiny model's tokenizer
CONTEXTS = 6
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse autoencoders decompose activations into interpretable features.",
    "Every context starts with the beginning-of-sequence token.",
    "Rows are shuffled within each shard with a seeded permutation.",
]


class StandIn:
    """An SAE-like object: ``decode(encode(x)) = x @ W_enc @ W_dec`` (no non-linearity)."""

    def __init__(self, W_enc: torch.Tensor, W_dec: torch.Tensor):
        self.W_enc, self.W_dec = W_enc, W_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec


class Identity(StandIn):
    def __init__(self, d: int = 32):
        super().__init__(torch.eye(d), torch.eye(d))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts


def harvest(tmp: Path, **overrides) -> HarvestedShards:
    docs = tmp / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": " ".join(SENTENCES[i % 4 :] + SENTENCES[: i % 4])}) + "\n"
                            for i in range(8)))
    settings = dict(
        model="tiny-random-llama", hook="blocks.0.hook_resid_post", text={"dataset": "jsonl", "data_files": str(docs)},
        context_length=32, tokens=256, rows_per_shard=128, val_shards=1, batch_size=4, dtype="float32",
        context_start="bos", doc_separator="eos", outlier_norm=None, shuffle_buffer=8, progress=False,
        cache_dir=tmp / "cache",
    )
    source = HarvestedShards(**{**settings, **overrides})
    source.ensure()
    return source


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> HarvestedShards:
    return harvest(tmp_path_factory.mktemp("lm"))


def ce_eval(sae, source: HarvestedShards, out: Path | None = None, **settings) -> dict:
    settings = {"contexts": CONTEXTS, "batch_size": 4, **settings}
    return run_evaluation(sae, source.shard_dir, out, evals=["ce_loss"], tokens=64, source=source,
                          settings={"ce_loss": settings}, plots=False)


def reference(sae, contexts: list[np.ndarray], keep: list[torch.Tensor]) -> dict:
    """CE and KL by hand: the Hugging Face model, block 0's output replaced by a PyTorch forward hook at the
    positions ``keep``, each predicted position's log-softmax in a Python loop."""
    model = tiny_random_llama()[0]
    totals = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0, "positions": 0}
    for context, mask in zip(contexts, keep):
        tokens = torch.from_numpy(context)[None]
        logits = {}
        splices = (("clean", None), ("sae", lambda x: sae.decode(sae.encode(x))), ("zero", torch.zeros_like))
        for name, replace in splices:

            def hook(module, args, out, replace=replace):
                hidden = (out[0] if isinstance(out, tuple) else out).clone()
                hidden[0, mask] = replace(hidden[0, mask])
                return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

            handle = model.model.layers[0].register_forward_hook(hook) if replace is not None else None
            with torch.no_grad():
                logits[name] = model(tokens).logits[0].double()
            if handle is not None:
                handle.remove()
        for p in range(len(context) - 1):
            if not mask[p]:
                continue
            target = int(context[p + 1])
            clean = torch.log_softmax(logits["clean"][p], dim=-1)
            totals["ce_clean"] -= float(clean[target])
            totals["positions"] += 1
            for name in ("sae", "zero"):
                patched = torch.log_softmax(logits[name][p], dim=-1)
                totals[f"ce_{name}"] -= float(patched[target])
                totals[f"kl_{name}"] += float((clean.exp() * (clean - patched)).sum())
    n = totals["positions"]
    return {key: value / n if key != "positions" else n for key, value in totals.items()}


def next_contexts(source: HarvestedShards, count: int) -> list[np.ndarray]:
    """The ``count`` contexts of the harvest's stream right after the ones it consumed."""
    consumed = Manifest.load(source.shard_dir).source["contexts"]
    stream = list(source.contexts(load_model("tiny-random-llama", device="cpu")))
    return stream[consumed : consumed + count]


def test_identity_sae_scores_one_and_zero_sae_scores_zero(source, tmp_path):
    result = ce_eval(Identity(), source, tmp_path)
    ce = result["ce_loss"]
    assert ce["ce_sae"] == ce["ce_clean"] and ce["kl_sae"] == 0.0 and ce["ce_delta"] == 0.0
    assert ce["ce_loss_score"] == 1.0 and ce["kl_score"] == 1.0
    assert ce["ce_zero"] != ce["ce_clean"] and ce["kl_zero"] > 0  # a random model: zeros need not be worse
    assert ce["settings"]["contexts"] == CONTEXTS and ce["settings"]["after_harvest"] == CONTEXTS
    assert ce["settings"]["from_validation_shards"] == 0 and not result["notes"]
    report = (tmp_path / "eval.md").read_text()
    assert "## CE-loss and KL scores (SAE spliced into the LM)" in report and "| CE-loss score | 1 |" in report

    zero = ce_eval(StandIn(torch.zeros(32, 8), torch.zeros(8, 32)), source)["ce_loss"]
    assert zero["ce_sae"] == zero["ce_zero"] and zero["kl_sae"] == zero["kl_zero"]
    assert zero["ce_loss_score"] == 0.0 and zero["kl_score"] == 0.0


def test_matches_a_plain_forward_pass_and_skips_special_tokens(source):
    torch.manual_seed(0)
    sae = StandIn(torch.randn(32, 48) / 6, torch.randn(48, 32) / 6)
    ce = ce_eval(sae, source)["ce_loss"]
    contexts = next_contexts(source, CONTEXTS)
    keep = [~torch.isin(torch.from_numpy(c), torch.tensor(SPECIAL_IDS)) for c in contexts]
    expected = reference(sae, contexts, keep)
    for key in ("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero"):
        assert ce[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert ce["ce_loss_score"] == pytest.approx(
        (expected["ce_zero"] - expected["ce_sae"]) / (expected["ce_zero"] - expected["ce_clean"]), rel=1e-3
    )
    # every context starts with <s> and documents are separated by </s>: those positions are neither spliced
    # nor counted (nor is the last position, which predicts nothing)
    specials = sum(int((~k).sum()) for k in keep)
    assert specials > CONTEXTS
    assert ce["positions"] == expected["positions"] == sum(int(k[:-1].sum()) for k in keep)
    assert ce["spliced_fraction"] == pytest.approx(1 - specials / (CONTEXTS * 32))


def test_outlier_positions_keep_their_activation(tmp_path):
    """With outlier_norm, the rows the harvest dropped as outliers are neither spliced nor counted."""
    source = harvest(tmp_path, outlier_norm=1.2)
    dropped = Manifest.load(source.shard_dir).source["dropped"]["outlier_rows"]
    assert dropped > 0  # the threshold is low enough to flag some rows of the tiny model
    torch.manual_seed(1)
    sae = StandIn(torch.randn(32, 48) / 6, torch.randn(48, 32) / 6)
    ce = ce_eval(sae, source)["ce_loss"]
    contexts = next_contexts(source, CONTEXTS)
    lm = load_model("tiny-random-llama", device="cpu")
    keep = []
    for context in contexts:  # the outlier rule, by hand: norm > 1.2 × the median norm of the non-special rows
        tokens = torch.from_numpy(context)
        _, cache = lm.bridge.run_with_cache(tokens[None], names_filter=source.hook)
        norms = cache[source.hook][0].norm(dim=-1)
        ordinary = ~torch.isin(tokens, torch.tensor(SPECIAL_IDS))
        keep.append(ordinary & (norms <= 1.2 * norms[ordinary].median()))
    ordinary = sum(int((~torch.isin(torch.from_numpy(c), torch.tensor(SPECIAL_IDS))).sum()) for c in contexts)
    assert sum(int(k.sum()) for k in keep) < ordinary  # some outliers among the evaluated contexts too
    expected = reference(sae, contexts, keep)
    assert ce["positions"] == expected["positions"]
    for key in ("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero"):
        assert ce[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


def test_heldout_contexts_fall_back_to_the_validation_shards():
    stream = [np.full(4, i) for i in range(10)]
    source = SimpleNamespace(context_length=4, contexts=lambda lm: iter(stream))
    manifest = SimpleNamespace(source={"contexts": 8}, val_rows=9)  # the last 2 consumed contexts are validation rows
    chosen, origin = heldout_contexts(source, None, manifest, 3)
    assert [int(c[0]) for c in chosen] == [7, 8, 9] and origin == {"after_harvest": 2, "from_validation_shards": 1}
    chosen, origin = heldout_contexts(source, None, manifest, 6)
    assert [int(c[0]) for c in chosen] == [6, 7, 8, 9] and origin == {"after_harvest": 2, "from_validation_shards": 2}
    chosen, _ = heldout_contexts(source, None, manifest, 1)
    assert [int(c[0]) for c in chosen] == [8]
    manifest = SimpleNamespace(source={"contexts": 10}, val_rows=0)
    assert heldout_contexts(source, None, manifest, 3) == ([], {"after_harvest": 0, "from_validation_shards": 0})


def test_the_default_evaluation_of_an_lm_run_does_not_warn(source, compose_train):
    """The quickstart (data=smollm2) evaluates with the training config's defaults: nothing may become a note there
    (``c2r.evaluate`` prints each note as a warning) for what LM data cannot have, a ground truth."""
    cfg = compose_train()
    assert cfg.data.source._target_.endswith("HarvestedShards")
    result = run_evaluation(Identity(), source.shard_dir, None, evals=cfg.evaluation.evals, tokens=64, source=source,
                            settings={"ce_loss": {"contexts": CONTEXTS, "batch_size": 4}}, plots=False)
    assert result["evals"] == ["core", "ce_loss"] and result["notes"] == []
    assert list(result["not_applicable"]) == ["ground_truth"]


def test_synthetic_data_is_skipped_with_a_note_and_unknown_names_fail(tmp_path):
    synthetic = SyntheticShards(d=8, n_features=16, l0=2, rows=512, rows_per_shard=256, cache_dir=tmp_path)
    result = run_evaluation(Identity(8), synthetic.ensure(), None, evals=["core", "ce_loss"], source=synthetic,
                            plots=False)
    assert result["evals"] == ["core"] and "ce_loss" not in result
    assert any(note.startswith("ce_loss skipped: the rows do not come from a language model")
               for note in result["notes"])
    with pytest.raises(ValueError, match="unknown eval 'kl'; available: .*ce_loss"):
        selected_evals(["kl"])
