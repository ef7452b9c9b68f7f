"""One writer at a time: the output's lock, a lease its holder renews, and its takeover once the holder is gone.

    _lock                             held by the running job (a lease it renews): a second job refuses to start
    _takeovers/                       one small marker per lock takeover (makes a takeover atomic; removed on release)

A second job is refused with OutputLocked naming the holder. A lock is taken over when its holder is known to be
gone (a dead process on this host, or a lease not renewed for LEASE_S from any host), or when asked (--break-lock).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid

import pyarrow.fs as pafs

from pipeline.store.filesystem import OutputRoot

log = logging.getLogger("tokendyn.pipeline")

# The lock is a lease: the running job renews it every LEASE_S / RENEWALS_PER_LEASE seconds, and a job on any host
# may take over a lease not renewed for LEASE_S (host clocks must agree to well within that).
LEASE_S = 300.0
RENEWALS_PER_LEASE = 5


class OutputLocked(RuntimeError):
    """Another job is writing to this output."""


def _lease_key(holder: dict) -> str:
    """Names one lease of one holder: a takeover claims this name, so each lease is taken over at most once."""
    return hashlib.sha1(json.dumps(holder, sort_keys=True).encode()).hexdigest()


def _utc(epoch_s) -> str:
    return "?" if epoch_s is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(epoch_s)))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LeaseLock(OutputRoot):
    """The lock of pipeline.store.storage.OutputStore, held in the name of its `run_id` on `host` for `lease_s`
    seconds at a time. While held, `_holder` is the lock's content and `_renewer` the thread renewing it;
    `_lease_lost` is set once another job took it over, after which writes (`_check_lease`) raise OutputLocked.
    """

    run_id: str
    host: str
    lease_s: float
    _holder: dict | None
    _renewer: threading.Thread | None
    _lease_lost: bool

    @property
    def _lock_path(self) -> str:
        return f"{self.path}/_lock"

    def acquire_lock(self, break_lock: bool = False) -> None:
        """Take the output's lock (a lease this store then renews in a background thread), or raise OutputLocked
        naming the job that holds it.

        A lock is taken over when its holder is known to be gone: a dead process on this host, or a lease not
        renewed for `lease_s` (from any host); otherwise only when asked (`break_lock`). A takeover is claimed by
        creating `_takeovers/<holder's lease>` if absent, so of several jobs that judge the same lock stale
        exactly one replaces it.
        """
        holder = {"run_id": self.run_id, "host": self.host, "pid": os.getpid(), "token": uuid.uuid4().hex,
                  "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "expires_at": time.time() + self.lease_s}
        content = json.dumps(holder).encode()
        for _ in range(3):  # the holder may release between our attempts
            if self._create_exclusive(self._lock_path, content):
                return self._start_lease(holder)
            current = self._read_lock()
            if not current:
                continue
            reason = self._takeover_reason(current, break_lock)
            if reason is None:
                break
            claim = f"{self.path}/_takeovers/{_lease_key(current)}"
            # Only the one job that creates the claim may replace this lock; the others read the new holder. The
            # lock is read once more in case its holder released it meanwhile and a new job created it.
            if self._create_exclusive(claim, content) and self._read_lock() == current:
                log.warning("taking over the lock of run %s (%s)", current.get("run_id"), reason)
                self._replace(self._lock_path, content)
                return self._start_lease(holder)
            current = self._read_lock() or current
            break
        raise OutputLocked(
            f"{self.root} is being written by run {current.get('run_id')} (pid {current.get('pid')} on "
            f"{current.get('host')}, since {current.get('started_at')}, lease until "
            f"{_utc(current.get('expires_at'))}). Wait for it to finish or for its lease to expire; if that job is "
            "dead, re-run with --break-lock.")

    def _takeover_reason(self, current: dict, break_lock: bool) -> str | None:
        """Why the lock `current` may be taken over, or None when its holder may still be running."""
        if current.get("host") == self.host and not _process_alive(int(current.get("pid", -1))):
            return "its process is gone"
        expires_at = current.get("expires_at")
        if expires_at is not None and float(expires_at) < time.time():
            return f"its lease expired at {_utc(expires_at)}"
        return "--break-lock" if break_lock else None

    def _start_lease(self, holder: dict) -> None:
        self._holder, self._lease_lost = holder, False
        self._stop_renewing = threading.Event()
        self._renewer = threading.Thread(target=self._renew_lease, args=(self._stop_renewing,), daemon=True,
                                         name="tokendyn-lease")
        self._renewer.start()

    def _renew_lease(self, stop: threading.Event) -> None:
        """Push the lease's expiry forward every lease_s / RENEWALS_PER_LEASE until stopped or taken over."""
        while not stop.wait(self.lease_s / RENEWALS_PER_LEASE):
            if self._read_lock().get("token") != self._holder["token"]:
                self._lease_lost = True
                log.error("the lock of %s was taken over by another job; this run writes nothing more", self.root)
                return
            self._holder["expires_at"] = time.time() + self.lease_s
            try:
                self._replace(self._lock_path, json.dumps(self._holder).encode())
            except OSError as error:  # a storage hiccup: the next renewal tries again, well before expiry
                log.warning("could not renew the lease on %s: %s", self.root, error)

    def stop_lease(self) -> None:
        """Stop renewing the lease (the lock itself stays until released or expired)."""
        if self._renewer is not None:
            self._stop_renewing.set()
            self._renewer.join()
            self._renewer = None

    def _check_lease(self) -> None:
        if self._lease_lost:
            raise OutputLocked(f"this job's lock on {self.root} was taken over (its lease was not renewed within "
                               f"{self.lease_s:.0f} s); stopped before writing more")

    def _read_lock(self) -> dict:
        try:
            with self.fs.open_input_stream(self._lock_path) as src:
                return json.loads(src.read() or b"{}")
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def release_lock(self) -> None:
        self.stop_lease()
        if self._holder is not None and self._read_lock().get("token") == self._holder["token"]:
            # Takeover claims matter only while a takeover is contended; a late contender re-reads the lock anyway.
            claims = f"{self.path}/_takeovers"
            if self.fs.get_file_info(claims).type != pafs.FileType.NotFound:
                self.fs.delete_dir(claims)
            self.fs.delete_file(self._lock_path)
        self._holder = None
