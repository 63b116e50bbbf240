"""API keys: ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (as the
Anthropic SDK sends it), looked up by SHA-256."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from llm_broker.shared.config import AuthConfig
from llm_broker.shared.errors import Unauthorized

#: Tenant recorded on jobs when the server runs without keys.
OPEN_TENANT = "default"


class Authenticator:
    def __init__(self, cfg: AuthConfig) -> None:
        self._tenants = {k.sha256: k.tenant for k in cfg.keys}
        self.open = not self._tenants

    def tenant(self, headers: Mapping[str, str]) -> str:
        """The tenant owning the presented key; raises :class:`Unauthorized`."""
        if self.open:
            return OPEN_TENANT
        authorization = headers.get("Authorization")
        if authorization:
            scheme, _, key = authorization.partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        else:
            key = headers.get("x-api-key", "")
            if not key.strip():
                raise Unauthorized(
                    "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
                )
        tenant = self._tenants.get(hashlib.sha256(key.strip().encode()).hexdigest())
        if tenant is None:
            raise Unauthorized("invalid API key")
        return tenant
