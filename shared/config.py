"""Typed, frozen configuration.

The config is one YAML (or JSON) document parsed into the structs below; unknown
fields are rejected with a message that names them. A few deploy knobs come from
the environment mapping passed to :func:`load_config` (never read elsewhere):

* ``REDIS_URL`` overrides ``redis.url``;
* ``LLM_BROKER_CONFIG`` names the config file when no path is given;
* ``LLM_BROKER_POD`` is the first part of this process's reply stream name.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec
import yaml

from llm_broker.shared.ssrf import Ports


class ConfigError(Exception):
    """The configuration is invalid; the message says where and why."""


class _Base(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class SentinelConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Find the Redis primary through Redis Sentinel (docs/operations.md, "Redis
    failover"): every process asks the sentinels for the primary of
    ``service_name`` when it connects, and again after the primary fails over."""

    #: The sentinels, each "host:port".
    addresses: tuple[str, ...]
    #: The name the sentinels monitor the primary under.
    service_name: str = "mymaster"
    #: The sentinels' own credentials (``requirepass`` in sentinel.conf), if any.
    username: str | None = None
    password_file: str | None = None
    #: TLS to the sentinels (the data nodes use TLS when ``redis.url`` is rediss://).
    tls: bool = False

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("redis.sentinel.addresses must name at least one sentinel")
        for address in self.addresses:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"redis.sentinel.addresses: {address!r} is not host:port")

    def hosts(self) -> list[tuple[str, int]]:
        return [
            (a.rpartition(":")[0].strip("[]"), int(a.rpartition(":")[2])) for a in self.addresses
        ]


class RedisConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    #: The Redis primary; with ``sentinel``, only its scheme (redis/rediss), user,
    #: password and database count: the sentinels name the host.
    url: str = "redis://127.0.0.1:6379/0"
    #: The data nodes' password, read from this file on every new connection (a
    #: rotated secret is used from the next connection on); overrides the URL's.
    password_file: str | None = None
    sentinel: SentinelConfig | None = None
    #: Replicas that must hold an async job's admission before the client gets its
    #: 202 (Redis WAIT), so that an acknowledged job survives a failover; 0: none.
    min_replicas_acked: int = 0
    #: How long admission waits for those replicas; if fewer confirm in time the
    #: client gets 503 with the job id (the job may still run).
    min_replicas_timeout_ms: int = 500
    #: A Redis Cluster (docs/cluster.md): ``url`` names a node (its scheme, user,
    #: password and TLS hold for every node), ``nodes`` more ("host:port"); any
    #: that answers gives the map of the cluster's slots.
    cluster: bool = False
    nodes: list[str] = []
    #: Every key this deployment writes starts with this prefix.
    key_prefix: str = "llmb:"
    #: Timeout of one Redis command on the request path; keeps "Redis down" fast.
    command_timeout_s: float = 0.75
    connect_timeout_s: float = 0.5

    def __post_init__(self) -> None:
        if self.min_replicas_acked < 0:
            raise ValueError("redis.min_replicas_acked must be 0 or more")
        if self.cluster and self.sentinel is not None:
            raise ValueError("redis.cluster and redis.sentinel exclude each other")
        if self.cluster and self.min_replicas_acked:
            raise ValueError("redis.min_replicas_acked is not available with redis.cluster")
        if self.nodes and not self.cluster:
            raise ValueError("redis.nodes needs redis.cluster: true")
        for node in self.nodes:
            host, _, port = node.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"redis.nodes: {node!r} is not host:port")
        if self.min_replicas_timeout_ms < 1:
            raise ValueError("redis.min_replicas_timeout_ms must be at least 1")
        if (
            self.min_replicas_acked
            and self.min_replicas_timeout_ms >= self.command_timeout_s * 1000
        ):
            raise ValueError(
                "redis.min_replicas_timeout_ms must be shorter than redis.command_timeout_s"
            )


class OverloadConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """When one ingress process sheds new API requests (503 ``overloaded`` with
    Retry-After) instead of taking on work it cannot do in time. docs/operations.md
    explains the choice of signals."""

    #: Requests one process handles at once (waiting calls included); beyond it new
    #: API requests are shed. Bounds memory and file descriptors per process.
    max_in_flight: int = 10_000
    #: Event-loop lag, measured every 50 ms, above which new API requests are shed
    #: until it falls again (0: never shed on lag): a growing share of them, up to
    #: ``max_shed_share`` at twice this lag. A loop that far behind answers late.
    max_lag_ms: float = 300.0
    #: The largest share of new API requests shed for lag; the rest are still
    #: taken, so a process whose clients retry at once keeps doing useful work.
    max_shed_share: float = 0.5
    #: Retry-After sent with a shed request.
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError("ingress.overload.max_in_flight must be at least 1")
        if self.max_lag_ms < 0:
            raise ValueError("ingress.overload.max_lag_ms must be 0 (off) or more")
        if not 0 < self.max_shed_share <= 1:
            raise ValueError("ingress.overload.max_shed_share must be in (0, 1]")


class IngressConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: str = "0.0.0.0"
    port: int = 8000
    max_body_bytes: int = 32 * 1024 * 1024
    #: Default deadline of a request; ``X-Request-Timeout`` (seconds) overrides it.
    request_timeout_s: float = 600.0
    max_request_timeout_s: float = 3600.0
    #: On SIGTERM, /ready fails at once while new requests are still served for this
    #: long (so a load balancer can stop routing here), then listening stops.
    shutdown_delay_s: float = 0.0
    #: After listening stops, in-flight requests get this long to finish.
    drain_s: float = 30.0
    #: Retry-After sent with 429 when a provider queue is full.
    queue_full_retry_after_s: int = 1
    #: Serve /metrics on this port (same host, same process) instead of ``port``,
    #: so that a network policy can open it to the monitoring system only.
    metrics_port: int | None = None
    overload: OverloadConfig = OverloadConfig()
    #: Serve the model API's calls (chat completions, embeddings, messages) with
    #: the ingress's own HTTP path (ingress/dataplane.py), about half the CPU of
    #: aiohttp's; false sends every request through aiohttp.
    fast_path: bool = True


class ApiKey(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    tenant: str
    #: Hex SHA-256 of the key (``llm-broker keygen`` prints a new key and its hash).
    sha256: str

    def __post_init__(self) -> None:
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"api key for tenant {self.tenant!r}: sha256 must be 64 lowercase hex")
        check_tenant_name(self.tenant)


def check_tenant_name(name: str) -> None:
    """Tenant names become parts of Redis key names: 1 to 128 printable characters,
    no spaces, no braces (Redis Cluster hash tags)."""
    if not (
        0 < len(name) <= 128
        and name.isprintable()
        and not any(c.isspace() or c in "{}" for c in name)
    ):
        raise ValueError(
            f"tenant name {name[:128]!r} must be 1 to 128 printable characters "
            "without spaces or braces"
        )


class AdminKey(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A key for the admin API (/admin/v1), named in audit records."""

    name: str
    sha256: str

    def __post_init__(self) -> None:
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"admin key {self.name!r}: sha256 must be 64 lowercase hex")
        if not 0 < len(self.name) <= 128:
            raise ValueError("admin key names are 1 to 128 characters")


class AuthConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    keys: tuple[ApiKey, ...] = ()
    #: Keys for the admin API only (never the model API).
    admin_keys: tuple[AdminKey, ...] = ()
    #: How long an ingress process trusts what it read of a key kept in Redis; a
    #: change is also announced on a channel, which drops it at once.
    cache_s: float = 1.0
    #: Serve without authentication (every caller is the tenant "default"). Off by
    #: default: ingress refuses to start with no keys unless this says so.
    open: bool = False


class AccountsConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Keys and tenants kept in Redis (the admin API), spend and usage."""

    #: Count every request's usage per tenant, key, model and day in Redis.
    usage: bool = True
    usage_retention_days: float = 400.0
    audit_retention_days: float = 365.0
    #: How long a rotated-out secret stays valid unless the rotation says.
    rotation_grace_s: float = 86400.0
    #: Budget alerts fire at this fraction of a budget (exported as a metric).
    budget_alert_fraction: float = 0.8

    def __post_init__(self) -> None:
        if not 0 < self.budget_alert_fraction <= 1:
            raise ValueError("accounts.budget_alert_fraction must be in (0, 1]")
        if self.usage_retention_days <= 0 or self.audit_retention_days <= 0:
            raise ValueError("accounts retention days must be positive")
        if not 0 <= self.rotation_grace_s <= 30 * 86400:
            raise ValueError("accounts.rotation_grace_s must be from 0 to 30 days")


class S3Config(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """S3-compatible object storage for files."""

    bucket: str
    #: Prefix of every object name (e.g. "llm-broker/").
    prefix: str = ""
    #: The service's URL (MinIO, Ceph, a local test server); AWS's when empty.
    endpoint_url: str | None = None
    region: str = "us-east-1"
    #: Files holding the access key id and secret; without them the standard AWS
    #: credential chain (environment, shared files, instance role) applies.
    access_key_id_file: str | None = None
    secret_access_key_file: str | None = None


class FilesConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where files (the Files API's, batch inputs and outputs) live, and the batch limits."""

    backend: Literal["dir", "s3"] = "dir"
    #: The directory of the "dir" backend (default: llm-broker-files in the temp dir).
    dir: str = ""
    s3: S3Config | None = None
    #: Files and batch outputs are deleted this long after they were made.
    retention_s: float = 30 * 86400.0
    #: The largest upload (streamed to the store, never whole in memory).
    max_bytes: int = 200 * 1024 * 1024
    #: The most lines in a batch's input file.
    max_lines: int = 50_000
    #: Batches a tenant may have validating or in progress at once.
    max_batches_in_progress: int = 10
    #: Lines of one batch queued or running at once (a batch cannot fill the queue).
    window: int = 500
    #: How long a batch may run: its lines not done by then are expired (both APIs
    #: promise 24 hours; a deployment may keep batches shorter).
    completion_window_s: float = 86400.0

    def __post_init__(self) -> None:
        if self.backend == "s3" and self.s3 is None:
            raise ValueError("files.backend s3 needs files.s3 (bucket, ...)")
        if self.max_bytes < 1 or self.max_lines < 1 or self.window < 1:
            raise ValueError("files.max_bytes, max_lines and window must be positive")
        if not 1 <= self.completion_window_s <= 86400:
            raise ValueError("files.completion_window_s must be from 1 to 86400 seconds")
        if self.retention_s <= 0 or self.max_batches_in_progress < 1:
            raise ValueError("files.retention_s and max_batches_in_progress must be positive")

    def directory(self) -> str:
        import tempfile

        return self.dir or str(Path(tempfile.gettempdir()) / "llm-broker-files")


ProviderType = Literal[
    "openai", "openai-compatible", "azure", "anthropic", "gemini", "bedrock", "mock"
]

#: The provider types whose upstream speaks the OpenAI wire format at ``base_url``.
OPENAI_WIRE = frozenset(("openai", "openai-compatible", "mock"))

#: The job kinds (``shared.messages``) each provider type serves in their own API:
#: their body goes upstream as it came. Others are translated through chat; an
#: embeddings job needs a type listed here.
NATIVE_KINDS: dict[str, frozenset[str]] = {
    "openai": frozenset(("chat", "embeddings", "responses")),
    "azure": frozenset(("chat", "embeddings", "responses")),
    "mock": frozenset(("chat", "embeddings", "responses")),
    "openai-compatible": frozenset(("chat", "embeddings")),
    "anthropic": frozenset(("messages", "count_tokens")),
    "gemini": frozenset(),
    "bedrock": frozenset(),
}


class RetryConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Retries of one upstream call on 429, 5xx, timeouts and connection errors."""

    #: Retries after the first attempt (0: none); then the job falls back.
    max_retries: int = 2
    #: Backoff before retry n is ``base_s * 2**n``, at most ``max_s``, with full jitter
    #: over its upper half; an upstream's Retry-After / retry-after-ms wins if longer.
    base_s: float = 0.5
    max_s: float = 8.0
    #: A Retry-After longer than this is not waited for: the job falls back at once.
    max_retry_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.base_s < 0 or self.max_s < 0:
            raise ValueError("retry: max_retries, base_s and max_s must not be negative")


class CircuitConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A circuit breaker per deployment, in each worker process."""

    #: Consecutive failed calls (after which 429, 5xx, timeouts…) that open the circuit.
    failures: int = 5
    #: How long an open circuit refuses calls before one probe call is let through.
    open_s: float = 30.0


class ProviderConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    type: ProviderType
    #: Base URL of the upstream API, e.g. https://api.openai.com/v1 or a vLLM server's /v1
    #: (Gemini: https://generativelanguage.googleapis.com/v1beta, or Vertex AI's
    #: https://{location}-aiplatform.googleapis.com/v1/projects/{project}/locations/{location}/publishers/google;
    #: Bedrock: https://bedrock-runtime.{region}.amazonaws.com, the default from ``region``).
    base_url: str = ""
    #: File holding the upstream API key (a mounted secret); never inline. Several
    #: keys (one per line) are used in turn. The file is re-read when it changes.
    api_key_file: str | None = None
    #: More key files; every key of every file is used in turn.
    api_key_files: tuple[str, ...] = ()
    #: Azure: the ``api-version`` query parameter; Anthropic: the ``anthropic-version``
    #: header (default 2023-06-01).
    api_version: str | None = None
    #: HTTP proxy for upstream calls (``http://[user:password@]host:port``), reached
    #: with CONNECT; the proxy must allow CONNECT to the upstream's port.
    proxy_url: str | None = None
    #: In-flight upstream calls per worker process.
    max_concurrency: int = 64
    #: Ingress answers 429 when the provider's queue holds this many jobs.
    max_queue_depth: int = 10_000
    #: Upper bound of one upstream call (the request deadline may be shorter).
    timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    #: In-flight upstream calls across every worker process (Redis leases); none if unset.
    global_max_concurrency: int | None = None
    #: Requests and tokens per rate window (``limits.window_s``) across every worker.
    rpm: int | None = None
    tpm: int | None = None
    #: The most tokens one call is estimated at for ``tpm`` (the largest context
    #: window of the provider's models): a request cannot claim more of the budget.
    max_call_tokens: int = 262_144
    #: Anthropic: ``max_tokens`` sent when the request has none.
    default_max_tokens: int = 4096
    #: Gemini on Vertex AI: a service-account JSON key file; the worker mints (and
    #: refreshes) OAuth access tokens from it. Without it, ``api_key_file`` holds a
    #: Google AI Studio key.
    vertex_credentials_file: str | None = None
    #: Bedrock: the AWS region (also the SigV4 signing region).
    region: str | None = None
    #: Bedrock: files holding the AWS credentials; without them the standard AWS
    #: credential chain (environment, shared files, container or instance role) applies.
    aws_access_key_id_file: str | None = None
    aws_secret_access_key_file: str | None = None
    aws_session_token_file: str | None = None
    retry: RetryConfig = RetryConfig()
    circuit: CircuitConfig = CircuitConfig()

    def key_files(self) -> tuple[str, ...]:
        return ((self.api_key_file,) if self.api_key_file else ()) + self.api_key_files

    def __post_init__(self) -> None:
        if self.type == "azure" and not self.api_version:
            raise ValueError("an azure provider needs api_version")
        _check_limits(self.global_max_concurrency, self.rpm, self.tpm)
        if not 1 <= self.max_call_tokens <= 2**40:
            raise ValueError("max_call_tokens must be from 1 to 2**40")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.max_queue_depth < 1:
            raise ValueError("max_queue_depth must be at least 1")
        if self.type == "bedrock" and not self.region:
            raise ValueError("a bedrock provider needs region")
        if (self.aws_access_key_id_file is None) != (self.aws_secret_access_key_file is None):
            raise ValueError("aws_access_key_id_file and aws_secret_access_key_file go together")
        if not self.endpoint().startswith(("http://", "https://")):
            raise ValueError(f"base_url must be http(s): {self.base_url!r}")

    def endpoint(self) -> str:
        """The upstream's base URL (Bedrock's default from its region)."""
        if not self.base_url and self.type == "bedrock":
            return f"https://bedrock-runtime.{self.region}.amazonaws.com"
        return self.base_url


def _check_limits(cap: int | None, rpm: int | None, tpm: int | None) -> None:
    for name, value in (("global_max_concurrency", cap), ("rpm", rpm), ("tpm", tpm)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1")


class Deployment(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One place a model is served: a provider and the model name it knows."""

    provider: str
    #: Model name sent upstream (Azure: the deployment name); defaults to the requested name.
    model: str | None = None
    #: Share of traffic under the ``weighted`` strategy.
    weight: float = 1.0
    #: Limits of this deployment across every worker, on top of the provider's
    #: (a call needs room in both).
    global_max_concurrency: int | None = None
    rpm: int | None = None
    tpm: int | None = None

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError("weight must not be negative")
        _check_limits(self.global_max_concurrency, self.rpm, self.tpm)


Strategy = Literal["weighted", "least-queued", "lowest-latency"]


class ModelRoute(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where a model name goes: one provider (``provider``/``model``) or a list of
    ``deployments`` chosen by ``strategy``, the others being its fallbacks."""

    provider: str | None = None
    #: Model name sent upstream; defaults to the requested name.
    model: str | None = None
    deployments: tuple[Deployment, ...] = ()
    strategy: Strategy = "weighted"
    #: After its retries, a failed call moves on to the next deployment.
    fallback: bool = True
    #: Cache answers to sampling requests (temperature > 0) too.
    cache_sampling: bool = False

    def __post_init__(self) -> None:
        if (self.provider is None) == (not self.deployments):
            raise ValueError("a model needs either provider or deployments (not both)")

    def all_deployments(self) -> tuple[Deployment, ...]:
        if self.provider is not None:
            return (Deployment(provider=self.provider, model=self.model),)
        return self.deployments


class LimitsConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Global limits (``global_max_concurrency``, ``rpm``, ``tpm``) held in Redis."""

    #: A lease of a worker that died frees its slot after this long.
    lease_s: float = 15.0
    #: Length of the sliding window over which ``rpm`` and ``tpm`` are counted.
    window_s: float = 60.0


#: Priority classes, highest first: synchronous calls default to ``interactive``,
#: async jobs to ``async``; ``batch`` is for bulk work.
Priority = Literal["interactive", "async", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "async", "batch")


class Quota(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A tenant's quotas, overall or on one provider (0: none)."""

    #: Jobs admitted and not yet dispatched to a worker.
    max_queued: int = 0
    #: Jobs dispatched to workers and not yet settled, across every worker process.
    max_in_flight: int = 0
    #: Requests and estimated tokens admitted per minute (a sliding window).
    rpm: int = 0
    tpm: int = 0

    def __post_init__(self) -> None:
        for name in ("max_queued", "max_in_flight", "rpm", "tpm"):
            if not 0 <= getattr(self, name) <= 2**40:
                raise ValueError(f"quota {name} must be from 0 (none) to 2**40")


class TenantConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How the scheduler treats one tenant (``tenants`` in the config)."""

    #: Share of a provider's capacity against other backlogged tenants of the same
    #: class, counted in requests: weight 3 gets three dispatches for every one of
    #: a tenant with weight 1 (from 1 to 1000; to give a tenant less than the
    #: others, raise theirs).
    weight: float = 1.0
    #: The highest class the tenant's requests may have; a request asking for a
    #: higher one is lowered to it.
    max_priority: Priority = "interactive"
    #: Quotas over every provider together.
    quotas: Quota = Quota()
    #: Quotas on one provider (provider name → quota).
    providers: dict[str, Quota] = {}

    def __post_init__(self) -> None:
        # At least 1: every visit of the round robin sends a job of the tenant's.
        if not 1 <= self.weight <= 1000:
            raise ValueError("tenant weight must be from 1 to 1000")


class MinShare(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Minimum share of a provider's dispatches that a lower class keeps while it
    has work and a higher class has too (``interactive`` always goes first
    otherwise). 0.1: at least one dispatch in ten."""

    async_: float = msgspec.field(default=0.1, name="async")
    batch: float = 0.05

    def __post_init__(self) -> None:
        if not (0 <= self.async_ <= 0.5 and 0 <= self.batch <= 0.5):
            raise ValueError("scheduling.min_share values must be from 0 to 0.5")


class SchedulingConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The order in which waiting jobs go to a provider's workers."""

    min_share: MinShare = MinShare()


class Price(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What a model's tokens cost, in US dollars per million tokens."""

    input_usd_per_million: float = 0.0
    output_usd_per_million: float = 0.0

    def __post_init__(self) -> None:
        if self.input_usd_per_million < 0 or self.output_usd_per_million < 0:
            raise ValueError("prices must not be negative")

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (
            input_tokens * self.input_usd_per_million + output_tokens * self.output_usd_per_million
        ) / 1_000_000


class TracingConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """OpenTelemetry span export (needs the ``otel`` extra); off while no endpoint is set."""

    #: OTLP/HTTP traces endpoint, e.g. http://otel-collector:4318/v1/traces.
    otlp_endpoint: str | None = None
    #: Spans carry ``service.name`` = this name and the process role.
    service_name: str = "llm-broker"
    #: Share of new traces recorded (a client's sampled flag is followed).
    sample_ratio: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.sample_ratio <= 1:
            raise ValueError("sample_ratio must be in [0, 1]")


class CacheConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Exact-match response cache in Redis."""

    enabled: bool = False
    ttl_s: int = 3600
    #: One cache for every tenant instead of one per tenant.
    shared: bool = False

    def __post_init__(self) -> None:
        if self.ttl_s < 1:
            raise ValueError("cache.ttl_s must be at least 1")


class ConsoleConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The operator's console at ``/admin/`` (ingress/console.py)."""

    enabled: bool = True
    #: A login session lasts this long, then the operator logs in again.
    session_ttl_s: float = 28800.0
    #: Whether an operator may ask to see a job's request body (a dead letter's, a
    #: stored Responses request's); never shown unasked.
    show_prompts: bool = False
    #: The session cookie's ``Secure`` flag: null sets it when the request came over
    #: HTTPS (``X-Forwarded-Proto: https`` from a proxy counts only with ``true``).
    secure_cookie: bool | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.session_ttl_s <= 30 * 86400:
            raise ValueError("console.session_ttl_s must be from 1 s to 30 days")


class WorkerConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    #: An entry pending this long without a refresh is reclaimed by another worker.
    lease_s: float = 30.0
    #: A job delivered more than this many times fails and goes to the dead-letter stream.
    max_deliveries: int = 3
    #: On SIGTERM, in-flight jobs get this long to finish before the process exits.
    grace_period_s: float = 30.0
    #: Stream chunks are sent back to ingress at most this often (first chunk at once).
    coalesce_ms: float = 5.0
    #: How long one XREADGROUP blocks waiting for work.
    block_ms: int = 1000
    #: Consumers (dead worker processes) idle this long with nothing pending are
    #: removed from the consumer group.
    forget_consumers_after_s: float = 3600.0
    #: A dead-lettered job keeps at most this many bytes of its request body
    #: (0: none); the rest of the entry is a summary (id, tenant, model, error, sizes).
    dead_letter_body_bytes: int = 16_384
    #: Dead-letter entries older than this are trimmed; the stream expires when idle.
    dead_letter_ttl_s: float = 7 * 86_400.0
    #: At most this many dead-letter entries per provider.
    dead_letter_maxlen: int = 10_000
    #: How often a worker process writes its heartbeat (the console's worker list and
    #: per-minute counts); it counts as gone three heartbeats after its last.
    heartbeat_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0.1 <= self.heartbeat_s <= 300:
            raise ValueError("worker.heartbeat_s must be from 0.1 to 300")


class JobsConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    #: How long a job record (status and result) is kept after it finished.
    result_ttl_s: float = 86_400.0
    #: How long a synchronous call's record is kept after it finished: long enough
    #: to look its result up (by X-Request-Id) after a lost connection.
    sync_result_ttl_s: float = 300.0
    #: How long an Idempotency-Key maps to its job (never longer than the job is kept).
    idempotency_ttl_s: float = 86_400.0
    #: Seconds a client is told to wait (Retry-After) before polling an unfinished job again.
    poll_after_s: int = 1

    def __post_init__(self) -> None:
        if min(self.result_ttl_s, self.sync_result_ttl_s, self.idempotency_ttl_s) < 1:
            raise ValueError(
                "result_ttl_s, sync_result_ttl_s and idempotency_ttl_s must be at least 1 second"
            )


#: Delays between webhook delivery attempts: immediately, 5 s, 5 min, 30 min, 2 h,
#: 5 h, 10 h, 14 h, 20 h, 24 h (the Standard Webhooks reference schedule).
DEFAULT_RETRY_SCHEDULE = (
    0.0,
    5.0,
    300.0,
    1800.0,
    7200.0,
    18000.0,
    36000.0,
    50400.0,
    72000.0,
    86400.0,
)


class WebhooksConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    #: File with the signing secret(s) (``whsec_`` + base64), separated by whitespace;
    #: while rotating, list the new and the old one: both sign.
    secret_file: str | None = None
    #: Tenant name → secret file, used instead of ``secret_file`` for that tenant.
    tenant_secret_files: dict[str, str] = {}
    #: Delay before each attempt, in seconds; the number of entries is the number of attempts.
    retry_schedule_s: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    #: Each delay is spread by up to this fraction either way.
    jitter: float = 0.1
    #: Timeout of one delivery attempt.
    timeout_s: float = 15.0
    #: Longest Retry-After (on 429 or 503) honoured.
    max_retry_after_s: float = 86_400.0
    #: Webhook URLs may resolve to these networks even when they are private or
    #: loopback (e.g. ``10.0.0.0/8`` for in-cluster receivers). Empty: public addresses only.
    allow_cidrs: tuple[str, ...] = ()
    #: Ports webhook URLs may use besides 80 and 443: numbers or ranges ("8000-8999").
    allow_ports: tuple[int | str, ...] = ()
    #: Concurrent deliveries per webhooks process.
    max_concurrency: int = 50
    #: How often the delivery worker looks for due attempts.
    poll_delay_s: float = 0.5
    #: The delivery attempts' queue (arq) on a Redis of its own; needed with
    #: ``redis.cluster`` (arq's transactions span several keys). Default: ``redis.url``.
    queue_url: str | None = None

    def __post_init__(self) -> None:
        if not self.retry_schedule_s or any(d < 0 for d in self.retry_schedule_s):
            raise ValueError("retry_schedule_s needs at least one delay, none negative")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        for cidr in self.allow_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as e:
                raise ValueError(f"allow_cidrs: {e}") from e
        try:
            Ports(self.allow_ports)
        except ValueError as e:
            raise ValueError(f"allow_ports: {e}") from e

    def secret_file_for(self, tenant: str) -> str | None:
        return self.tenant_secret_files.get(tenant, self.secret_file)


class Config(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    redis: RedisConfig = RedisConfig()
    jobs: JobsConfig = JobsConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    ingress: IngressConfig = IngressConfig()
    auth: AuthConfig = AuthConfig()
    accounts: AccountsConfig = AccountsConfig()
    console: ConsoleConfig = ConsoleConfig()
    files: FilesConfig = FilesConfig()
    providers: dict[str, ProviderConfig] = {}
    #: Model name → route. A name ending in ``*`` matches every model with that prefix.
    models: dict[str, ModelRoute] = {}
    worker: WorkerConfig = WorkerConfig()
    limits: LimitsConfig = LimitsConfig()
    cache: CacheConfig = CacheConfig()
    #: Model name (as clients request it) → token prices, for llm_broker_cost_usd_total.
    pricing: dict[str, Price] = {}
    tracing: TracingConfig = TracingConfig()
    #: Tenant name → scheduling weight, priority ceiling and quotas; ``"*"`` applies
    #: to every tenant not listed.
    tenants: dict[str, TenantConfig] = {}
    scheduling: SchedulingConfig = SchedulingConfig()
    #: First part of each ingress process's reply stream name (pid and a random
    #: suffix follow); the host name when empty.
    pod_name: str = ""

    def __post_init__(self) -> None:
        for name, route in self.models.items():
            for d in route.all_deployments():
                if d.provider not in self.providers:
                    raise ValueError(f"model {name!r} routes to unknown provider {d.provider!r}")
                limited = d.global_max_concurrency or d.rpm or d.tpm
                if limited and name.endswith("*") and d.model is None:
                    raise ValueError(
                        f"model {name!r}: a deployment with its own limits needs a model name"
                    )
        for tenant, tcfg in self.tenants.items():
            check_tenant_name(tenant)
            for provider in tcfg.providers:
                if provider not in self.providers:
                    raise ValueError(f"tenant {tenant!r}: quota for unknown provider {provider!r}")
        if self.redis.cluster:
            self._check_cluster()

    def _check_cluster(self) -> None:
        """What a Redis Cluster cannot do yet (docs/cluster.md): count across
        providers, where the counts would be on another shard than the job."""
        where = "on a Redis Cluster yet (docs/cluster.md)"
        if self.accounts.usage:
            raise ValueError(
                f"redis.cluster: set accounts.usage to false; usage is not counted {where}"
            )
        for tenant, tcfg in self.tenants.items():
            q = tcfg.quotas
            if q.max_in_flight or q.max_queued or q.rpm or q.tpm:
                raise ValueError(
                    f"redis.cluster: tenant {tenant!r}: quotas across providers are not "
                    f"available {where}; give them per provider"
                )

    def tenant(self, name: str) -> TenantConfig:
        """The scheduling settings of tenant ``name`` (``"*"``'s when not listed)."""
        found = self.tenants.get(name) or self.tenants.get("*")
        return found if found is not None else _DEFAULT_TENANT


_DEFAULT_TENANT = TenantConfig()


def hash_key(key: str) -> str:
    """The SHA-256 hex digest under which an API key is listed in the config."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A new random API key and its hash."""
    key = "sk-llmb-" + secrets.token_urlsafe(32)
    return key, hash_key(key)


def new_webhook_secret() -> str:
    """A new webhook signing secret: ``whsec_`` and base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def parse_config(data: object, env: Mapping[str, str] | None = None) -> Config:
    """Build a :class:`Config` from decoded YAML/JSON and an environment mapping."""
    env = env or {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping at the top level")
    data = dict(data)
    if env.get("REDIS_URL"):
        data["redis"] = {**(data.get("redis") or {}), "url": env["REDIS_URL"]}
    if env.get("LLM_BROKER_POD"):
        data["pod_name"] = env["LLM_BROKER_POD"]
    try:
        return msgspec.convert(data, Config)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid config: {e}") from e


def load_config(path: str | None, env: Mapping[str, str]) -> Config:
    """Load the config file at ``path`` (or ``LLM_BROKER_CONFIG``), then apply ``env``."""
    path = path or env.get("LLM_BROKER_CONFIG") or None
    data: object = None
    if path:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {e}") from e
    return parse_config(data, env)


class Target(msgspec.Struct, frozen=True, array_like=True):
    """One deployment as a job carries it: provider and upstream model."""

    provider: str
    model: str

    @property
    def name(self) -> str:
        return f"{self.provider}/{self.model}"


class Candidates(msgspec.Struct, frozen=True):
    """The deployments a requested model may go to, with the route's settings."""

    targets: tuple[Target, ...]
    weights: tuple[float, ...]
    route: ModelRoute
    #: The route's name in ``models`` (``mock*`` for a wildcard).
    name: str = ""


_UNKNOWN = object()
_ROUTER_CACHE_MAX = 4096
#: Longer requested names are looked up each time rather than remembered.
_ROUTER_CACHE_NAME_MAX = 256


class Router:
    """Maps a requested model name to its deployments (remembered per name)."""

    def __init__(self, config: Config) -> None:
        self._exact: dict[str, ModelRoute] = {}
        self._prefixes: list[tuple[str, ModelRoute]] = []
        for name, route in config.models.items():
            if name.endswith("*"):
                self._prefixes.append((name[:-1], route))
            else:
                self._exact[name] = route
        self._prefixes.sort(key=lambda p: -len(p[0]))
        self.model_names = tuple(config.models)
        self._known: dict[str, Candidates | None] = {}

    def candidates(self, model: str) -> Candidates | None:
        known = self._known.get(model, _UNKNOWN)
        if known is not _UNKNOWN:
            return known  # type: ignore[return-value]
        found = self._lookup(model)
        if len(self._known) < _ROUTER_CACHE_MAX and len(model) <= _ROUTER_CACHE_NAME_MAX:
            self._known[model] = found
        return found

    def _lookup(self, model: str) -> Candidates | None:
        name = model
        found = self._exact.get(model)
        if found is None:
            for prefix, route in self._prefixes:
                if model.startswith(prefix):
                    name, found = prefix + "*", route
                    break
            else:
                return None
        deployments = found.all_deployments()
        return Candidates(
            tuple(Target(d.provider, d.model or model) for d in deployments),
            tuple(d.weight for d in deployments),
            found,
            name,
        )


def deployment_limits(config: Config) -> dict[Target, Deployment]:
    """Each deployment with limits of its own, by (provider, upstream model)."""
    found: dict[Target, Deployment] = {}
    for name, route in config.models.items():
        for d in route.all_deployments():
            if d.global_max_concurrency or d.rpm or d.tpm:
                found.setdefault(Target(d.provider, d.model or name), d)
    return found
