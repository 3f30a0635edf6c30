"""Cross-seed consistency (best-match cosines between two decoders) against a naive full cosine matrix."""

import numpy as np
import pytest
import torch

from c2r.evaluation.consistency import best_match_cosines, match_summary


def naive_best_matches(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The whole cosine matrix in float64, row and column maxima."""
    a = a.astype(np.float64) / np.linalg.norm(a, axis=1, keepdims=True)
    b = b.astype(np.float64) / np.linalg.norm(b, axis=1, keepdims=True)
    cosines = a @ b.T
    return cosines.max(axis=1), cosines.max(axis=0)


@pytest.mark.parametrize("tile_size", [1, 5, 1024])
def test_best_matches_equal_the_full_cosine_matrix(tile_size):
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(37, 6, generator=generator), torch.randn(53, 6, generator=generator) * 3.0
    best_a, best_b = best_match_cosines(a, b, tile_size=tile_size)
    expected_a, expected_b = naive_best_matches(a.numpy(), b.numpy())
    assert best_a.dtype == best_b.dtype == torch.float32
    np.testing.assert_allclose(best_a.numpy(), expected_a, atol=1e-6)
    np.testing.assert_allclose(best_b.numpy(), expected_b, atol=1e-6)


def test_a_permuted_rescaled_copy_matches_fully_and_random_or_negated_directions_do_not():
    generator = torch.Generator().manual_seed(0)
    decoder = torch.randn(64, 64, generator=generator)
    copy = decoder[torch.randperm(64, generator=generator)] * torch.rand(64, 1, generator=generator).add(0.5)
    for best in best_match_cosines(decoder, copy):
        assert match_summary(best) == pytest.approx({"matched_share": 1.0, "mean_best_cosine": 1.0})
    unrelated = match_summary(best_match_cosines(decoder, torch.randn(64, 64, generator=generator))[0])
    assert unrelated["matched_share"] == 0.0 and unrelated["mean_best_cosine"] < 0.5
    negated = match_summary(best_match_cosines(decoder, -decoder)[0])  # signed cosine: -w is another feature
    assert negated["matched_share"] == 0.0


def test_match_summary_counts_the_threshold_as_matched():
    summary = match_summary(torch.tensor([0.7, 0.69, 1.0, -0.2], dtype=torch.float64))
    assert summary == pytest.approx({"matched_share": 0.5, "mean_best_cosine": 0.5475})
    assert match_summary(torch.tensor([0.8, 0.9]), threshold=0.85)["matched_share"] == 0.5


def test_half_precision_is_searched_in_fp32_and_sizes_must_agree():
    best, _ = best_match_cosines(torch.randn(8, 4).bfloat16(), torch.randn(5, 4).bfloat16())
    assert best.dtype == torch.float32
    with pytest.raises(ValueError, match="different sizes: 4 and 3"):
        best_match_cosines(torch.randn(8, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="tile_size"):
        best_match_cosines(torch.randn(8, 4), torch.randn(5, 4), tile_size=0)
