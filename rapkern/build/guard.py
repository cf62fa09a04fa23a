"""Leakage guard and audit log: the prior may only ever see training rows.

Every labelled call (fit, scores, full cycle) is fingerprinted row by row: by the caller's row ids when given,
and always by a hash of each window's content, so a validation or test window handed over again is caught even
without ids (or under other ids). Declared holdouts are checked against every later call, and a holdout declared
after a fit is checked against the rows already seen.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform

import numpy as np


class LeakageError(ValueError):
    """A labelled step was asked to use rows of a declared validation or test split."""


def window_hashes(X: np.ndarray) -> list[bytes]:
    """One 16-byte content hash per window of ``X`` (samples, ...), taken on the float64 bytes."""
    X = np.ascontiguousarray(X, dtype=np.float64)
    return [hashlib.blake2b(w.tobytes(), digest_size=16).digest() for w in X]


def normalize_rows(rows, n: int, name: str = "rows") -> list | None:
    """Row ids as a list of hashable Python scalars, or None; length must match the samples."""
    if rows is None:
        return None
    arr = np.asarray(rows)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one id per sample), got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{name} must have one id per sample ({n}), got {arr.shape[0]}")
    return arr.tolist()


def _digest(hashes: list[bytes]) -> str:
    h = hashlib.sha256()
    for x in sorted(hashes):
        h.update(x)
    return h.hexdigest()[:16]


class LeakageGuard:
    """Fingerprints of the rows seen by labelled steps and of the declared holdouts."""

    def __init__(self):
        self.seen_ids: set = set()
        self.seen_hashes: set = set()
        self.holdouts: dict[str, tuple[set, set]] = {}

    @staticmethod
    def _overlap(ids, hashes, hold_ids, hold_hashes) -> int:
        """Rows matching by id or by content (either list may be missing: None or empty)."""
        n_rows = max(len(ids or ()), len(hashes or ()))
        return sum(
            1 for i in range(n_rows)
            if (hashes and hashes[i] in hold_hashes) or (ids is not None and ids[i] in hold_ids)
        )

    def check(self, ids, hashes, what: str) -> None:
        """Raise LeakageError if any row overlaps a declared holdout, naming how many do."""
        for name, (hold_ids, hold_hashes) in self.holdouts.items():
            n = self._overlap(ids, hashes, hold_ids, hold_hashes)
            if n:
                raise LeakageError(
                    f"{what}: {n} of {max(len(ids or ()), len(hashes))} rows overlap the declared holdout {name!r} "
                    f"(matched by row id or by window content); fit the prior on training rows only"
                )

    def record(self, ids, hashes) -> None:
        self.seen_hashes.update(hashes)
        if ids is not None:
            self.seen_ids.update(ids)

    def declare(self, name: str, ids, hashes) -> None:
        """Add a holdout; raise if the builder has already used any of its rows."""
        n = self._overlap(ids, hashes, self.seen_ids, self.seen_hashes)
        if n:
            raise LeakageError(
                f"declare_holdout({name!r}): {n} of {max(len(ids or ()), len(hashes))} rows were already used "
                f"to fit this builder; refit it on training rows only"
            )
        hold_ids, hold_hashes = self.holdouts.setdefault(name, (set(), set()))
        hold_hashes.update(hashes)
        if ids is not None:
            hold_ids.update(ids)


class AuditLog:
    """What was fit on which rows with which parameters: a list of JSON-able entries."""

    def __init__(self):
        self.entries: list[dict] = []

    def add(self, action: str, *, hashes=None, ids=None, y=None, params=None, **extra) -> dict:
        entry = {
            "action": action,
            "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if hashes is not None:
            entry["n_rows"] = len(hashes)
            entry["rows_digest"] = _digest(hashes)
            entry["row_ids_given"] = ids is not None
        if y is not None:
            entry["n_events"] = int(np.sum(y))
        if params is not None:
            entry["params"] = dict(params)
        entry.update(extra)
        self.entries.append(entry)
        return entry

    def to_json(self) -> str:
        return json.dumps({"python": platform.python_version(), "entries": self.entries}, indent=2, default=str)
