"""Training rows streamed from the LM (data.mode=stream: c2r/data/stream.py, stream_datamodule.py, modes.py), with
the tiny random-weight Llama on a few sentences, as tests/test_harvest.py does."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from c2r.data import HarvestedShards, Manifest
from c2r.data.lm import load_model
from c2r.data.stream import ActivationStream, StreamError, StreamPosition, heldout_set

from conftest import TINY_JOB, kill_at_first_checkpoint, run_cli
from test_harvest import SENTENCES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def docs(tmp_path) -> Path:
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(24):
            f.write(json.dumps({"text": f"Document {i}. " + " ".join(SENTENCES[i % 8 :] + SENTENCES[: i % 8])}) + "\n")
    return path


def recipe(docs: Path, cache: Path, **overrides) -> HarvestedShards:
    settings = dict(
        model="tiny-random-llama", hook="blocks.0.hook_resid_post", text={"dataset": "jsonl", "data_files": str(docs)},
        context_length=32, tokens=100_000, rows_per_shard=4096, val_shards=1, batch_size=4, dtype="float32",
        context_start="bos", doc_separator="eos", outlier_norm=None, shuffle=False, progress=False, device="cpu",
        cache_dir=cache,
    )
    return HarvestedShards(**{**settings, **overrides})


def stream_of(source: HarvestedShards, lm, **overrides) -> ActivationStream:
    settings = dict(skip_contexts=10, buffer_rows=256, block_rows=64, scale=1.0, seed=0)
    return ActivationStream(source, lm, **{**settings, **overrides})


def test_a_window_holds_the_harvest_rows_of_the_contexts_after_the_skipped_ones(docs, tmp_path):
    source = recipe(docs, tmp_path / "cache")
    harvested = Manifest.load(source.ensure())  # all of the text, in order (shuffle=False)
    rows = np.concatenate([np.load(harvested.path(s.file)) for s in harvested.shards])
    lm = load_model("tiny-random-llama", device="cpu")
    contexts = list(source.contexts(lm))
    before = int(sum((c > 3).sum() for c in contexts[:10]))  # kept rows of the 10 skipped contexts (no specials)

    stream = stream_of(source, lm)
    blocks = stream.blocks()
    window = torch.cat([next(blocks) for _ in range(4)]).numpy()  # 4 blocks of 64 = one window of 256 rows
    blocks.close()
    expected = rows[before : before + 256]
    np.testing.assert_allclose(np.sort(window, axis=0), np.sort(expected, axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(window, expected)  # served in a shuffled order


def test_resuming_at_a_recorded_window_start_serves_the_same_blocks(docs, tmp_path):
    source = recipe(docs, tmp_path / "cache")
    lm = load_model("tiny-random-llama", device="cpu")
    stream = stream_of(source, lm, scale=0.5)
    blocks = stream.blocks()
    uninterrupted = [next(blocks) for _ in range(14)]  # windows 0-3 (4 blocks each), part of the 4th
    starts = dict(stream.window_starts)
    blocks.close()
    assert starts[1] != StreamPosition() and starts[3].batch > starts[1].batch

    resumed = stream_of(source, lm, scale=0.5).blocks(start_step=6, start=starts[1])  # mid-window 1
    for step in range(6, 14):
        torch.testing.assert_close(next(resumed), uninterrupted[step], rtol=0, atol=0)
    resumed.close()


def test_ranks_take_disjoint_shares_of_the_training_contexts(docs, tmp_path):
    source = recipe(docs, tmp_path / "cache")
    lm = load_model("tiny-random-llama", device="cpu")
    single = [c.tobytes() for c in itertools.islice(stream_of(source, lm).training_contexts(), 40)]
    shares = [[c.tobytes() for c in itertools.islice(stream_of(source, lm, rank=r, world_size=2).training_contexts(), 20)]
              for r in range(2)]
    assert not set(shares[0]) & set(shares[1])
    assert shares[0] == single[0::2] and shares[1] == single[1::2]
    skipped = [c.tobytes() for c in list(source.contexts(lm))[:10]]
    assert not set(skipped) & set(single)


def test_the_text_starts_over_when_it_runs_out_and_too_little_text_is_refused(docs, tmp_path, caplog):
    source = recipe(docs, tmp_path / "cache")
    lm = load_model("tiny-random-llama", device="cpu")
    total = len(list(source.contexts(lm)))
    contexts = stream_of(source, lm).training_contexts()
    first_pass = [next(contexts).tobytes() for _ in range(total - 10)]
    assert next(contexts).tobytes() == first_pass[0] and "starting it over" in caplog.text
    with pytest.raises(StreamError, match="no training contexts.*use more text"):
        next(stream_of(source, lm, skip_contexts=total).training_contexts())
    with pytest.raises(StreamError, match="multiple of the 64 rows"):
        stream_of(source, lm, buffer_rows=100)


def test_the_heldout_set_is_a_normalisation_slice_then_a_validation_shard(docs, tmp_path):
    heldout = heldout_set(recipe(docs, tmp_path / "cache"), 128)
    manifest = Manifest.load(heldout.ensure())
    assert [(s.split, s.rows) for s in manifest.shards] == [("train", 128), ("val", 128)]
    assert manifest.normalization_factor > 0


STREAM_JOB = [
    "data=smollm2", "data/text=files", "data.text.dataset=jsonl", "data.source.model=tiny-random-llama",
    "data.source.hook=blocks.1.hook_resid_post", "data.d_in=32", "data.source.context_start=bos",
    "data.source.doc_separator=eos", "data.source.context_length=32", "data.source.progress=false",
    "data.source.device=cpu", "data.mode=stream", "data.stream.buffer_rows=256", "data.stream.heldout_rows=256",
    "data.stream.reserve_contexts=4",
]
STREAM_EVALUATION = ["evaluation.evals=[core,ce_loss]", "evaluation.ce_loss.contexts=4"]


def test_a_streamed_run_trains_validates_on_the_heldout_set_and_records_its_normalisation(compose_train, docs, tmp_path):
    from c2r.train import train

    cfg = compose_train(*STREAM_JOB, *STREAM_EVALUATION, f"data.text.data_files={docs}", *TINY_JOB)
    metrics = train(cfg)
    assert metrics["tokens"] == 2560 and np.isfinite(metrics["fvu"]) and metrics["fvu"] < 1
    run = tmp_path / "run"
    record = json.loads((run / "stream.json").read_text())
    heldout = Manifest.load(record["heldout_shards"])
    assert record["normalization_factor"] == heldout.normalization_factor
    assert record["skip_contexts"] == heldout.source["contexts"] + 4
    # Nothing but the held-out set is on disk: 256 normalisation rows and 256 validation rows.
    assert Path(record["heldout_shards"]).parent == Path(os.environ["C2R_CACHE_DIR"]) / "activations"
    assert heldout.train_rows == 256 and heldout.val_rows == 256
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["data"]["rows"] == 256 and evaluation["data"]["split"] == "val"
    assert evaluation["ce_loss"]["settings"]["after_harvest"] == evaluation["ce_loss"]["settings"]["contexts"] <= 4


def test_a_killed_streamed_job_resumes_to_the_same_weights(docs, tmp_path):
    job = [*STREAM_JOB, f"data.text.data_files={docs}", *TINY_JOB, "train_tokens=10240", "checkpoint_every=15",
           "evaluation=none"]  # 80 steps, windows of 2 blocks: checkpoints at odd steps resume mid-window
    reference = tmp_path / "reference"
    done = run_cli("c2r.train", *job, f"hydra.run.dir={reference}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = tmp_path / "killed"
    state = kill_at_first_checkpoint(job, run_dir, tmp_path)
    assert 0 < state["global_step"] < 80
    assert state["StreamingDataModule"]["step"] == state["global_step"]

    resumed = run_cli("c2r.train", *job, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr + resumed.stdout
    final, expected = (load_file(d / "sae" / "sae_weights.safetensors") for d in (run_dir, reference))
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], msg=name)


def test_streaming_needs_a_language_model_and_reserved_ce_contexts(compose_train, docs):
    from c2r.config_checks import ConfigError
    from c2r.train import train

    with pytest.raises(StreamError, match="data.mode=stream needs a language-model data option"):
        train(compose_train("data=synthetic", "+data.mode=stream", *TINY_JOB))
    for evaluation in (STREAM_EVALUATION[:1], []):  # [core,ce_loss], then evals=auto, with 16 contexts
        job = [*STREAM_JOB, *evaluation]
        with pytest.raises(ConfigError, match="reads 16 held-out contexts.*raise data.stream.reserve_contexts to 16"):
            train(compose_train(*job, f"data.text.data_files={docs}", *TINY_JOB))


def test_a_two_process_ddp_run_streams_one_share_per_rank(docs, tmp_path):
    run_dir = tmp_path / "ddp"
    result = run_cli("c2r.train", *STREAM_JOB, f"data.text.data_files={docs}", *TINY_JOB, "hardware=ddp_cpu",
                     "train_tokens=1920", "evaluation=none", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # The spawned ranks print no library deprecations either (they never run the parent's console setup).
    assert not [line for line in result.stderr.splitlines() if "deprecated" in line], result.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 15  # 64-row halves of 128-row batches
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["StreamingDataModule"]
    # Windows of 256 rows are 4 blocks of 64 per rank: step 15 is in window 3 of each rank's own stream.
    assert state["step"] == 15 and len(state["positions"]) == 2
    assert all(batch > 0 for batch, _ in state["positions"])
