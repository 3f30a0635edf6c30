"""The metric math of the first-letter evaluation, on plain tensors (no language model needed).

Follows the published definitions of SAEBench's absorption eval (Chanin et al., "A is for Absorption"); the
evaluation that collects the data and the differences from SAEBench are in :mod:`c2r.evaluation.first_letter`.

- :func:`train_linear_probe`: one-vs-rest logistic regression for every class at once (BCE with a positive-class
  weight of #negatives/#positives, Adam, learning rate decayed exponentially per epoch), optionally with an L1
  penalty; the ground-truth probe on LM activations and the L1 probe that ranks SAE latents are both this.
- :func:`fit_logistic_regression`: a binary, class-balanced, L2-regularised logistic regression solved to
  convergence (L-BFGS): the objective of scikit-learn's ``LogisticRegression(class_weight="balanced")`` (C = 1)
  that SAEBench fits on the top-k latents.
- :func:`sparse_probe_f1s` and :func:`split_count`: k-sparse probing and the F1-jump rule.
- :func:`word_absorption`: the absorption fraction and full absorption of each word.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVE_EPS = 1e-8
"""A latent with a code below this counts as silent (SAEBench's ``EPS``)."""


@torch.enable_grad()
def train_linear_probe(
    x: Tensor,
    labels: Tensor,
    classes: int,
    *,
    epochs: int = 50,
    batch_size: int = 64,
    lr: float = 1e-2,
    end_lr: float = 1e-5,
    weight_decay: float = 1e-4,
    l1: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """One-vs-rest logistic probes for ``classes`` classes on ``x`` ``[N, d]`` with integer ``labels`` ``[N]``.

    Loss: mean BCE of the ``[N, classes]`` logits against one-hot targets, each class's positives weighted by
    #negatives/#positives (so rare letters count), plus ``l1`` × the mean over classes of ``Σ|w|``. Adam with
    ``weight_decay``; the learning rate falls from ``lr`` to ``end_lr`` over the epochs. Seeded (initialisation and
    batch order). Returns ``(weight [classes, d], bias [classes])``. Trains even when called under ``no_grad``.
    """
    x = x.detach().float().cpu()
    targets = F.one_hot(labels.long().cpu(), classes).float()
    positives = targets.sum(dim=0)
    pos_weight = (len(targets) - positives) / positives.clamp_min(1)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    gamma = (end_lr / lr) ** (1 / max(epochs, 1))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            optimizer.zero_grad()
            loss = loss_fn(probe(x[batch]), targets[batch])
            if l1:
                loss = loss + l1 * probe.weight.abs().sum(dim=1).mean()
            loss.backward()
            optimizer.step()
        scheduler.step()
    return probe.weight.detach().clone(), probe.bias.detach().clone()


@torch.enable_grad()
def fit_logistic_regression(x: Tensor, y: Tensor, *, c: float = 1.0, max_iter: int = 500) -> tuple[Tensor, Tensor]:
    """Binary logistic regression on ``x`` ``[N, k]`` and boolean ``y`` ``[N]`` with balanced class weights and an
    L2 penalty ``‖w‖²/(2c)`` (the bias is not penalised), solved by L-BFGS in float64. Returns ``(w [k], b)``.

    Balanced weights: each row of class ``c`` weighs ``N / (2 · #rows of class c)``, so both classes count equally.
    """
    x, y = x.detach().double().cpu(), y.detach().bool().cpu()
    n, positives = len(y), int(y.sum())
    if positives in (0, n):
        raise ValueError(f"logistic regression needs rows of both classes, got {positives} positives of {n} rows")
    weights = torch.where(y, n / (2 * positives), n / (2 * (n - positives))).double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [w, b], max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = (weights * F.binary_cross_entropy_with_logits(x @ w + b, y.double(), reduction="none")).sum()
        loss = (loss + w.square().sum() / (2 * c)) / n  # sklearn's objective divided by N: same minimum
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def f1_score(predicted: Tensor, actual: Tensor) -> float:
    """Binary F1 of boolean predictions; 0 when there is no true positive (scikit-learn's convention)."""
    predicted, actual = predicted.bool(), actual.bool()
    true_positives = int((predicted & actual).sum())
    if true_positives == 0:
        return 0.0
    return 2 * true_positives / (int(predicted.sum()) + int(actual.sum()))


def sparse_probe_f1s(
    train_codes: Tensor, train_y: Tensor, test_codes: Tensor, test_y: Tensor, ranked_latents: Tensor
) -> list[float]:
    """k-sparse probing: for k = 1 … len(ranked_latents), fit :func:`fit_logistic_regression` on the codes of the
    first k latents of ``ranked_latents`` (train rows) and return its test F1 (predicting the class where the
    logit is > 0)."""
    f1s = []
    for k in range(1, len(ranked_latents) + 1):
        latents = ranked_latents[:k]
        w, b = fit_logistic_regression(train_codes[:, latents], train_y)
        f1s.append(f1_score(test_codes[:, latents].double() @ w + b > 0, test_y))
    return f1s


def split_count(f1s: Sequence[float], jump: float = 0.03) -> int:
    """The number of split features by SAEBench's F1-jump rule: k = 1 is always taken, then k + 1 as long as its
    F1 exceeds the F1 of the last k taken by more than ``jump``; returns the last k taken (0 when ``f1s`` is
    empty)."""
    taken, best = 0, float("-inf")
    for k, f1 in enumerate(f1s, start=1):
        if f1 <= best + jump:
            break
        taken, best = k, f1
    return taken


def word_absorption(
    x: Tensor,
    codes: Tensor,
    decoder_rows: Tensor,
    probe_direction: Tensor,
    main_latents: Sequence[int] | Tensor,
    *,
    full_absorption_cos: float = 0.025,
    absorber_cos: float = 0.1,
    projection_share: float = 0.4,
    max_absorbers: int = 3,
) -> tuple[Tensor, Tensor]:
    """Absorption fraction ``[N]`` and full absorption ``[N]`` (bool) of N words of one letter.

    With ``p̂`` the unit probe direction, the word's *probe projection* is ``P = x·p̂`` and latent j's is
    ``P_j = f_j (W_j·p̂)`` (its decoder contribution projected on ``p̂``; ``f_j cos(W_j, p̂)`` for unit-norm rows,
    as SAEBench writes it). ``M = Σ_{j∈main} P_j``; the candidate absorbers are the other latents with
    ``cos(W_j, p̂) ≥ absorber_cos`` and ``P_j > 0``, and ``A`` is the sum of their ``max_absorbers`` largest ``P_j``.

    - absorption fraction: 0 if ``P ≤ 0``, ``M ≥ P`` or ``A < projection_share · P``; else 1 if ``M ≤ 0``; else
      ``a / (a + M)`` with ``a = min(A, P − M)``;
    - full absorption: every main latent is silent (code < 1e-8), ``P > 0``, and the latent with the largest
      ``P_j`` has ``cos(W_j, p̂) ≥ full_absorption_cos`` and ``P_j ≥ projection_share · P``.
    """
    x, codes = x.detach().double(), codes.detach().double()
    rows = decoder_rows.detach().double().to(codes.device)
    direction = F.normalize(probe_direction.detach().double().to(codes.device), dim=0)
    along = rows @ direction  # [F]
    cos = along / rows.norm(dim=1).clamp_min(1e-30)
    projections = codes * along  # [N, F]
    total = x.to(codes.device) @ direction  # [N]
    main = torch.as_tensor(main_latents, dtype=torch.long, device=codes.device)
    is_main = torch.zeros(rows.shape[0], dtype=torch.bool, device=codes.device)
    is_main[main] = True
    main_projection = projections[:, main].sum(dim=1)

    candidates = (~is_main & (cos >= absorber_cos)).unsqueeze(0) & (projections > 0)
    absorbed = projections.where(candidates, torch.zeros_like(projections))
    absorbed = absorbed.topk(min(max_absorbers, rows.shape[0]), dim=1).values.sum(dim=1)
    absorbing = (total > 0) & (main_projection < total) & (absorbed >= projection_share * total)
    unaccounted = torch.minimum(absorbed, total - main_projection)
    partial = (unaccounted / (unaccounted + main_projection)).clamp(0, 1)
    fraction = torch.where(main_projection <= 0, torch.ones_like(total), partial)
    fraction = torch.where(absorbing, fraction, torch.zeros_like(total))

    top = projections.argmax(dim=1)
    top_projection = projections.gather(1, top.unsqueeze(1)).squeeze(1)
    full = (
        (codes[:, main] < ACTIVE_EPS).all(dim=1)
        & (total > 0)
        & (cos[top] >= full_absorption_cos)
        & (top_projection >= projection_share * total)
    )
    return fraction.cpu(), full.cpu()
