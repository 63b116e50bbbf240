"""Provider API keys from files, re-read when a file changes.

A key file is a mounted secret (Kubernetes, a Vault agent): one or more keys,
one per line. Several keys, from one file or several, are used in turn. Files
are checked for changes at most once a second (a Kubernetes secret update
swaps a symlink, which changes the file's inode); a changed file is re-read and
the new keys are used from the next call, without a restart. Keys never reach
a log line or an error message: reads are logged by file name and key count.
"""

from __future__ import annotations

import logging
import os
import time

from llm_broker.shared.errors import UpstreamCredentialsRejected

log = logging.getLogger("llm_broker.worker.credentials")

CHECK_EVERY_S = 1.0


class KeyRing:
    """The keys of one provider, rotated per call."""

    def __init__(self, provider: str, paths: tuple[str, ...]) -> None:
        self.provider = provider
        self._paths = paths
        self._seen: dict[str, tuple[int, int, int]] = {}
        self._by_file: dict[str, list[str]] = {}
        self._keys: list[str] = []
        self._next = 0
        self._checked = 0.0
        if paths:
            self._check()

    def __bool__(self) -> bool:
        return bool(self._paths)

    def next(self) -> str:
        """The key for the next call; raises :class:`UpstreamCredentialsRejected` without one."""
        now = time.monotonic()
        if now - self._checked >= CHECK_EVERY_S:
            self._check()
        if not self._keys:
            raise UpstreamCredentialsRejected(
                502,
                f"provider {self.provider!r} has no API key "
                "(its key files are empty or unreadable)",
                code="upstream_auth_failed",
            )
        key = self._keys[self._next % len(self._keys)]
        self._next += 1
        return key

    def _check(self) -> None:
        self._checked = time.monotonic()
        changed = False
        for path in self._paths:
            try:
                st = os.stat(path)
            except OSError as e:
                if path in self._seen:
                    log.warning(
                        "provider %s: cannot read key file %s (%s); keeping its last keys",
                        self.provider,
                        path,
                        e.strerror,
                    )
                    self._seen.pop(path)
                elif path not in self._by_file:
                    log.error(
                        "provider %s: cannot read key file %s (%s)",
                        self.provider,
                        path,
                        e.strerror,
                    )
                    self._by_file[path] = []
                continue
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._seen.get(path) == stamp:
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    keys = [line.strip() for line in f if line.strip()]
            except OSError as e:
                log.warning(
                    "provider %s: cannot read key file %s (%s)", self.provider, path, e.strerror
                )
                continue
            except UnicodeDecodeError:
                log.warning("provider %s: key file %s is not UTF-8 text", self.provider, path)
                continue
            self._seen[path] = stamp
            self._by_file[path] = keys
            changed = True
            log.info("provider %s: read %d API key(s) from %s", self.provider, len(keys), path)
        if changed:
            self._keys = [k for path in self._paths for k in self._by_file.get(path, [])]
