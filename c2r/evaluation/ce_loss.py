"""CE-loss score and KL score: the language model's next-token predictions with the SAE spliced in at the hook.

Splice: the LM runs on held-out contexts; at the hook the activation ``x`` of every position the harvest kept
(:meth:`~c2r.data.HarvestedShards.keep_mask`: not a dropped special token, not a massive-activation outlier) is
replaced by ``decode(encode(x))``; the other positions keep their activation (the SAE never saw such rows). The
zero-ablation baseline splices zeros at the same positions instead.

Over the predicted positions ``p`` whose input token was spliced (``p`` < the last position; each predicts token
``p + 1``), with next-token log-probabilities ``log P`` (float32 log-softmax of the logits):

- ``ce_clean``, ``ce_sae``, ``ce_zero``: mean next-token cross-entropy (nats) without a splice, with the SAE and
  with zeros; ``ce_delta = ce_sae − ce_clean``;
- ``ce_loss_score = (ce_zero − ce_sae) / (ce_zero − ce_clean)`` (1: the SAE loses nothing; 0: as bad as zeros);
- ``kl_sae``, ``kl_zero``: mean ``KL(P_clean ‖ P_patched)`` of the next-token distributions;
  ``kl_score = 1 − kl_sae / kl_zero``;
- ``spliced_fraction``: the share of all context positions that were spliced.

Contexts (held out from training): the harvest's own context stream (:meth:`~c2r.data.HarvestedShards.contexts`,
same text, packing and shuffle) *after* the ones the harvest consumed (``manifest.source["contexts"]``). If the
text runs out before ``contexts`` are found, the rest are taken from the end of the consumed ones, only as many as
certainly lie in the validation shards (``val_rows // context_length`` contexts: each gives at most
``context_length`` rows, and the validation shards hold the last rows written). ``eval.json`` records how many
came from where.

Bridge API: ``run_with_hooks(tokens, fwd_hooks=[(hook, fn)], return_type="logits")``, the same in TransformerLens 3.x
(checked: 3.0.0, 3.5.1) and 4.x.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from c2r.data.harvest import HarvestedShards
from c2r.data.lm import LanguageModel
from c2r.data.shards import Manifest
from c2r.evaluation.base import EvalContext, NotApplicable, nan_to_none
from c2r.evaluation.data import RowBatch

COUNTS = ("tokens", "spliced", "positions")
LOSSES = ("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero")


class CELossError(ValueError):
    """Bad settings of the CE-loss evaluation, with what is wrong and how to fix it."""


def heldout_contexts(
    source: HarvestedShards, lm: LanguageModel, manifest: Manifest, count: int
) -> tuple[list[np.ndarray], dict]:
    """Up to ``count`` contexts the SAE was not trained on (see the module docstring), and where they came from:
    ``{"after_harvest": n, "from_validation_shards": m}``."""
    consumed = int(manifest.source["contexts"])
    reusable = manifest.val_rows // source.context_length
    tail: deque[np.ndarray] = deque(maxlen=min(count, reusable))
    fresh: list[np.ndarray] = []
    for index, context in enumerate(source.contexts(lm)):
        if index < consumed:
            tail.append(context)
            continue
        fresh.append(context)
        if len(fresh) == count:
            break
    missing = count - len(fresh)
    reused = list(tail)[-missing:] if missing and tail else []
    return reused + fresh, {"after_harvest": len(fresh), "from_validation_shards": len(reused)}


class CELossEval:
    """CE-loss and KL scores of the SAE spliced into the LM (see the module docstring). Ignores the streamed rows:
    all the work happens in :meth:`finalize`."""

    name = "ce_loss"

    def __init__(
        self, ctx: EvalContext, lm: LanguageModel, contexts: list[np.ndarray], origin: dict, *, batch_size: int
    ) -> None:
        self.ctx, self.lm, self.source = ctx, lm, ctx.source
        self.contexts, self.origin, self.batch_size = contexts, origin, int(batch_size)
        self.special_ids = self.source.dropped_token_ids(lm.tokenizer)

    def update(self, batch: RowBatch, acts: Tensor, recon: Tensor) -> None:
        """Nothing to do per batch: this evaluation runs its own contexts through the LM."""

    @torch.no_grad()
    def batch_sums(self, tokens: Tensor) -> dict[str, float]:
        """The sums of :data:`COUNTS` and :data:`LOSSES` over one batch of contexts ``[batch, pos]``: three
        forward passes (clean, SAE spliced in, zeros spliced in)."""
        bridge, hook_name = self.lm.bridge, self.source.hook
        tokens = tokens.to(self.lm.device)
        captured: dict[str, Tensor] = {}

        def record(act: Tensor, hook: Any) -> None:
            captured["act"] = act.detach().clone()

        clean_logits = bridge.run_with_hooks(tokens, fwd_hooks=[(hook_name, record)], return_type="logits")
        act = captured["act"]
        flat = act.reshape(*act.shape[:2], -1)
        keep = self.source.keep_mask(tokens, flat, self.special_ids)
        x = flat[keep].to(self.ctx.device, torch.float32)
        recon = self.ctx.sae.decode(self.ctx.sae.encode(x)).to(act.device, act.dtype)

        counted = keep[:, :-1]
        targets = tokens[:, 1:][counted]
        clean = clean_logits[:, :-1][counted].float().log_softmax(-1)
        sums = {
            "tokens": tokens.numel(),
            "spliced": int(keep.sum()),
            "positions": int(counted.sum()),
            "ce_clean": float(F.nll_loss(clean, targets, reduction="sum")),
        }
        for name, rows in (("sae", recon), ("zero", torch.zeros_like(recon))):

            def splice(act: Tensor, hook: Any, rows: Tensor = rows) -> Tensor:
                spliced = act.reshape(*act.shape[:2], -1).clone()
                spliced[keep] = rows
                return spliced.reshape(act.shape)

            logits = bridge.run_with_hooks(tokens, fwd_hooks=[(hook_name, splice)], return_type="logits")
            patched = logits[:, :-1][counted].float().log_softmax(-1)
            sums[f"ce_{name}"] = float(F.nll_loss(patched, targets, reduction="sum"))
            sums[f"kl_{name}"] = float(F.kl_div(patched, clean, reduction="sum", log_target=True))
        return sums

    def finalize(self) -> dict:
        totals = dict.fromkeys(COUNTS + LOSSES, 0.0)
        for start in range(0, len(self.contexts), self.batch_size):
            tokens = torch.from_numpy(np.stack(self.contexts[start : start + self.batch_size]))
            for key, value in self.batch_sums(tokens).items():
                totals[key] += value
        positions = totals["positions"]
        if positions == 0:
            raise CELossError(
                "no position of the evaluated contexts was spliced (every one is a dropped token or an outlier): "
                "check data.source.drop_special / outlier_norm"
            )
        mean = {key: totals[key] / positions for key in LOSSES}
        ce_score = _ratio(mean["ce_zero"] - mean["ce_sae"], mean["ce_zero"] - mean["ce_clean"])
        return {
            "ce_loss_score": nan_to_none(ce_score),
            "kl_score": nan_to_none(1 - _ratio(mean["kl_sae"], mean["kl_zero"])),
            **mean,
            "ce_delta": mean["ce_sae"] - mean["ce_clean"],
            "spliced_fraction": totals["spliced"] / totals["tokens"],
            "positions": int(positions),
            "settings": {
                "hook": self.source.hook,
                "contexts": len(self.contexts),
                **self.origin,
                "context_length": int(self.contexts[0].shape[0]),
                "batch_size": self.batch_size,
            },
        }


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN when the denominator is 0 (the score is then undefined)."""
    return numerator / denominator if denominator != 0 else float("nan")


def ce_loss(ctx: EvalContext, *, contexts: int = 16, batch_size: int = 8) -> CELossEval | None:
    """Factory of the ``ce_loss`` evaluation (CE-loss score and KL score); :class:`NotApplicable` when the rows do
    not come from a language model, ``None`` (with a note) when no held-out context is left."""
    if contexts < 1 or batch_size < 1:
        raise CELossError(
            f"ce_loss needs contexts >= 1 and batch_size >= 1, got contexts={contexts}, batch_size={batch_size}"
        )
    lm = ctx.language_model()
    if lm is None:
        raise NotApplicable(
            "the rows do not come from a language model (the CE-loss and KL scores splice the SAE into the LM and "
            "hook that produced them); use an LM data config such as data=smollm2"
        )
    chosen, origin = heldout_contexts(ctx.source, lm, ctx.rows.manifest, contexts)
    if not chosen:
        ctx.notes.append(
            "ce_loss skipped: no held-out context left (the harvest consumed all the text and has no validation "
            "shard); use more text or lower data.source.tokens"
        )
        return None
    if len(chosen) < contexts:
        ctx.notes.append(
            f"ce_loss: asked for {contexts} held-out contexts, found {len(chosen)} ({origin['after_harvest']} after "
            f"the harvested ones, {origin['from_validation_shards']} from the validation shards)"
        )
    elif origin["from_validation_shards"]:
        ctx.notes.append(
            f"ce_loss: the text ran out after the harvest; {origin['from_validation_shards']} of the {contexts} "
            "contexts are the last harvested ones (their rows are in the validation shards)"
        )
    return CELossEval(ctx, lm, chosen, origin, batch_size=batch_size)
