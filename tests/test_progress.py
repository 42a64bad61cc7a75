"""Progress a user can follow in a log file: counts, rate and ETA at every tenth and every
interval when stderr is not a terminal (mmcn.logs.Progress), from the long stages' loops
(the detector's training here), and one line per training epoch with its ETA."""
from __future__ import annotations

import logging
import threading

import pytest

from mmcn import logs
from mmcn.logs import Progress, duration


class Clock:
    """time.perf_counter for mmcn.logs, advanced by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(logs.time, "perf_counter", c)
    return c


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.progress"]


def test_a_log_line_at_every_tenth_with_counts_rate_and_eta(clock, caplog):
    caplog.set_level(logging.INFO, logger="test.progress")
    bar = Progress(50, "lmdb train", "img", logging.getLogger("test.progress"), interval=1e9, tty=False)
    for _ in range(50):
        clock.now += 2.0  # 2 s per image: 0.5 img/s
        bar.update()
    bar.close()
    got = lines(caplog)
    # every 5 images (a tenth of 50): done k, elapsed 2k s, rate 0.5/s, ETA (50 - k) x 2 s; then the final line
    expected = [f"lmdb train: {k}/50 img ({2 * k}%) in {duration(2 * k)}, 2 s/img, ETA {duration(2 * (50 - k))}"
                for k in range(5, 50, 5)]
    assert got == expected + ["lmdb train: 50/50 img (100%) in 1m40s, 2 s/img"]
    assert expected[0] == "lmdb train: 5/50 img (10%) in 10s, 2 s/img, ETA 1m30s"


def test_a_line_every_interval_without_a_total_and_postfix_shown(clock, caplog):
    caplog.set_level(logging.INFO, logger="test.progress")
    bar = Progress(None, "train detector", "step", logging.getLogger("test.progress"), interval=30, tty=False)
    for step in range(10):
        clock.now += 10.0
        bar.update(1, loss=f"{1 / (step + 1):.3f}")
    # a line once 30 s have passed since the last one: after steps 3, 6 and 9
    assert lines(caplog) == ["train detector: 3 step in 30s, 10 s/step, loss=0.333",
                             "train detector: 6 step in 1m00s, 10 s/step, loss=0.167",
                             "train detector: 9 step in 1m30s, 10 s/step, loss=0.111"]


def test_warmup_leaves_startup_out_of_the_rate_and_tenths_false_keeps_intervals_only(clock, caplog):
    caplog.set_level(logging.INFO, logger="test.progress")
    bar = Progress(100, "features", "img", logging.getLogger("test.progress"), interval=60, tty=False,
                   tenths=False, final=False, warmup=True)
    clock.now += 500  # actors starting
    bar.update(1)  # the first result: the rate counts from here
    for _ in range(40):
        clock.now += 4.0  # 0.25 img/s once running
        bar.update(1)
    bar.close()
    # no tenth lines, no final line: one line per 60 s (15 images), rate from the first result
    assert lines(caplog) == [f"features: {n}/100 img ({n}%) in {duration(500 + 4 * (n - 1))}, 4 s/img, "
                             f"ETA {duration(4 * (100 - n))}" for n in (16, 31)]


def test_iterate_counts_what_is_taken_and_closes(clock, caplog):
    caplog.set_level(logging.INFO, logger="test.progress")
    bar = Progress(None, "translate test", "img", logging.getLogger("test.progress"), interval=1e9, tty=False)
    def images():
        for k in range(7):
            clock.now += 1.0
            yield k

    assert list(bar.iterate(images())) == list(range(7))
    assert bar.done == 7 and lines(caplog) == ["translate test: 7 img in 7s, 1 img/s"]


def test_threads_may_share_one(clock):
    bar = Progress(4000, "lmdb", "img", logging.getLogger("test.progress"), tty=False)
    workers = [threading.Thread(target=lambda: [bar.update() for _ in range(1000)]) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert bar.done == 4000


def test_durations_read_as_a_person_writes_them():
    assert [duration(s) for s in (0, 59.4, 60, 185, 3599, 3600, 7620)] == \
        ["0s", "59s", "1m00s", "3m05s", "59m59s", "1h00m", "2h07m"]


def test_the_training_epoch_line_carries_its_rate_and_eta():
    from mmcn.train.loop import _epoch_timing

    # 40 of 200 steps (20 per epoch) in 24 s: 0.6 s/step -> 12 s/epoch, 160 steps left -> 96 s
    assert _epoch_timing(40, 200, 20, resumed=0, seconds=24.0) == "12s/epoch, ETA 1m36s"
    # resumed at step 100: only this run's 20 steps count for the rate (30 s -> 1.5 s/step)
    assert _epoch_timing(120, 200, 20, resumed=100, seconds=30.0) == "30s/epoch, ETA 2m00s"
    assert _epoch_timing(200, 200, 20, resumed=0, seconds=125.0) == "12s/epoch, done in 2m05s"


def test_detector_training_logs_progress_when_not_on_a_terminal(caplog, monkeypatch):
    """The real loop: 2 images, batch 1, 2 epochs = 4 steps, each past a tenth: a line per step
    (but the last) with the step count, ETA, epoch and loss, then the final line."""
    import torch

    from mmcn.vision.config import detector_config
    from mmcn.vision.detector import build_detector
    from mmcn.vision.train import DetectorTrainConfig, Sample, train_detector

    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    torch.manual_seed(0)
    model = build_detector(detector_config("small"))
    classes = len(model.config.classes)
    samples = [Sample(i, torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8),
                      torch.tensor([[8.0, 8.0, 40.0, 40.0]]), torch.tensor([1 + i % classes]),
                      torch.zeros((1, 1), dtype=torch.int64)) for i in range(2)]
    caplog.set_level(logging.INFO, logger="mmcn.vision.train")
    train_detector(model, samples, DetectorTrainConfig(epochs=2, batch_size=1, warmup_steps=1))
    got = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train detector:")]
    assert [g.split(" in ")[0] for g in got] == [f"train detector: {k}/4 step ({25 * k}%)" for k in (1, 2, 3, 4)]
    assert all("ETA" in g for g in got[:3]) and "ETA" not in got[3]
    assert "epoch=1/2" in got[0] and "epoch=2/2" in got[2] and "loss=" in got[3]
