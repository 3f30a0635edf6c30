"""First-letter absorption and splitting (c2r/evaluation/first_letter*.py).

The metric math runs on hand-built codes, decoders and probes whose answers are known; the evaluation runs once on
a hand-built cached probe (no LM: F1 filtering, cache reuse, a perfect SAE) and once end to end on the tiny
random-weight Llama through a ``HarvestedShards`` source.
"""

from __future__ import annotations

import json
import os
import random
import string
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from c2r.data import HarvestedShards, SyntheticShards
from c2r.data.lm import tiny_random_llama
from c2r.evaluation import evaluate_rows, run_evaluation, select_rows
from c2r.evaluation import first_letter as fl
from c2r.data.lm import model_identity
from c2r.evaluation.first_letter_probe import PROBE_CACHE_VERSION, LetterProbe, save_letter_probe
from c2r.evaluation.first_letter_prompts import FirstLetterError, alphabetic_tokens, build_prompts, icl_prompt
from c2r.evaluation.first_letter_settings import ProbeSettings, PromptSettings, SparseProbeSettings
from c2r.evaluation.base import EvalContext
from c2r.evaluation.first_letter_metrics import (
    f1_score,
    fit_logistic_regression,
    sparse_probe_f1s,
    split_count,
    train_linear_probe,
    word_absorption,
)
from c2r.export import sae_from_export
from c2r.storage import content_key
from c2r.sae import SparseAutoencoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
LETTERS = string.ascii_lowercase


def relu_sae(W_enc: torch.Tensor, W_dec: torch.Tensor) -> SparseAutoencoder:
    """An exported-form ReLU SAE with the given encoder [d, F] and decoder [F, d], no biases."""
    n_latents, d = W_dec.shape
    tensors = {"W_enc": W_enc.float(), "W_dec": W_dec.float(), "b_enc": torch.zeros(n_latents), "b_dec": torch.zeros(d)}
    return sae_from_export({"architecture": "standard", "d_in": d, "d_sae": n_latents}, tensors)


def letter_codes(n_pos: int, n_neg: int, active: list[torch.Tensor], n_noise: int, seed: int):
    """Codes of ``n_pos`` words of a letter then ``n_neg`` others: column i is 1 on the positives where
    ``active[i]`` is true (0 elsewhere); ``n_noise`` more columns are uniform noise unrelated to the letter."""
    generator = torch.Generator().manual_seed(seed)
    n = n_pos + n_neg
    signal = torch.zeros(n, len(active))
    for i, mask in enumerate(active):
        signal[:n_pos, i] = mask.float()
    noise = torch.rand(n, n_noise, generator=generator)
    y = torch.arange(n) < n_pos
    return torch.cat([signal, noise], dim=1), y


# --------------------------------------------------------------------------------------------------
# The math
# --------------------------------------------------------------------------------------------------


def test_f1_and_the_f1_jump_rule():
    assert f1_score(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.5)
    assert f1_score(torch.tensor([0, 0]), torch.tensor([1, 0])) == 0.0
    assert split_count([0.9, 0.92, 0.99]) == 1  # +0.02 is no jump: stop at k = 1
    assert split_count([0.5, 0.7, 0.75, 0.76]) == 3  # +0.2, +0.05, then +0.01 stops
    assert split_count([0.5, 0.53, 0.9]) == 1  # exactly +0.03 is not more than the threshold
    assert split_count([0.0, 0.0]) == 1 and split_count([]) == 0


def test_logistic_regression_is_class_balanced():
    """One feature that is 1 on 10 of 40 positives and 0 on 160 negatives: balanced weights put the bias below 0
    (rows at 0 are mostly negative by weight), so exactly the rows with the feature are called positive."""
    x = torch.zeros(200, 1)
    x[:10] = 1
    y = torch.arange(200) < 40
    w, b = fit_logistic_regression(x, y)
    assert b < 0 < w + b
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic_regression(x, torch.zeros(200, dtype=torch.bool))


def test_one_faithful_latent_gives_one_split():
    """Latent 0 fires on every word of the letter and nowhere else: k = 1 already has F1 = 1."""
    train, y_train = letter_codes(30, 90, [torch.ones(30, dtype=torch.bool)], n_noise=5, seed=0)
    test, y_test = letter_codes(20, 60, [torch.ones(20, dtype=torch.bool)], n_noise=5, seed=1)
    ranking, _ = train_linear_probe(train, y_train.long(), 2, l1=0.01, batch_size=16)
    ranked = ranking[1].topk(4).indices
    assert ranked[0] == 0
    f1s = sparse_probe_f1s(train, y_train, test, y_test, ranked)
    assert f1s[0] == 1.0 and split_count(f1s) == 1


def test_two_latents_each_on_half_the_words_give_two_splits():
    """Latents 0 and 1 each fire on half of the letter's words: the L1 probe ranks them first, k = 1 has
    F1 = 2/3 (precision 1, recall 1/2), k = 2 has F1 = 1, k = 3 adds nothing → 2 split features."""
    half_train = torch.arange(40) % 2 == 0
    half_test = torch.arange(20) % 2 == 0
    train, y_train = letter_codes(40, 120, [half_train, ~half_train], n_noise=6, seed=2)
    test, y_test = letter_codes(20, 60, [half_test, ~half_test], n_noise=6, seed=3)
    ranking, _ = train_linear_probe(train, y_train.long(), 2, l1=0.01, batch_size=16)
    ranked = ranking[1].topk(5).indices
    assert set(ranked[:2].tolist()) == {0, 1}
    f1s = sparse_probe_f1s(train, y_train, test, y_test, ranked)
    assert f1s[0] == pytest.approx(2 / 3) and f1s[1] == 1.0
    assert split_count(f1s, 0.03) == 2


def absorbing_case(scale: float = 1.0):
    """10 words of a letter, probe direction e0. Latent 0 (decoder e0) is the main latent; latent 1 has decoder
    (e0 + e1)/√2 (cosine 0.71 to the probe); latent 2 (e2) is unrelated. Words 0-5: main latent alone (x = 2 e0);
    words 6-8: main latent silent, latent 1 carries the whole probe projection (x = 2 e0 + 2 e1); word 9: the main
    latent carries half (code 1) and latent 1 the other half (x = 2 e0 + e1). Decoder rows are scaled by
    ``scale`` and codes by 1/scale (the same reconstruction)."""
    decoder = torch.stack([torch.tensor([1.0, 0, 0]), torch.tensor([1.0, 1, 0]) / 2**0.5, torch.tensor([0, 0, 1.0])])
    codes = torch.zeros(10, 3)
    codes[:6, 0] = 2
    codes[6:9, 1] = 2 * 2**0.5
    codes[9, 0], codes[9, 1] = 1, 2**0.5
    codes[:, 2] = 0.5
    x = codes @ decoder
    return x, codes / scale, decoder * scale, torch.tensor([3.0, 0, 0])  # the probe's length is irrelevant


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_absorption_of_a_hand_built_absorbing_case(scale):
    x, codes, decoder, probe = absorbing_case(scale)
    fraction, full = word_absorption(x, codes, decoder, probe, [0])
    assert full.tolist() == [False] * 6 + [True] * 3 + [False]
    assert float(full.double().mean()) == pytest.approx(0.3)  # the constructed share
    assert fraction.tolist() == pytest.approx([0] * 6 + [1] * 3 + [0.5])
    assert float(fraction.mean()) == pytest.approx(0.35)


def test_absorption_thresholds():
    x, codes, decoder, probe = absorbing_case()
    # an absorber whose cosine to the probe is below absorber_cos (0.71 < 0.8) cannot absorb; full absorption
    # only needs full_absorption_cos
    fraction, full = word_absorption(x, codes, decoder, probe, [0], absorber_cos=0.8)
    assert fraction.tolist() == [0.0] * 10 and full.sum() == 3
    # the absorber must carry at least projection_share of the probe projection (it carries 100% or 50%)
    fraction, full = word_absorption(x, codes, decoder, probe, [0], projection_share=0.6)
    assert fraction.tolist() == pytest.approx([0] * 6 + [1] * 3 + [0]) and full.sum() == 3
    # the faithful main latent and no other aligned latent: no absorption at all
    fraction, full = word_absorption(x[:6], codes[:6], decoder, probe, [0])
    assert fraction.abs().sum() == 0 and not full.any()


# --------------------------------------------------------------------------------------------------
# The evaluation on a hand-built cached probe (no LM)
# --------------------------------------------------------------------------------------------------


def one_hot_words(per_letter: int, d: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``per_letter`` words per letter; a word of letter c has activation e_c (in d ≥ 26 dimensions)."""
    labels = torch.arange(26).repeat_interleave(per_letter)
    words = [f" {LETTERS[c]}w{i}" for i, c in enumerate(labels.tolist())]
    return words, F.one_hot(labels, d).float(), labels


@pytest.fixture
def hand_built_probe(tmp_path):
    """A cached probe over 26 × 8 train / 26 × 5 test one-hot words: the probe of letter c is 10·e_c − 5, perfect
    for every letter but b, where 2 of b's 5 test words lack e_b and 2 words of a carry it: F1(b) = 6/10 = 0.6,
    not above the 0.6 threshold."""
    d = 30
    train_words, x_train, y_train = one_hot_words(8, d)
    test_words, x_test, y_test = one_hot_words(5, d)
    b_words = (y_test == 1).nonzero().flatten()
    x_test[b_words[:2], 1] = 0
    x_test[(y_test == 0).nonzero().flatten()[:2], 1] = 1
    probe = LetterProbe(
        train_words, test_words, x_train, y_train, x_test, y_test,
        weight=10 * torch.eye(26, d), bias=torch.full((26,), -5.0), words_dropped=0,
    )
    source = SimpleNamespace(
        model="tiny-random-llama", model_revision=None, model_dtype="float32", hook="blocks.0.hook_resid_post",
        context_start="bos", cache_dir=tmp_path,
    )
    return probe, source, d


def make_eval(source, sae, plot_dir=None, **settings) -> fl.FirstLetterEval:
    ctx = EvalContext(sae=sae, rows=None, device=torch.device("cpu"), plot_dir=plot_dir, source=source)
    return fl.FirstLetterEval(ctx, lm=None, **settings)


SMALL_SPARSE_PROBE = SparseProbeSettings(max_k=3, batch_size=16)


def test_eval_on_a_cached_probe_filters_letters_and_scores_a_perfect_sae(hand_built_probe, tmp_path):
    probe, source, d = hand_built_probe
    assert probe.f1s()[0] == 1.0 and probe.f1s()[1] == pytest.approx(0.6)
    sae = relu_sae(torch.eye(d), torch.eye(d))
    evaluation = make_eval(source, sae, plot_dir=tmp_path, sparse_probe=SMALL_SPARSE_PROBE)
    save_letter_probe(evaluation.probe_path(), probe, evaluation.cache_key())
    result = evaluation.finalize()  # lm=None: it must come from the cache

    assert result["probe"]["cached"] is True
    assert result["dropped_letters"] == ["b"] and result["letters_kept"] == 25
    assert not result["letters"]["b"]["kept"] and "split_features" not in result["letters"]["b"]
    for letter in LETTERS.replace("b", ""):
        row = result["letters"][letter]
        assert row["main_latents"] == [LETTERS.index(letter)] and row["split_features"] == 1
        assert row["absorption_fraction"] == 0 and row["full_absorption_rate"] == 0
    assert result["letters"]["a"]["probe_true_positives"] == 5
    assert result["absorption_fraction"] == 0 and result["full_absorption_rate"] == 0
    assert result["split_features"] == 1
    assert any("1 letters dropped" in note and note.endswith(": b") for note in evaluation.ctx.notes)
    assert (tmp_path / result["plots"][0]).read_bytes()[:4] == b"\x89PNG"
    json.dumps(result)  # plain JSON values only


def test_too_few_letters_give_no_means(hand_built_probe):
    probe, source, d = hand_built_probe
    sae = relu_sae(torch.eye(d), torch.eye(d))
    evaluation = make_eval(source, sae, min_letters=26, sparse_probe=SparseProbeSettings(max_k=2, batch_size=16))
    save_letter_probe(evaluation.probe_path(), probe, evaluation.cache_key())
    result = evaluation.finalize()
    assert result["absorption_fraction"] is None and result["split_features"] is None
    assert result["letters"]["a"]["split_features"] == 1  # per-letter results are still there
    assert any("only 25 of 26 letters" in note for note in evaluation.ctx.notes)


def test_cache_key_covers_content_settings_not_speed(hand_built_probe):
    _, source, d = hand_built_probe
    sae = relu_sae(torch.eye(d), torch.eye(d))
    path = make_eval(source, sae).probe_path()
    assert make_eval(source, sae, batch_size=3, sparse_probe=SMALL_SPARSE_PROBE, min_probe_f1=0.9).probe_path() == path
    assert make_eval(source, sae, prompts=PromptSettings(words=100)).probe_path() != path
    assert make_eval(source, sae, probe=ProbeSettings(lr=0.1)).probe_path() != path
    # the settings objects keep the key of the flat settings they replaced: caches built before stay valid
    assert path.name == "first_letter_" + content_key({
        "version": PROBE_CACHE_VERSION, "model": model_identity(source.model, source.model_revision),
        "model_dtype": source.model_dtype, "hook": source.hook, "context_start": source.context_start,
        "words": 2000, "seed": 0, "test_fraction": 0.2, "icl_examples": 2, "template": "{word} has the first letter:",
        "probe": {"epochs": 50, "batch_size": 64, "lr": 0.01, "weight_decay": 1e-4},
    }) + ".safetensors"
    assert make_eval(SimpleNamespace(**{**vars(source), "hook": "blocks.1.hook_resid_post"}), sae).probe_path() != path


# --------------------------------------------------------------------------------------------------
# Words, prompts and the end-to-end run on the tiny model
# --------------------------------------------------------------------------------------------------


def test_vocabulary_and_prompts_follow_saebench():
    _, tokenizer = tiny_random_llama()
    vocabulary = alphabetic_tokens(tokenizer)
    assert sorted(text for _, text in vocabulary) == sorted(string.ascii_letters)  # byte-level: single letters
    assert icl_prompt(" cat", [" dog", "Ant"], "{word} has the first letter:") == (
        "\n dog has the first letter: D\nAnt has the first letter: A\n cat has the first letter:"
    )
    prompts, dropped = build_prompts(
        tokenizer, vocabulary[:5], template="{word} has the first letter:", icl_examples=3, start_id=1,
        rng=random.Random(0),
    )
    assert dropped == 0 and prompts.word_position == -len(" has the first letter:") - 1
    for word, ids in zip(prompts.words, prompts.tokens):
        assert ids[0] == 1 and tokenizer.decode(ids[prompts.word_position]) == word
        lines = tokenizer.decode(ids[1:]).split("\n")[1:]
        assert len(lines) == 4 and lines[-1] == f"{word} has the first letter:"
        assert word not in [line.split(" has")[0] for line in lines[:-1]]  # never its own example
    with pytest.raises(FirstLetterError, match="exactly once, followed by text"):
        build_prompts(tokenizer, vocabulary, template="{word}", icl_examples=1, start_id=None,
                         rng=random.Random(0))


@pytest.fixture
def tiny_source(tmp_path) -> HarvestedShards:
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Sentence {i} about absorption and splitting."}) + "\n"
                            for i in range(40)))
    return HarvestedShards(
        model="tiny-random-llama", hook="blocks.0.hook_resid_post", text={"dataset": "jsonl", "data_files": str(docs)},
        context_length=32, tokens=512, rows_per_shard=128, val_shards=1, batch_size=4, dtype="float32",
        outlier_norm=None, shuffle_buffer=8, progress=False, cache_dir=tmp_path / "cache",
    )


def test_end_to_end_on_the_tiny_model_caches_the_probe(tiny_source, tmp_path, monkeypatch):
    shard_dir = tiny_source.ensure()
    generator = torch.Generator().manual_seed(0)
    sae = relu_sae(torch.randn(32, 64, generator=generator), torch.randn(64, 32, generator=generator))
    settings = {"first_letter": {"prompts": {"words": 52, "icl_examples": 3}, "probe": {"epochs": 5},
                                 "sparse_probe": {"max_k": 3}}}
    run = dict(evals=["core", "first_letter"], tokens=256, settings=settings, source=tiny_source)
    first = run_evaluation(sae, shard_dir, tmp_path / "out", **run)

    result = first["first_letter"]
    assert result["probe"]["cached"] is False
    assert result["probe"]["train_words"] + result["probe"]["test_words"] == 52
    assert result["letters_kept"] + len(result["dropped_letters"]) == 26 and set(result["letters"]) == set(LETTERS)
    assert result["dropped_letters"]  # a random model's probes are weak
    assert any(note.startswith("first_letter:") and "letters dropped" in note for note in first["notes"])
    assert result["settings"]["prompts"]["icl_examples"] == 3 and result["settings"]["sparse_probe"]["f1_jump"] == 0.03
    report = (tmp_path / "out" / "eval.md").read_text()
    assert "## First-letter absorption" in report

    path = Path(result["probe"]["path"])
    assert path.parent == tiny_source.cache_dir / "probes" and path.is_file()
    written = path.stat().st_mtime_ns

    def no_retraining(*args, **kwargs):
        raise AssertionError("the cached probe should have been used")

    monkeypatch.setattr(fl, "build_letter_probe", no_retraining)
    second = run_evaluation(sae, shard_dir, None, **run)["first_letter"]
    assert second["probe"]["cached"] is True and path.stat().st_mtime_ns == written
    assert [second["letters"][c]["probe_f1"] for c in LETTERS] == [result["letters"][c]["probe_f1"] for c in LETTERS]


def test_synthetic_data_is_skipped_with_a_note(tmp_path):
    source = SyntheticShards(d=8, n_features=16, l0=2, rows=1024, rows_per_shard=512, cache_dir=tmp_path)
    rows = select_rows(source.ensure(), tokens=256)
    result = evaluate_rows(relu_sae(torch.eye(8), torch.eye(8)), rows, evals=["core", "first_letter"], source=source)
    assert result["evals"] == ["core"] and "first_letter" not in result
    assert any(note.startswith("first_letter skipped") for note in result["notes"])


def test_bad_settings_name_their_key():
    with pytest.raises(FirstLetterError, match=r"first_letter.prompts.test_fraction must be in \(0, 1\), got 1.0"):
        PromptSettings(test_fraction=1.0)
    with pytest.raises(FirstLetterError, match="first_letter.prompts needs words >= 3"):
        PromptSettings(words=2)
    with pytest.raises(FirstLetterError, match="first_letter.sparse_probe.max_k must be >= 1, got 0"):
        SparseProbeSettings(max_k=0)
