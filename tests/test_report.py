"""``python -m c2r.report``: the sweep table and plots, on hand-made job folders with known numbers."""

import csv
import json
import statistics

import pytest
import torch
from omegaconf import OmegaConf

from c2r.evaluation import scalar_metrics
from c2r.evaluation.report import render
from c2r.export import export_sae
from c2r.report import COEF_METRICS, Job, coefficient_series, find_jobs, main, pareto_front, write_report
from c2r.sae import TopKSAE


def make_job(sweep, name, *, coef, seed, dict_size=64, k=4, fvu=0.5, l0=4.0, absorption=None, finished=True,
             decoder=None, data=None):
    """A job folder as `python -m c2r.train -m` leaves it (the parts the report reads); with ``decoder``
    (``[dict_size, d]``) also its exported SAE; ``data``: the config's data settings."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    config = {"dict_size": dict_size, "seed": seed, "train_tokens": 1000, "model": {"k": k},
              "regularizer": {"coef": coef}, **({"data": data} if data else {})}
    OmegaConf.save(config, job / ".hydra" / "config.yaml")
    hydra = {"hydra": {"runtime": {"choices": {"model": "topk", "regularizer": "c2r", "data": "synthetic"}},
                       "overrides": {"task": [f"regularizer.coef={coef}", f"seed={seed}", "hardware=cpu",
                                              "trainer.enable_progress_bar=false"]},
                       "job": {"config": {"override_dirname": {"exclude_keys": ["hardware",
                                                                                "trainer.enable_progress_bar"]}}}}}
    OmegaConf.save(hydra, job / ".hydra" / "hydra.yaml")
    if finished:
        (job / "metrics.json").write_text(json.dumps({"fvu": fvu + 0.01, "l0": l0, "steps": 10}))
        evaluation = {"evals": ["core", "ground_truth"], "core": {"fvu": fvu, "l0": l0, "settings": {"rows": 5}},
                      "ground_truth": {"summary": {"absorption_fraction": absorption}, "plots": ["x.png"]}}
        (job / "eval.json").write_text(json.dumps(evaluation))
    if decoder is not None:
        sae = TopKSAE(decoder.shape[1], dict_size, k=k)
        sae.W_dec.data.copy_(decoder)
        export_sae(sae, job / "sae", normalization_factor=2.0)  # scales every row alike: cosines unchanged
    return job


def test_pareto_front_keeps_only_undominated_points():
    points = [(4, 0.5), (8, 0.3), (8, 0.35), (6, 0.6), (16, 0.31), (16, 0.2)]
    assert pareto_front(points) == [(4, 0.5), (8, 0.3), (16, 0.2)]


def test_scalar_metrics_drops_settings_plots_lists_and_summary_levels():
    result = {"evals": ["gt"], "notes": ["n"], "wall_time_s": 3.0, "core": {"fvu": 0.1},  # core was not run
              "gt": {"summary": {"a": 1.0, "b": None}, "settings": {"x": 1}, "plots": ["p"], "per_parent": [1, 2],
                     "nested": {"c": 2, "flag": True}}}
    assert scalar_metrics(result) == {"gt.a": 1.0, "gt.nested.c": 2}


def test_eval_md_advises_the_lm_evaluation_only_where_it_could_run():
    result = {"sae": {"path": "sae"}, "data": {"rows": 10, "split": "val", "shard_dir": "d"}, "evals": ["core"],
              "core": {"fvu": 0.1}, "notes": []}
    assert "add `ce_loss` to `evals`" in render(result)  # LM data, evals=[core]
    not_lm = render({**result, "not_applicable": {"ce_loss": "the rows do not come from a language model"}})
    assert "add `ce_loss`" not in not_lm and "evals: core (not applicable to this data: ce_loss)." in not_lm


def test_coefficient_series_averages_seeds_per_setting():
    jobs = [
        Job(f"j{i}", True, {"regularizer": "c2r", "coef": coef, "seed": seed, "dict_size": size},
            {"gt.absorption": value})
        for i, (coef, seed, size, value) in enumerate([
            (0.0, 0, 64, 0.40), (0.0, 1, 64, 0.30), (0.1, 0, 64, 0.20), (0.1, 1, 64, 0.10),
            (0.0, 0, 128, 0.50), (0.1, 0, 128, 0.25),
        ])
    ]
    series = coefficient_series(jobs, "gt.absorption")
    assert set(series) == {"dict_size=64", "dict_size=128"}
    (coef0, mean0, sd0, n0), (coef1, mean1, sd1, n1) = series["dict_size=64"]
    assert (coef0, n0, coef1, n1) == (0.0, 2, 0.1, 2)
    assert mean0 == pytest.approx(0.35) and sd0 == pytest.approx(statistics.stdev([0.4, 0.3]))
    assert mean1 == pytest.approx(0.15) and sd1 == pytest.approx(statistics.stdev([0.2, 0.1]))
    assert series["dict_size=128"] == [(0.0, 0.5, 0.0, 1), (0.1, 0.25, 0.0, 1)]


def test_report_writes_table_and_plots_and_lists_unfinished_jobs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        for coef, absorption in ((0.0, 0.4), (0.3, 0.1)):
            make_job(sweep, f"coef={coef},seed={seed}", coef=coef, seed=seed, absorption=absorption + seed / 100)
    make_job(sweep, "coef=1.0,seed=0", coef=1.0, seed=0, finished=False)

    main([str(sweep)])

    printed = capsys.readouterr().out
    assert "4 of 5 jobs finished" in printed and "coef=1.0,seed=0" in printed
    with (sweep / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["job"] for row in rows] == [
        "coef=0.0,seed=0", "coef=0.0,seed=1", "coef=0.3,seed=0", "coef=0.3,seed=1", "coef=1.0,seed=0"
    ]
    first = rows[0]
    assert first["status"] == "finished" and first["model"] == "topk" and first["coef"] == "0.0"
    assert float(first["core.fvu"]) == 0.5 and float(first["train.fvu"]) == 0.51
    assert float(first["ground_truth.absorption_fraction"]) == 0.4
    assert "regularizer.coef" not in first  # no duplicate of `coef`
    assert "hardware" not in first and "trainer.enable_progress_bar" not in first  # not part of the experiment
    assert rows[-1]["status"] == "unfinished" and rows[-1]["core.fvu"] == ""
    markdown = (sweep / "report.md").read_text()
    assert "Same for every job: model=topk, regularizer=c2r, dict_size=64, k=4" in markdown
    assert markdown.count("\n| coef=") == 5
    for plot in ("report_pareto.png", "report_coef.png"):
        assert (sweep / plot).read_bytes().startswith(b"\x89PNG")


def test_report_refuses_a_folder_without_jobs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training jobs under"):
        find_jobs(tmp_path)
    with pytest.raises(SystemExit, match="is not a folder"):
        main([str(tmp_path / "missing")])


def test_report_can_write_elsewhere(tmp_path):
    sweep = tmp_path / "sweep"
    make_job(sweep, "a", coef=0.0, seed=0, absorption=0.2)
    summary = write_report(sweep, tmp_path / "out", metrics=["core.fvu"])
    assert summary["jobs"] == summary["finished"] == 1
    assert (tmp_path / "out" / "report.csv").is_file() and not (sweep / "report.csv").exists()


def test_report_adds_cross_seed_consistency_to_jobs_that_differ_only_in_seed(tmp_path):
    e = torch.eye(8)
    decoders = {  # known best matches; e.g. seed 0 in seed 2: e0 → 1, e1 → 1, e2 → 0.6, e3 → 0
        0: e[[0, 1, 2, 3]],
        1: e[[1, 0, 3, 2]],  # seed 0's directions, permuted
        2: torch.stack([e[0], e[1], e[4], 0.6 * e[2] + 0.8 * e[5]]),
    }
    sweep = tmp_path / "sweep"
    for seed, decoder in decoders.items():
        make_job(sweep, f"coef=0.0,seed={seed}", coef=0.0, seed=seed, dict_size=4, decoder=decoder)
    make_job(sweep, "coef=0.3,seed=0", coef=0.3, seed=0, dict_size=4, decoder=decoders[0])  # no seed partner
    make_job(sweep, "coef=0.3,seed=1", coef=0.3, seed=1, dict_size=4, finished=False)  # not trained yet
    for seed in (0, 1):  # each seed draws its own data (the synthetic sources' default): not comparable
        make_job(sweep, f"coef=1.0,seed={seed}", coef=1.0, seed=seed, dict_size=4, decoder=decoders[seed],
                 data={"source": {"seed": "${seed}"}})

    write_report(sweep)

    with (sweep / "report.csv").open() as handle:
        rows = {row["job"]: row for row in csv.DictReader(handle)}
    numbers = {job: (row["consistency.matched_share"], row["consistency.mean_best_cosine"])
               for job, row in rows.items()}
    # seeds 0 and 1: share (1 + 0.5) / 2, mean cosine (1 + 0.65) / 2; seed 2: 0.5 and 0.65 against either
    for seed, (share, mean) in {0: (0.75, 0.825), 1: (0.75, 0.825), 2: (0.5, 0.65)}.items():
        got = numbers[f"coef=0.0,seed={seed}"]
        assert (float(got[0]), float(got[1])) == pytest.approx((share, mean))
    assert numbers["coef=0.3,seed=0"] == numbers["coef=0.3,seed=1"] == numbers["coef=1.0,seed=0"] == ("", "")
    assert COEF_METRICS.search("consistency.matched_share")  # plotted against the coefficient by default
    assert (sweep / "report_coef.png").read_bytes().startswith(b"\x89PNG")
