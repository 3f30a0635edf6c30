"""One weight schedule for the SAE's sparsity penalties and the regularizers."""

import pytest

from c2r.regularizers import C2R
from c2r.sae import GatedSAE, ReLUSAE
from c2r.schedule import Schedule


def test_constant_interval_and_start():
    assert [Schedule(0.5).weight(t) for t in (0, 1, 100)] == [0.5, 0.5, 0.5]
    assert [Schedule(0.5, start_step=2, interval=3).weight(t) for t in range(9)] == [0, 0, 1.5, 0, 0, 1.5, 0, 0, 1.5]
    assert all(Schedule(0.0, interval=2).weight(t) == 0 for t in range(6))


def test_warmup_is_linear_from_the_start_step_and_the_last_warmup_step_has_the_full_weight():
    assert [Schedule(1.0, warmup_steps=4).weight(t) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [Schedule(1.0, warmup_steps=2, start_step=3).weight(t) for t in range(6)] == [0, 0, 0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(coef=-1), "l1_coef must be >= 0"),
        (dict(coef=1, warmup_steps=-1), "l1_warmup_steps must be >= 0"),
        (dict(coef=1, start_step=-1), "l1_start_step must be >= 0"),
        (dict(coef=1, interval=0), "l1_interval must be >= 1"),
    ],
)
def test_refused_values_name_the_config_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs, key_prefix="l1_")


def test_sae_penalties_and_regularizers_share_it():
    assert ReLUSAE(4, 8, l1_coef=0.3, l1_warmup_steps=10).l1 == Schedule(0.3, warmup_steps=10)
    assert GatedSAE(4, 8, l1_coef=0.7).l1 == Schedule(0.7)
    assert C2R(coef=2, interval=5, start_step=3).schedule == Schedule(2.0, start_step=3, interval=5)
    with pytest.raises(ValueError, match="l1_warmup_steps must be >= 0"):
        ReLUSAE(4, 8, l1_warmup_steps=-1)
