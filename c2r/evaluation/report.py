"""``eval.md``: a short human-readable summary of ``eval.json``."""

from __future__ import annotations

from pathlib import Path

CORE_ROWS = (
    ("fvu", "FVU"),
    ("explained_variance", "explained variance"),
    ("mse", "MSE (evaluated units)"),
    ("mse_normalized", "MSE (training normalisation)"),
    ("cosine", "cos(x, x̂), mean"),
    ("shrinkage", "‖x̂‖/‖x‖, mean"),
    ("l0", "L0"),
    ("dead_fraction", "dead latents (fraction)"),
    ("dense_fraction", "dense latents (fraction)"),
    ("decoder_max_cos_mean", "max decoder cosine to another latent, mean"),
)
CE_LOSS_ROWS = (
    ("ce_loss_score", "CE-loss score"),
    ("kl_score", "KL score"),
    ("ce_clean", "CE, clean (nats)"),
    ("ce_sae", "CE, SAE spliced in"),
    ("ce_zero", "CE, zeros spliced in"),
    ("ce_delta", "ΔCE = CE_sae − CE_clean"),
    ("kl_sae", "KL(clean ‖ SAE)"),
    ("kl_zero", "KL(clean ‖ zeros)"),
)
GROUND_TRUTH_ROWS = (
    ("coverage", "coverage (a latent at cos ≥ threshold)"),
    ("mmcs", "MMCS"),
    ("full_absorption", "full absorption"),
    ("partial_absorption", "partial absorption"),
    ("absorption_fraction", "absorption fraction"),
    ("hedging_decoder", "hedging (decoder)"),
    ("hedging_encoder", "hedging (encoder)"),
)


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _not_applicable(result: dict) -> str:
    names = list(result.get("not_applicable", {}))
    return f" (not applicable to this data: {', '.join(names)})" if names else ""


def render(result: dict) -> str:
    data = result["data"]
    requested = f" ({data['tokens_requested']:,} requested)" if data.get("tokens_requested") is not None else ""
    lines = [
        f"# Evaluation of `{result['sae']['path']}`",
        "",
        f"{data['rows']:,} rows of the `{data['split']}` split of `{data['shard_dir']}`{requested}; "
        f"evals: {', '.join(result['evals'])}{_not_applicable(result)}.",
        "",
    ]
    if "core" in result:
        core = result["core"]
        lines += ["## Core", "", "| metric | value |", "|---|---|"]
        lines += [f"| {label} | {_fmt(core.get(key))} |" for key, label in CORE_ROWS]
        lines.append("")
        if "ce_loss" not in result and "ce_loss" not in result.get("not_applicable", {}):
            lines += ["CE-loss score and KL score are not computed: add `ce_loss` to `evals` (needs the LM).", ""]
    if "ground_truth" in result:
        summary = result["ground_truth"]["summary"]
        lines += ["## Ground truth", "", "| metric | value |", "|---|---|"]
        rows = list(GROUND_TRUTH_ROWS[:2])
        rows += [(k, f"splitting, τ = {k.split('@')[1]}") for k in summary if k.startswith("splitting@")]
        rows += [(k, label) for k, label in GROUND_TRUTH_ROWS[2:] if k in summary]
        lines += [f"| {label} | {_fmt(summary.get(key))} |" for key, label in rows]
        if "parents" in summary:
            lines += [
                "",
                f"{summary['parents']} parents ({summary['parents_unmatched']} without a matching live latent); "
                f"absorption averaged over {summary['full_absorption_parents']} with enough events.",
            ]
        lines.append("")
    if "first_letter" in result:
        lines += _first_letter_block(result["first_letter"])
    if "ce_loss" in result:
        lines += _ce_loss_block(result["ce_loss"])
    if result["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in result["notes"]] + [""]
    plots = [p for name in result["evals"] for p in result.get(name, {}).get("plots", [])]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def _first_letter_block(fl: dict) -> list[str]:
    kept = [letter for letter, row in fl["letters"].items() if row["kept"]]
    rows = (
        ("absorption_fraction", "absorption fraction, mean over letters"),
        ("full_absorption_rate", "full-absorption rate, mean over letters"),
        ("split_features", "split features, mean over letters"),
        ("probe_f1_mean_kept", "probe F1, mean over kept letters"),
    )
    probe = fl["probe"]
    return [
        "## First-letter absorption (SAEBench-style)",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {label} | {_fmt(fl.get(key))} |" for key, label in rows),
        "",
        f"{len(kept)} of 26 letters kept (probe F1 > {fl['settings']['min_probe_f1']}): {''.join(kept) or 'none'}; "
        f"probe on {probe['train_words']} train / {probe['test_words']} test words"
        f"{' (cached)' if probe['cached'] else ''}.",
        "",
    ]


def _ce_loss_block(ce: dict) -> list[str]:
    settings = ce["settings"]
    return [
        "## CE-loss and KL scores (SAE spliced into the LM)",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {label} | {_fmt(ce.get(key))} |" for key, label in CE_LOSS_ROWS),
        "",
        f"{settings['contexts']} held-out contexts of {settings['context_length']} tokens "
        f"({settings['after_harvest']} after the harvested text, {settings['from_validation_shards']} from the "
        f"validation shards); {ce['positions']:,} predicted positions; {ce['spliced_fraction']:.1%} of the positions "
        f"spliced at `{settings['hook']}`.",
        "",
    ]


def write_report(result: dict, path: Path) -> Path:
    path.write_text(render(result))
    return path
