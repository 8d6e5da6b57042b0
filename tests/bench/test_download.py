"""The download limits: a total deadline and a minimum average rate after a grace period."""

from __future__ import annotations

import pytest

from bench.download import DownloadLimits, DownloadTooSlowError, TransferGuard


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def guard(clock, **limits) -> TransferGuard:
    return TransferGuard("http://x/f", fix="use --from FILE", limits=DownloadLimits(**limits), clock=clock)


def test_the_rate_is_judged_only_after_the_grace_period():
    clock = Clock()
    g = guard(clock, min_rate=100, grace_s=10, deadline_s=1000)
    clock.now += 9
    g.update(1)  # 0.1 B/s, but still in the grace period
    clock.now += 2
    with pytest.raises(DownloadTooSlowError, match=r"too slow: 2 bytes in 11 s .*minimum of 100.00 B/s") as raised:
        g.update(1)
    assert "use --from FILE" in str(raised.value) and "BENCH_DOWNLOAD_MIN_RATE" in str(raised.value)


def test_a_fast_enough_transfer_passes_and_the_deadline_still_holds():
    clock = Clock()
    g = guard(clock, min_rate=100, grace_s=1, deadline_s=50)
    for _ in range(49):
        clock.now += 1
        g.update(1000)
    clock.now += 2
    with pytest.raises(DownloadTooSlowError, match="longer than the 50 s deadline"):
        g.update(1000)


def test_socket_timeout_never_reaches_past_the_deadline():
    clock = Clock()
    g = guard(clock, deadline_s=30)
    assert g.socket_timeout(60) == 30
    clock.now += 29.5
    assert g.socket_timeout(60) == pytest.approx(0.5)


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf"])
def test_bad_limits_in_the_environment_are_named(monkeypatch, value):
    monkeypatch.setenv("BENCH_DOWNLOAD_MIN_RATE", value)
    with pytest.raises(ValueError, match=r"\$BENCH_DOWNLOAD_MIN_RATE"):
        DownloadLimits.from_env()


def test_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("BENCH_DOWNLOAD_GRACE_S", "5")
    monkeypatch.setenv("BENCH_DOWNLOAD_DEADLINE_S", "7.5")
    limits = DownloadLimits.from_env()
    assert (limits.grace_s, limits.deadline_s, limits.min_rate) == (5.0, 7.5, DownloadLimits.min_rate)
