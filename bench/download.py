"""Deadlines for every download: a total time limit and a minimum average rate after a grace period.

A socket timeout alone only bounds the wait for the *next* byte: a server that drips one byte every two seconds
never trips it, and a 170 MB archive would take days. :class:`TransferGuard` is checked after every read; it ends
a transfer whose average rate, once the grace period is over, is below the minimum, or that has run past the
total deadline. Limits come from the environment, so a user on a slow link can widen them without code:

- ``BENCH_DOWNLOAD_MIN_RATE``: bytes per second, averaged since the start (default 20 KiB/s);
- ``BENCH_DOWNLOAD_GRACE_S``: seconds before the rate is judged (default 60, for slow starts and redirects);
- ``BENCH_DOWNLOAD_DEADLINE_S``: total seconds for one file, all attempts together (default 6 hours).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

ENV_MIN_RATE = "BENCH_DOWNLOAD_MIN_RATE"
ENV_GRACE = "BENCH_DOWNLOAD_GRACE_S"
ENV_DEADLINE = "BENCH_DOWNLOAD_DEADLINE_S"


class DownloadTooSlowError(RuntimeError):
    """A transfer ran past its deadline or below the minimum rate; the message names the limit and the fix."""


def _env_float(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"${name}={text!r} is not a number; unset it or give e.g. {default:g}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"${name}={text!r} must be a positive, finite number; unset it or give e.g. {default:g}")
    return value


@dataclass(frozen=True)
class DownloadLimits:
    """How slow and how long a download may be (module docstring)."""

    min_rate: float = 20 * 1024
    grace_s: float = 60.0
    deadline_s: float = 6 * 3600.0

    @classmethod
    def from_env(cls) -> DownloadLimits:
        return cls(
            min_rate=_env_float(ENV_MIN_RATE, cls.min_rate),
            grace_s=_env_float(ENV_GRACE, cls.grace_s),
            deadline_s=_env_float(ENV_DEADLINE, cls.deadline_s),
        )


def _human_rate(rate: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if rate < 1024 or unit == "MiB":
            return f"{rate:.1f} {unit}/s" if unit != "B" else f"{rate:.2f} B/s"
        rate /= 1024
    raise AssertionError("unreachable")


class TransferGuard:
    """Checks one file's transfer (over all its attempts) against :class:`DownloadLimits`.

    Args:
        url: what is being downloaded (for the message).
        fix: what the user can do instead (for the message), e.g. "put the archive in --data-dir".
        limits: the limits; default from the environment.
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        url: str,
        *,
        fix: str,
        limits: DownloadLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url, self.fix = url, fix
        self.limits = limits or DownloadLimits.from_env()
        self._clock = clock
        self._start = clock()
        self.received = 0

    def elapsed(self) -> float:
        return self._clock() - self._start

    def socket_timeout(self, default: float) -> float:
        """The socket timeout for the next connection or read: never past the deadline."""
        return max(0.1, min(default, self.limits.deadline_s - self.elapsed()))

    def update(self, n_bytes: int) -> None:
        """Count ``n_bytes`` more and raise :class:`DownloadTooSlowError` when a limit is broken."""
        self.received += n_bytes
        self.check()

    def check(self) -> None:
        elapsed = self.elapsed()
        how = f"{self.received:,} bytes in {elapsed:.0f} s"
        if elapsed > self.limits.deadline_s:
            raise DownloadTooSlowError(
                f"downloading {self.url} took longer than the {self.limits.deadline_s:.0f} s deadline ({how}); "
                f"{self.fix}, or raise ${ENV_DEADLINE}"
            )
        if elapsed > self.limits.grace_s:
            rate = self.received / elapsed
            if rate < self.limits.min_rate:
                raise DownloadTooSlowError(
                    f"downloading {self.url} is too slow: {how} ({_human_rate(rate)}), below the minimum of "
                    f"{_human_rate(self.limits.min_rate)} after {self.limits.grace_s:.0f} s; {self.fix}, or lower "
                    f"${ENV_MIN_RATE}"
                )
