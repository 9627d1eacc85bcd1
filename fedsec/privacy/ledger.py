"""A privacy ledger: the rounds a participant has spent, checked against a budget.

A client running DP-SGD keeps a :class:`PrivacyLedger` in its persistent
``context.state`` (as a Flower ``ConfigRecord``, via :meth:`PrivacyLedger.to_config`)
and, before each round, asks whether the round fits::

    ledger = PrivacyLedger.from_config(state)        # or PrivacyLedger(3.0, 1e-5)
    exceeds, epsilon_after = ledger.would_exceed(sigma, q, steps)
    if exceeds:
        reason = ledger.refusal_reason(sigma, q, steps)  # one line, for the reply
    else:
        ...train...
        ledger.record(sigma, q, steps)

Epsilon is computed from the whole history by Opacus's accountants (see
:mod:`fedsec.privacy.accounting`): composition across rounds is exact in RDP
(Mironov, "Rényi Differential Privacy", CSF 2017) and in PRV (Gopi, Lee,
Wutschitz, NeurIPS 2021), rather than a sum of per-round epsilons.

A ledger that must outlive its process (a SuperNode restarted, a simulation
killed and resumed) is kept in a :class:`LedgerFile`: one JSON document per
participant, replaced atomically (temporary file in the same folder, ``fsync``,
``os.replace``, ``fsync`` of the folder), carrying a SHA-256 digest of its
contents and checked field by field when read back. The digest catches
truncation, corruption and careless hand edits, not a forger: whoever can
write the file owns the participant's machine (and its data) anyway.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsec.privacy.accounting import (
    Accountant,
    HistoryEntry,
    check_accountant,
    check_delta,
    check_entry,
    epsilon_for_history,
)

#: Type of :meth:`PrivacyLedger.to_config`: what a Flower ``ConfigRecord`` holds.
ConfigValue = int | float | str | list[float] | list[int]

_KEYS = ("epsilon_budget", "delta", "accountant", "noise_multipliers", "sample_rates", "steps")


def _format_pair(spent: float, budget: float) -> tuple[str, str]:
    """Format two epsilons with 2 decimals, more if needed to tell them apart."""
    for digits in range(2, 10):
        a, b = f"{spent:.{digits}f}", f"{budget:.{digits}f}"
        if a != b:
            return a, b
    return f"{spent!r}", f"{budget!r}"


@dataclass
class PrivacyLedger:
    """Privacy budget and spending history of one participant.

    Parameters
    ----------
    epsilon_budget : float
        Total epsilon the participant accepts to spend (> 0).
    delta : float
        The delta at which epsilon is computed, in (0, 1).
    accountant : {"rdp", "prv"}
        Opacus accountant used (see :mod:`fedsec.privacy.accounting`).
    history : list of (noise_multiplier, sample_rate, steps)
        One entry per recorded round: the round ran ``steps`` steps of the
        Poisson-subsampled Gaussian mechanism (DP-SGD; Abadi et al., CCS 2016)
        with that noise multiplier and sampling rate.

    Notes
    -----
    :meth:`spent` caches its value for the current history; the cache is
    invalidated by :meth:`record` (mutate ``history`` through :meth:`record` only).
    """

    epsilon_budget: float
    delta: float
    accountant: Accountant = "rdp"
    history: list[HistoryEntry] = field(default_factory=list)
    _cache: tuple[int, float] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        budget = self.epsilon_budget
        if isinstance(budget, bool) or not isinstance(budget, int | float):
            raise ValueError(f"epsilon_budget must be a number, got {budget!r}")
        if not math.isfinite(budget) or budget <= 0:
            raise ValueError(f"epsilon_budget must be finite and > 0, got {budget!r}")
        self.epsilon_budget = float(budget)
        self.delta = check_delta(self.delta)
        self.accountant = check_accountant(self.accountant)
        self.history = [check_entry(*entry) for entry in self.history]

    def spent(self) -> float:
        """Epsilon spent so far by the recorded rounds (0.0 before the first)."""
        key = len(self.history)
        if self._cache is None or self._cache[0] != key:
            epsilon = epsilon_for_history(
                self.history, delta=self.delta, accountant=self.accountant
            )
            self._cache = (key, epsilon)
        return self._cache[1]

    def remaining(self) -> float:
        """Budget left, ``max(0, epsilon_budget - spent())``."""
        return max(0.0, self.epsilon_budget - self.spent())

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon spent once a round with these parameters is added to the history."""
        entry = check_entry(noise_multiplier, sample_rate, steps)
        return epsilon_for_history(
            [*self.history, entry], delta=self.delta, accountant=self.accountant
        )

    def would_exceed(
        self, noise_multiplier: float, sample_rate: float, steps: int
    ) -> tuple[bool, float]:
        """Whether a round with these parameters would exceed the budget.

        Returns
        -------
        (bool, float)
            ``(epsilon_after > epsilon_budget, epsilon_after)``, with
            ``epsilon_after`` the epsilon spent after that round.
        """
        epsilon = self.epsilon_after(noise_multiplier, sample_rate, steps)
        return epsilon > self.epsilon_budget, epsilon

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Append a round that was run to the history and return the epsilon now spent.

        Recording does not enforce the budget (the round has happened); check
        :meth:`would_exceed` before running it.
        """
        self.history.append(check_entry(noise_multiplier, sample_rate, steps))
        return self.spent()

    def refusal_reason(self, noise_multiplier: float, sample_rate: float, steps: int) -> str:
        """The one-line message for refusing a round that would exceed the budget.

        Format (epsilons with 2 decimals, more when needed to tell them apart)::

            privacy budget exhausted: next round would spend epsilon 3.41 > budget 3.00
            (delta 1e-05, rdp)

        on one line, where 3.41 is the cumulative epsilon after the round.

        Raises
        ------
        ValueError
            If the round would not exceed the budget.
        """
        exceeds, epsilon = self.would_exceed(noise_multiplier, sample_rate, steps)
        if not exceeds:
            raise ValueError(
                f"the round fits the budget (epsilon {epsilon:.4f} <= "
                f"{self.epsilon_budget:.4f}); there is nothing to refuse"
            )
        spent, budget = _format_pair(epsilon, self.epsilon_budget)
        return (
            f"privacy budget exhausted: next round would spend epsilon {spent} > "
            f"budget {budget} (delta {self.delta:g}, {self.accountant})"
        )

    def to_config(self) -> dict[str, ConfigValue]:
        """The ledger as ``ConfigRecord`` values: scalars and flat lists only.

        Keys: ``epsilon_budget``, ``delta`` (float), ``accountant`` (str),
        ``noise_multipliers``, ``sample_rates`` (list of float) and ``steps``
        (list of int), the history column by column.
        """
        return {
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "accountant": self.accountant,
            "noise_multipliers": [float(sigma) for sigma, _, _ in self.history],
            "sample_rates": [float(q) for _, q, _ in self.history],
            "steps": [int(steps) for _, _, steps in self.history],
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PrivacyLedger:
        """Rebuild a ledger from :meth:`to_config`'s values (or a ``ConfigRecord``).

        Raises
        ------
        ValueError
            If a key is missing or the history columns differ in length.
        """
        missing = [key for key in _KEYS if key not in config]
        if missing:
            raise ValueError(f"privacy ledger config lacks {', '.join(missing)}")
        columns = [list(config[key]) for key in ("noise_multipliers", "sample_rates", "steps")]
        if len({len(column) for column in columns}) != 1:
            raise ValueError(
                "privacy ledger config has history columns of different lengths: "
                f"{', '.join(str(len(column)) for column in columns)}"
            )
        return cls(
            epsilon_budget=config["epsilon_budget"],
            delta=config["delta"],
            accountant=config["accountant"],
            history=[(float(s), float(q), int(t)) for s, q, t in zip(*columns, strict=True)],
        )


# ---- durable ledger file ---------------------------------------------------------------

#: ``format`` field of a ledger file.
LEDGER_FORMAT = "fedsec-privacy-ledger"
#: ``version`` field of the ledger files this code writes and reads.
LEDGER_VERSION = 1
#: Largest ledger file read back (about 200,000 rounds); a bigger one is refused
#: unread, so a file pointing at a device or a huge file costs nothing.
MAX_LEDGER_BYTES = 16 * 1024 * 1024
_FILE_KEYS = frozenset(
    {
        "format",
        "version",
        "partition",
        "epsilon_budget",
        "delta",
        "accountant",
        "history",
        "epsilon_spent",
        "sha256",
    }
)


class LedgerFileError(ValueError):
    """A ledger file that cannot be used: unreadable, malformed or altered (one line)."""


def _digest(body: Mapping[str, Any]) -> str:
    # Canonical JSON: Python writes floats with repr, which reads back to the same float.
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name}")


class LedgerFile:
    """The durable copy of one participant's :class:`PrivacyLedger`.

    Parameters
    ----------
    path : Path
        The JSON file; its folder must exist.
    partition : int
        The participant the ledger belongs to (a client's partition id). The
        file records it and a file of another partition is refused, so a file
        copied or renamed by mistake is not silently spent from.

    Notes
    -----
    The file holds ``format``, ``version``, ``partition``, the ledger's
    ``epsilon_budget``, ``delta``, ``accountant`` and ``history`` (a list of
    ``[noise_multiplier, sample_rate, steps]``), ``epsilon_spent`` (for people
    reading it; recomputed, never trusted, on load) and ``sha256``, the digest
    of every other field as canonical JSON. Concurrent writers (two messages
    for one node at once) serialise on :meth:`locked`, an advisory
    ``fcntl.flock`` on ``<file>.lock`` that the OS releases if the process dies.
    """

    def __init__(self, path: Path, partition: int) -> None:
        self.path = Path(path)
        self.partition = int(partition)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the ledger's exclusive lock (blocking) for a load-spend-save cycle."""
        try:
            import fcntl
        except ImportError:  # Windows: no flock; one message per node at a time there
            yield
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def exists(self) -> bool:
        """Whether the file is there (a broken link counts as there, and fails on load)."""
        return self.path.is_symlink() or self.path.exists()

    def load(self) -> PrivacyLedger | None:
        """The stored ledger, or None when there is no file.

        Raises
        ------
        LedgerFileError
            If the file is not a regular file, is larger than
            :data:`MAX_LEDGER_BYTES`, is not valid JSON, or any field is
            missing, unknown, of the wrong type or out of range, names another
            partition, or does not match its digest.
        """
        # No following links (the file is replaced on save, a link would be lost anyway)
        # and no blocking on a FIFO: refuse anything but a regular file, unread.
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            if self.path.is_symlink():
                raise LedgerFileError(
                    f"privacy ledger {self.path} is a broken symbolic link"
                ) from None
            return None
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise LedgerFileError(
                    f"privacy ledger {self.path} is a symbolic link, not a regular file"
                ) from None
            raise LedgerFileError(
                f"privacy ledger {self.path} cannot be read: {err.strerror or err}"
            ) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise LedgerFileError(f"privacy ledger {self.path} is not a regular file")
            with os.fdopen(fd, "rb", closefd=False) as handle:
                raw = handle.read(MAX_LEDGER_BYTES + 1)
        except OSError as err:
            raise LedgerFileError(
                f"privacy ledger {self.path} cannot be read: {err.strerror or err}"
            ) from None
        finally:
            os.close(fd)
        if len(raw) > MAX_LEDGER_BYTES:
            raise LedgerFileError(
                f"privacy ledger {self.path} is larger than {MAX_LEDGER_BYTES} bytes"
            )
        return self.parse(raw)

    def parse(self, raw: bytes) -> PrivacyLedger:
        """Validate a ledger file's bytes and rebuild the ledger (see :meth:`load`)."""
        where = f"privacy ledger {self.path}"
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise LedgerFileError(f"{where} is not valid JSON ({detail})") from None
        if not isinstance(data, dict):
            raise LedgerFileError(f"{where} is not a JSON object")
        missing = sorted(_FILE_KEYS - data.keys())
        unknown = sorted(str(key) for key in data.keys() - _FILE_KEYS)
        if missing or unknown:
            parts = [f"lacks {', '.join(missing)}"] if missing else []
            parts += [f"has unknown fields {', '.join(unknown)}"] if unknown else []
            raise LedgerFileError(f"{where} {' and '.join(parts)}")
        if data["format"] != LEDGER_FORMAT or data["version"] != LEDGER_VERSION:
            raise LedgerFileError(
                f"{where} is not a {LEDGER_FORMAT} version {LEDGER_VERSION} file "
                f"(format {data['format']!r}, version {data['version']!r})"
            )
        body = {key: value for key, value in data.items() if key != "sha256"}
        if data["sha256"] != _digest(body):
            raise LedgerFileError(f"{where} does not match its sha256 (altered or corrupted)")
        partition = data["partition"]
        if isinstance(partition, bool) or partition != self.partition:
            raise LedgerFileError(
                f"{where} belongs to partition {partition!r}, not {self.partition}"
            )
        history = data["history"]
        try:
            if not isinstance(history, list) or not all(
                isinstance(entry, list) and len(entry) == 3 for entry in history
            ):
                raise ValueError("history must be a list of [noise_multiplier, sample_rate, steps]")
            if not isinstance(data["accountant"], str):
                raise ValueError(f"accountant must be 'rdp' or 'prv', got {data['accountant']!r}")
            return PrivacyLedger(
                epsilon_budget=data["epsilon_budget"],
                delta=data["delta"],
                accountant=data["accountant"],  # type: ignore[arg-type]
                history=[(entry[0], entry[1], entry[2]) for entry in history],
            )
        except ValueError as err:
            raise LedgerFileError(f"{where}: {err}") from None

    def dumps(self, ledger: PrivacyLedger) -> bytes:
        """The file's bytes for ``ledger`` (digest included)."""
        body: dict[str, Any] = {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "partition": self.partition,
            "epsilon_budget": ledger.epsilon_budget,
            "delta": ledger.delta,
            "accountant": ledger.accountant,
            "history": [[float(s), float(q), int(t)] for s, q, t in ledger.history],
            "epsilon_spent": ledger.spent(),
        }
        body["sha256"] = _digest(body)
        return (json.dumps(body, indent=1, allow_nan=False) + "\n").encode()

    def save(self, ledger: PrivacyLedger) -> None:
        """Write ``ledger`` durably: it is on disk, whole, when this returns.

        A temporary file in the same folder is written and ``fsync``-ed, renamed
        over the file (``os.replace``, atomic on POSIX) and the folder is
        ``fsync``-ed so the rename itself survives a crash: a reader sees the
        old ledger or the new one, never a mix.

        Raises
        ------
        OSError
            If the folder is missing or not writable, or the disk is full.
        """
        write_atomic(self.path, self.dumps(ledger))


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (owner-only permissions).

    Raises
    ------
    OSError
        If the folder is missing or not writable, or the disk is full.
    """
    folder = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms that cannot open a folder (Windows) have no folder fsync
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
