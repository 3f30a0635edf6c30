"""The data options compose from one base per kind of source."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).parents[1]


LM_DATA = {"smollm2": 576, "gpt2": 768, "pythia-70m-deduped": 512, "gemma-2-2b": 2304}


@pytest.mark.parametrize("data, d_in", LM_DATA.items())
def test_every_lm_data_config_is_the_shared_base_plus_its_own_settings(compose_train, data, d_in):
    """The four LM data options extend conf/data/base/lm.yaml: everything the base leaves open (???) is set, the
    shared settings come from the base, and each option keeps its own model, hook and width."""
    base = OmegaConf.load(ROOT / "conf" / "data" / "base" / "lm.yaml")
    cfg = compose_train(f"data={data}").data
    assert OmegaConf.missing_keys(cfg) == set()
    assert cfg.d_in == d_in and cfg.source._target_ == "c2r.data.HarvestedShards" and cfg.mode == "shards"
    assert set(cfg.source) == set(base.source) and set(cfg) == set(base) | {"text"}
    assert OmegaConf.is_missing(base.source, "model") and cfg.source.model and cfg.source.drop_special is True
