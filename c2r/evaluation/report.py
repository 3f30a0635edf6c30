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


def render(result: dict) -> str:
    data = result["data"]
    lines = [
        f"# Evaluation of `{result['sae']['path']}`",
        "",
        f"{data['rows']:,} rows of the `{data['split']}` split of `{data['shard_dir']}` "
        f"({data['tokens_requested']:,} requested); evals: {', '.join(result['evals'])}.",
        "",
    ]
    if "core" in result:
        core = result["core"]
        lines += ["## Core", "", "| metric | value |", "|---|---|"]
        lines += [f"| {label} | {_fmt(core.get(key))} |" for key, label in CORE_ROWS]
        lines += [
            "",
            "CE-loss score and KL score are not computed: they need the language model (an LM evaluation).",
            "",
        ]
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
    if result["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in result["notes"]] + [""]
    plots = [p for name in result["evals"] for p in result.get(name, {}).get("plots", [])]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def write_report(result: dict, path: Path) -> Path:
    path.write_text(render(result))
    return path
