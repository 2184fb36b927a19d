import math

import pytest

from graspext.dst import SET, RigL
from graspext.dst.schedule import UpdateSchedule, drop_fraction, num_to_drop, update_steps
from graspext.testing.official_rigl import cosine_drop_fraction_official, is_mask_update_iter_official


@pytest.mark.parametrize("begin,end,freq", [(0, 750, 100), (0, 0, 100), (5, 93, 7), (10, 10, 1), (0, 1000, 1)])
def test_stateful_schedule_is_the_closed_form_and_the_official_condition(begin, end, freq):
    schedule, official_last, updates = UpdateSchedule(begin, end, freq), -freq, []
    for t in range(end + 3 * freq + 5):
        mine = schedule.is_update(t)
        assert mine == is_mask_update_iter_official(t, official_last, begin, end, freq), t
        if mine:
            schedule.done(t)
            official_last = t
            updates.append(t)
    assert updates == update_steps(begin, end, freq)
    assert updates[0] == begin  # the first update is at begin_step itself (official: last_update starts at -ΔT)
    assert all(t <= end for t in updates)  # none after end_step


def test_cosine_drop_fraction_matches_tf_cosine_decay():
    for t in range(0, 1200, 37):
        assert drop_fraction(t, 0.3, "cosine", 0, 1000) == pytest.approx(cosine_drop_fraction_official(t, 0.3, 0, 1000),
                                                                          rel=1e-5, abs=1e-8)  # TF runs in float32
        expected = 0.3 / 2 * (1 + math.cos(math.pi * min(t, 1000) / 1000))
        assert drop_fraction(t, 0.3, "cosine", 0, 1000) == pytest.approx(expected, abs=1e-12)
    assert drop_fraction(0, 0.3, "cosine", 0, 1000) == pytest.approx(0.3)
    assert drop_fraction(1000, 0.3, "cosine", 0, 1000) == pytest.approx(0.0, abs=1e-12)
    assert drop_fraction(500, 0.1, "constant", 0, 1000) == 0.1
    # On the global step, not the step since begin (TF passes global_step to cosine_decay).
    assert drop_fraction(50, 0.3, "cosine", 50, 150) == pytest.approx(0.15, abs=1e-12)


def test_num_to_drop_truncates_in_float32():
    assert num_to_drop(10, 0.3) == 3
    assert num_to_drop(7, 0.5) == 3
    assert num_to_drop(0, 0.3) == 0
    assert num_to_drop(1000, 0.0) == 0


def test_end_step_defaults_to_three_quarters_and_must_lie_within_the_training():
    assert RigL().resolved_end_step(1000) == 750
    assert RigL(end_fraction=0.5).resolved_end_step(1000) == 500
    assert RigL(end_step=999).resolved_end_step(1000) == 999
    with pytest.raises(ValueError, match="end_step 1000 lies beyond the training"):
        RigL(end_step=1000).resolved_end_step(1000)
    with pytest.raises(ValueError, match="begin_step 1000 lies beyond"):
        RigL(begin_step=1000, end_step=1000).resolved_end_step(1000)
    with pytest.raises(ValueError, match="give end_step"):
        RigL().resolved_end_step(None)


@pytest.mark.parametrize("kwargs,match", [
    ({"frequency": 0}, "frequency must be an int >= 1"),
    ({"frequency": -5}, "frequency must be an int >= 1"),
    ({"frequency": 1.5}, "frequency must be an int"),
    ({"drop_fraction": 0.0}, r"drop_fraction must be a number in \(0, 1\)"),
    ({"drop_fraction": 1.0}, r"drop_fraction must be a number in \(0, 1\)"),
    ({"drop_fraction": float("nan")}, "drop_fraction"),
    ({"drop_fraction_anneal": "linear"}, "drop_fraction_anneal must be one of"),
    ({"end_step": -1}, "end_step must be an int >= 0"),
    ({"begin_step": 10, "end_step": 5}, "end_step must be >= begin_step"),
    ({"end_fraction": 0.0}, "end_fraction"),
    ({"grow_init": "ones"}, "grow_init must be"),
    ({"grow_init": "random_normal_0"}, "divisor must not be zero"),
    ({"noise_std": -1.0}, "noise_std must be"),
])
def test_bad_settings_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RigL(**kwargs)


def test_flags_must_be_booleans():
    with pytest.raises(TypeError, match="reinit_when_same must be True or False"):
        RigL(reinit_when_same=1)
    with pytest.raises(TypeError, match="update_replaces_step must be True or False"):
        SET(update_replaces_step="no")


def test_set_has_no_gradient_to_grow_from():
    with pytest.raises(ValueError, match="only RigL computes"):
        SET(grow_init="grad_scale")
    assert RigL(grow_init="grad_scale_2").grow_init == "grad_scale_2"
    assert RigL().update_replaces_step and not SET().update_replaces_step
