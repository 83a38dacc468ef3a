"""Fitting the model to the machine (tinychat.train.sizing): shapes parse with one-sentence errors, the
prediction is the loop's own time budget over the measured step time, and the choice is the first shape that
reaches the target, else the fastest."""

from __future__ import annotations

import pytest

from tinychat.errors import UserError
from tinychat.model.config import ModelConfig, resolve
from tinychat.train.config import TrainConfig
from tinychat.train.loop import time_budget
from tinychat.train.sizing import choose_shape, parse_shape, pick, predicted_steps, shape_target


def test_a_shape_is_model_options_as_numbers():
    assert parse_shape("n_layer=2, d_model=192,head_dim=48") == {"n_layer": 2, "d_model": 192, "head_dim": 48}
    assert parse_shape("rope_theta=500000.0") == {"rope_theta": 500000.0}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("layers=2", "not a \\[model\\] option"),
        ("n_layer", "key=value"),
        ("n_layer=two", "not a number"),
        (" , ", "empty"),
    ],
)
def test_a_bad_shape_is_one_sentence(text: str, match: str):
    with pytest.raises(UserError, match=match):
        parse_shape(text)


def test_predicted_steps_are_the_loops_budget_over_the_step_time():
    plain = TrainConfig(max_time=10.0, batch_size=4, seq_len=8)
    assert predicted_steps(plain, 2.0) == 300  # 600 s / 2 s
    reserved = TrainConfig(max_time=10.0, batch_size=4, seq_len=8, reserve_tokens=32 * 50)  # 50 steps' tokens
    assert predicted_steps(reserved, 2.0) == 250  # 100 s kept back at this rate
    assert predicted_steps(reserved, 2.0) == int(time_budget(reserved, 20, 640, 40.0) / 2.0)
    capped = TrainConfig(max_time=10.0, batch_size=4, seq_len=8, reserve_tokens=32 * 500, reserve_cap=0.25)
    assert predicted_steps(capped, 2.0) == 225  # 1,000 s wanted, 150 s allowed
    assert predicted_steps(plain, 2.0, later_seconds=100.0) == 250  # later work priced by the caller
    assert predicted_steps(plain, 2.0, later_seconds=1000.0) == 0  # no time left is no steps, not negative ones


def test_the_first_shape_reaching_the_target_wins_else_the_fastest():
    assert pick([900, 1200, 1500], [0.9, 0.7, 0.5], [800] * 3) == 0
    assert pick([500, 850, 1500], [0.9, 0.7, 0.5], [800] * 3) == 1
    assert pick([500, 600], [0.9, 0.7], [800] * 2) == 1
    assert pick([600, 500], [0.7, 0.9], [800] * 2) == 0  # a ladder out of order: still the fastest
    assert pick([900, 1200], [0.9, 0.7], [1100, 800]) == 1  # the deep shape names a target it misses
    assert pick([1150, 1700], [0.9, 0.7], [1100, 800]) == 0


def test_a_shape_may_name_its_own_target():
    assert shape_target("n_layer=6@1100", 700) == ("n_layer=6", 1100)
    assert shape_target(" n_layer=3 ", 700) == ("n_layer=3", 700)
    assert parse_shape("n_layer=6,d_model=320 @ 1100") == {"n_layer": 6, "d_model": 320}
    for bad in ("n_layer=6@", "n_layer=6@many", "n_layer=6@0", "n_layer=6@-5"):
        with pytest.raises(UserError, match="after '@'"):
            shape_target(bad, 700)


def micro() -> ModelConfig:
    return ModelConfig(d_model=32, n_layer=2, n_head=2, n_kv_head=1, head_dim=16, d_ff=64, max_seq_len=32)


def test_choosing_stops_at_the_first_shape_that_fits():
    """On a CPU the cheapest shape is timed first (the yardstick for the others); the ladder then stops at the
    first that fits, so a shape after it is never timed."""
    train = TrainConfig(max_time=10.0, batch_size=2, seq_len=16, device="cpu")
    record = choose_shape(micro(), train, ["n_layer=2", "n_layer=2,d_ff=32", "n_layer=1"], 1, vocab_size=64)
    assert record["chosen"] == "n_layer=2"
    assert [m["shape"] for m in record["measured"]] == ["n_layer=2", "n_layer=1"]  # the second was never timed
    assert all(m["seconds_per_step"] > 0 for m in record["measured"])


def test_a_shape_short_of_its_own_target_gives_way():
    train = TrainConfig(max_time=10.0, batch_size=2, seq_len=16, device="cpu")
    record = choose_shape(micro(), train, ["n_layer=2@1000000000", "n_layer=1"], 1, vocab_size=64)
    assert [m["shape"] for m in record["measured"]] == ["n_layer=2@1000000000", "n_layer=1"]
    assert record["chosen"] == "n_layer=1" and parse_shape(record["chosen"]) == {"n_layer": 1}
    assert record["measured"][0]["seconds_per_step"] is None  # the cheapest one's step already rules it out


def test_when_no_shape_fits_the_fastest_timed_is_chosen(monkeypatch: pytest.MonkeyPatch):
    import tinychat.train.sizing as sizing

    train = TrainConfig(max_time=0.01, batch_size=2, seq_len=16, device="cpu")
    record = choose_shape(micro(), train, ["n_layer=2", "n_layer=1,d_ff=32"], 10**9, vocab_size=64)
    measured = record["measured"]
    assert [m["shape"] for m in measured] == ["n_layer=2", "n_layer=1,d_ff=32"]
    assert record["chosen"] == "n_layer=1,d_ff=32" and measured[1]["seconds_per_step"] > 0
    assert all(m["predicted_steps"] < 10**9 for m in measured)
    # timed, not bounded (a slack of 0: no bound), the choice is still the faster of the two
    monkeypatch.setattr(sizing, "CPU_FLOPS_SLACK", 0.0)
    monkeypatch.setattr(sizing, "step_seconds", lambda mcfg, train, device: 0.01 * mcfg.n_layer)
    record = choose_shape(micro(), train, ["n_layer=2", "n_layer=1,d_ff=32"], 10**9, vocab_size=64)
    assert [m["seconds_per_step"] for m in record["measured"]] == [0.02, 0.01]
    assert record["chosen"] == "n_layer=1,d_ff=32"


def test_a_larger_shape_the_cheapest_ones_step_rules_out_is_never_timed(monkeypatch: pytest.MonkeyPatch):
    """On a CPU a step takes at least CPU_FLOPS_SLACK of the cheapest shape's, scaled by FLOPs per token: a
    larger shape that even this bound leaves short of its target is not timed, and one it leaves in reach is."""
    import tinychat.train.sizing as sizing

    timed: list[int] = []

    def step(mcfg: ModelConfig, train: TrainConfig, device: object) -> float:
        timed.append(mcfg.n_layer)
        return 0.01 * mcfg.n_layer

    monkeypatch.setattr(sizing, "step_seconds", step)
    train = TrainConfig(max_time=10.0, batch_size=2, seq_len=16, device="cpu")
    two, one = (sizing.flops_per_token(resolve(micro(), vocab_size=64, n_layer=n), 16) for n in (2, 1))
    bound = 0.01 * two / one * sizing.CPU_FLOPS_SLACK  # the least an n_layer=2 step can take
    reach = predicted_steps(train, bound)
    record = choose_shape(micro(), train, [f"n_layer=2@{reach + 1}", "n_layer=1"], 1, vocab_size=64)
    assert timed == [1] and record["measured"][0] == {
        "shape": f"n_layer=2@{reach + 1}",
        "seconds_per_step": None,
        "predicted_steps": reach,
    }
    timed.clear()
    record = choose_shape(micro(), train, [f"n_layer=2@{reach}", "n_layer=1"], 1, vocab_size=64)
    assert timed == [1, 2] and record["measured"][0]["seconds_per_step"] == 0.02
    assert record["chosen"] == "n_layer=1"  # timed: 0.02 s a step leaves it short of the bound's steps


def test_choosing_needs_a_time_budget():
    with pytest.raises(UserError, match="time budget"):
        choose_shape(micro(), TrainConfig(max_steps=10), ["n_layer=1"], 100, vocab_size=64)


def test_later_steps_of_the_shape_are_kept_back_at_its_own_step_time(monkeypatch: pytest.MonkeyPatch):
    """The speedrun's drill and anneal run the chosen shape for a fixed number of steps after pretraining: a
    slower shape pays more for them, so they are priced per shape, not as one fixed number of seconds."""
    import tinychat.train.sizing as sizing

    monkeypatch.setattr(sizing, "step_seconds", lambda mcfg, train, device: 0.01 * mcfg.n_layer)  # deterministic
    train = TrainConfig(max_time=10.0, batch_size=2, seq_len=16, device="cpu")
    record = choose_shape(micro(), train, ["n_layer=2@1000", "n_layer=1"], 1, vocab_size=64, later_steps=500.0)
    for m, sec in zip(record["measured"], (0.02, 0.01), strict=True):
        assert m["later_seconds"] == pytest.approx(500 * sec)
        assert predicted_steps(train, sec) - m["predicted_steps"] == pytest.approx(500, abs=1)


def test_later_work_is_priced_only_for_a_shape_its_own_steps_leave_in_reach(monkeypatch: pytest.MonkeyPatch):
    """The later work's price is a generation probe per shape (2-4 s on a 2-core CPU): a shape that the drill's
    and anneal's steps alone already leave short of its target is not probed, and its prediction is then the
    bound its steps give."""
    import tinychat.train.sizing as sizing

    monkeypatch.setattr(sizing, "step_seconds", lambda mcfg, train, device: 0.01 * mcfg.n_layer)
    priced: list[int] = []

    def later(mcfg: ModelConfig) -> float:
        priced.append(mcfg.n_layer)
        return 1.0

    train = TrainConfig(max_time=10.0, batch_size=2, seq_len=16, device="cpu")
    # 600 s at 0.03 s a step: 20,000 steps, less 19,000 of later steps leaves 1,000 < 5,000 for n_layer=3 (timed:
    # its FLOPs bound, ~0.02 s, leaves it ~10,000)
    shapes = ["n_layer=3@5000", "n_layer=2@5000", "n_layer=1@5000"]
    record = choose_shape(micro(), train, shapes, 1, vocab_size=64, later=later, later_steps=19_000.0)
    assert priced == [1, 2]  # the cheapest, timed first, and n_layer=2; n_layer=3's own steps leave it short
    by_shape = {m["shape"]: m for m in record["measured"]}
    three = by_shape["n_layer=3@5000"]
    assert three["seconds_per_step"] == 0.03 and three["later_seconds"] is None
    assert by_shape["n_layer=3@5000"]["predicted_steps"] == predicted_steps(train, 0.03, 19_000 * 0.03)
    assert by_shape["n_layer=2@5000"]["later_seconds"] == pytest.approx(19_000 * 0.02 + 1.0, abs=0.1)
    assert record["chosen"] == "n_layer=2@5000"
