"""The app's whole-job ETA (eta.JobClock): priced from one measured rate, counting down between progress calls."""
import pytest

from frugal_loraga import Config
from frugal_loraga.eta import JobClock, format_seconds, stage_work


def config(**kw) -> Config:
    return Config(data="x.jsonl", steps=10, batch_size=2, eval_every=0, estimation_samples=8, eval_samples=6, **kw)


def test_stage_work_counts_examples_through_the_network():
    assert stage_work(config()) == {"correction": 8.0, "estimate": 8.0, "training": 10 * 2 + 6 / 3}
    assert stage_work(config(init="lora")) == {"correction": 8.0, "training": 22.0}  # QLoRA on the corrected base
    assert stage_work(config(nf4_error_rank=0)) == {"estimate": 8.0, "training": 22.0}
    assert stage_work(config(load_in_4bit=False, init="lora")) == {"training": 22.0}
    assert stage_work(config(resume=True)) == {"training": 22.0}  # a resumed run skips the init


def test_the_correction_has_a_time_of_its_own_and_prices_what_follows():
    """The correction's groups are its own units: 2 of 4 done in 8 s is 8 s more for it, then its rate (16 s for 8
    examples: 2 s an example) prices the estimate and training."""
    clock = JobClock.for_runs([config()], "cpu")
    clock.update(0, "correcting the 4-bit error", 0, 4, now=0)
    assert clock.seconds_left(now=0) is None
    clock.update(0, "correcting the 4-bit error", 2, 4, now=8)
    assert clock.seconds_left(now=8) == pytest.approx(8 + 2 * (8 + 22))
    clock.update(0, "estimating gradients", 0, 4, now=16)
    assert clock.seconds_left(now=16) == pytest.approx(2 * (8 + 22))


def test_the_estimate_prices_the_training_and_the_baseline_run():
    clock = JobClock.for_runs([config(nf4_error_rank=0), config(init="lora", nf4_error_rank=0)], "cpu")
    clock.update(0, "loading the model", 0, 0, now=0)
    assert clock.seconds_left(now=1) is None  # nothing measured yet
    clock.update(0, "estimating gradients", 0, 4, now=10)
    clock.update(0, "estimating gradients", 1, 4, now=12)  # 2 s a unit of 2 examples: 1 s an example
    assert clock.seconds_left(now=12) == pytest.approx(3 * 2 + 22 + 22)
    assert clock.seconds_left(now=20) == pytest.approx(3 * 2 + 22 + 22 - 8)  # counts down while a unit runs


def test_training_goes_at_its_own_pace_after_a_compile():
    clock = JobClock.for_runs([config(nf4_error_rank=0), config(init="lora", nf4_error_rank=0)], "cpu")
    clock.update(0, "estimating gradients", 0, 4, now=0)
    clock.update(0, "estimating gradients", 4, 4, now=8)  # 1 s an example
    clock.update(0, "compiling the decoder layers", 0, 10, now=8)
    clock.update(0, "training", 1, 10, now=60)  # the compile took 52 s: not a pace
    assert clock.seconds_left(now=60) == pytest.approx(22 * 9 / 10 + 22)
    clock.update(0, "training", 2, 10, now=64)  # 4 s a step: 22 examples' work in 10 steps at 40 s
    assert clock.seconds_left(now=64) == pytest.approx(8 * 4 + 40)
    clock.update(1, "loading data", 0, 0, now=100)
    assert clock.seconds_left(now=100) == pytest.approx(40)


def test_the_evaluation_before_the_first_step_is_not_a_step():
    """Training reports its start again after the evaluation at step 0: the steps' pace is timed from there."""
    clock = JobClock.for_runs([config(init="lora", nf4_error_rank=0)], "cpu")
    clock.update(0, "training", 0, 10, now=0)
    clock.update(0, "training", 0, 10, now=30)  # the evaluation at step 0 took 30 s
    clock.update(0, "training", 1, 10, now=34)
    assert clock.seconds_left(now=34) == pytest.approx(9 * 4)


def test_format_seconds():
    assert [format_seconds(s) for s in (0.2, 59, 90, 4000)] == ["1 s", "59 s", "1 min 30 s", "1 h 6 min"]
