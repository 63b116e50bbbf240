"""A small client of the admin API (``/admin/v1``), for the ``llm-broker`` admin
commands (keys, tenants, usage, audit).

Standard library only (``urllib.request``): the commands start in a fraction of a
second and import nothing of the server. Every call answers the API's JSON as it
is; a refusal raises :class:`AdminError` with the API's error message.
"""

from __future__ import annotations

import errno
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

#: Where the commands find the broker unless ``--url`` or ``$LLM_BROKER_URL`` say
#: otherwise: the ingress's default port (``ingress.port``, ``llm-broker dev``).
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 30.0


class AdminError(Exception):
    """A call that failed: the API refused it (``status`` is the HTTP status and
    ``code`` the error's code), or the broker could not be reached (``status`` 0)."""

    def __init__(self, message: str, status: int = 0, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code

    def __str__(self) -> str:
        if not self.status:
            return self.message
        detail = f"HTTP {self.status}" + (f", {self.code}" if self.code else "")
        return f"{self.message} ({detail})"


def _segment(value: str) -> str:
    """One path segment, every reserved character escaped (a tenant may hold '/')."""
    return urllib.parse.quote(value, safe="")


def _refusal(status: int, raw: bytes) -> AdminError:
    """The error an API answer carries (``{"error": {"message", "code", ...}}``)."""
    try:
        body = json.loads(raw)
        error = body["error"]
        return AdminError(str(error["message"]), status, error.get("code"))
    except (ValueError, TypeError, KeyError):
        text = raw.decode(errors="replace").strip()[:200]
        return AdminError(text or "no error message", status)


def _unreachable(url: str, reason: object) -> AdminError:
    if isinstance(reason, ConnectionRefusedError) or (
        isinstance(reason, OSError) and reason.errno == errno.ECONNREFUSED
    ):
        why = "connection refused"
    elif isinstance(reason, socket.gaierror):
        why = f"unknown host ({reason.strerror})"
    elif isinstance(reason, TimeoutError):
        why = "no answer in time"
    else:
        why = str(reason)
    return AdminError(
        f"cannot reach the broker at {url}: {why}. Is the ingress running there? "
        "Set --url or $LLM_BROKER_URL."
    )


class AdminClient:
    """The admin API at ``url`` (the ingress's base URL), called with ``admin_key``."""

    def __init__(self, url: str, admin_key: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.admin_key = admin_key
        self.timeout = timeout

    def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, str | None] | None = None,
    ) -> Any:
        """``method path`` (under the base URL) with a JSON ``body``; the answer's JSON.
        Query parameters whose value is None are left out."""
        target = self.url + path
        params = {k: v for k, v in (query or {}).items() if v is not None}
        if params:
            target += "?" + urllib.parse.urlencode(params)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.admin_key}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(target, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            try:
                refused = e.read() if e.fp is not None else b""
            except OSError:
                refused = b""
            finally:
                e.close()
            raise _refusal(e.code, refused) from None
        except urllib.error.URLError as e:
            raise _unreachable(self.url, e.reason) from None
        except OSError as e:  # a reset, or a timeout while reading the answer
            raise _unreachable(self.url, e) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise AdminError(f"the broker at {self.url} did not answer JSON", 200) from None

    # ------------------------------------------------------------ tenants

    def create_tenant(self, spec: Mapping[str, Any]) -> Any:
        return self.call("POST", "/admin/v1/tenants", spec)

    def list_tenants(self) -> Any:
        return self.call("GET", "/admin/v1/tenants")

    def tenant(self, name: str) -> Any:
        return self.call("GET", f"/admin/v1/tenants/{_segment(name)}")

    def update_tenant(self, name: str, patch: Mapping[str, Any]) -> Any:
        return self.call("PATCH", f"/admin/v1/tenants/{_segment(name)}", patch)

    def delete_tenant(self, name: str) -> Any:
        return self.call("DELETE", f"/admin/v1/tenants/{_segment(name)}")

    # ------------------------------------------------------------ keys

    def create_key(self, spec: Mapping[str, Any]) -> Any:
        """A new key; the answer's ``key`` is its secret, shown this once."""
        return self.call("POST", "/admin/v1/keys", spec)

    def list_keys(self, tenant: str | None = None) -> Any:
        return self.call("GET", "/admin/v1/keys", query={"tenant": tenant})

    def key(self, key_id: str) -> Any:
        return self.call("GET", f"/admin/v1/keys/{_segment(key_id)}")

    def update_key(self, key_id: str, patch: Mapping[str, Any]) -> Any:
        return self.call("PATCH", f"/admin/v1/keys/{_segment(key_id)}", patch)

    def revoke_key(self, key_id: str) -> Any:
        return self.call("POST", f"/admin/v1/keys/{_segment(key_id)}/revoke")

    def rotate_key(self, key_id: str, grace_s: float | None = None) -> Any:
        """A new secret (the answer's ``key``); the old one stays valid ``grace_s``
        seconds (None: the broker's ``accounts.rotation_grace_s``)."""
        body = {} if grace_s is None else {"grace_s": grace_s}
        return self.call("POST", f"/admin/v1/keys/{_segment(key_id)}/rotate", body)

    # ------------------------------------------------------------ audit, usage

    def audit(self, limit: int | None = None, after: str | None = None) -> Any:
        query = {"limit": None if limit is None else str(limit), "after": after}
        return self.call("GET", "/admin/v1/audit", query=query)

    def usage(self, query: Mapping[str, str | None]) -> Any:
        """``query``: tenant, key, model, from, to (``YYYY-MM-DD``), group_by."""
        return self.call("GET", "/admin/v1/usage", query=query)
