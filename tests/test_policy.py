"""The worker's call policy, without Redis: retries, circuit verdicts, what a
failed call spent, and fallback."""

from __future__ import annotations

import time

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from llm_broker.shared import messages as m
from llm_broker.shared.config import ProviderConfig, RetryConfig, Target, parse_config
from llm_broker.shared.errors import (
    BadRequest,
    CircuitOpen,
    DeadlineExceeded,
    UpstreamError,
    upstream_interrupted,
    upstream_status_error,
    upstream_timeout,
    upstream_unreachable,
)
from llm_broker.shared.metrics import WorkerMetrics
from llm_broker.workers.breaker import CLOSED, OPEN
from llm_broker.workers.policy import CallPolicy, Tries, deployment_name
from tests.helpers import make_job


def policy(**provider: object) -> tuple[CallPolicy, ProviderConfig]:
    config = parse_config(
        {
            "providers": {"p": {"type": "openai", "base_url": "http://127.0.0.1:1", **provider}},
            "models": {"m": {"provider": "p"}},
        }
    )
    pcfg = config.providers["p"]
    return CallPolicy(pcfg, WorkerMetrics(CollectorRegistry())), pcfg


def with_fallback(job: m.Job) -> m.Job:
    return msgspec.structs.replace(job, fallbacks=[Target("q", "m2")])


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (upstream_status_error(429, {}), True),
        (upstream_status_error(500, {}), True),
        (upstream_timeout(5), True),
        (upstream_unreachable("refused"), True),
        (upstream_status_error(400, {}), False),
        (upstream_status_error(401, {}), False),
    ],
)
def test_what_is_retried(error: UpstreamError, retried: bool) -> None:
    p, _ = policy()
    delay = p.retry_delay(make_job(), error, Tries(time.time()))
    assert (delay is not None) is retried


def test_retries_back_off_and_stop() -> None:
    p, pcfg = policy(retry={"max_retries": 2, "base_s": 0.1, "max_s": 0.3})
    assert pcfg.retry == RetryConfig(max_retries=2, base_s=0.1, max_s=0.3)
    tries = Tries(time.time())
    e = upstream_status_error(503, {})
    first = p.retry_delay(make_job(), e, tries)
    assert first is not None and 0.05 <= first <= 0.1
    tries.retries = 1
    second = p.retry_delay(make_job(), e, tries)
    assert second is not None and 0.1 <= second <= 0.2
    tries.retries = 2
    assert p.retry_delay(make_job(), e, tries) is None


def test_retry_after_is_waited_unless_too_long_or_past_the_deadline() -> None:
    p, _ = policy(retry={"max_retry_after_s": 10})
    tries = Tries(time.time())
    asked = upstream_status_error(429, {}, retry_after="3")
    assert p.retry_delay(make_job(), asked, tries) == pytest.approx(3, abs=0.01)
    too_long = upstream_status_error(429, {}, retry_after="30")
    assert p.retry_delay(make_job(), too_long, tries) is None
    assert p.retry_delay(make_job(timeout=2), asked, tries) is None


def test_no_retry_once_part_of_the_answer_was_sent() -> None:
    p, _ = policy()
    tries = Tries(time.time())
    tries.sent = True
    assert p.retry_delay(make_job(), upstream_interrupted(), tries) is None
    assert not CallPolicy.may_fall_back(with_fallback(make_job()), upstream_interrupted(), tries)


def test_the_circuit_counts_the_deployments_faults_only() -> None:
    p, _ = policy(circuit={"failures": 2, "open_s": 60})
    breaker = p.breaker("p/m")
    assert p.breaker("p/m") is breaker
    job = make_job()
    for _ in range(3):  # the request's fault: the upstream is up
        p.verdict(job, upstream_status_error(400, {}), 30, breaker)
    assert breaker.state == CLOSED
    p.verdict(job, upstream_status_error(401, {}), 30, breaker)  # our credentials
    p.verdict(job, upstream_status_error(502, {}), 30, breaker)
    assert breaker.state == OPEN and breaker.refusing()


def test_a_timeout_of_the_clients_deadline_is_no_verdict_on_the_deployment() -> None:
    p, pcfg = policy(timeout_s=30, circuit={"failures": 1})
    breaker = p.breaker("p/m")
    job = make_job(timeout=2)
    err = p.verdict(job, upstream_timeout(2), 2, breaker)
    assert isinstance(err, DeadlineExceeded)
    assert breaker.state == CLOSED
    # The upstream's own timeout is.
    err = p.verdict(job, upstream_timeout(pcfg.timeout_s), pcfg.timeout_s, breaker)
    assert isinstance(err, UpstreamError) and breaker.state == OPEN


def test_what_a_failed_call_spent() -> None:
    assert CallPolicy.spent(upstream_status_error(500, {})) == 0
    assert CallPolicy.spent(upstream_timeout(1)) == 0
    assert CallPolicy.spent(upstream_interrupted()) is None


@pytest.mark.parametrize(
    ("error", "falls_back"),
    [
        (CircuitOpen("open"), True),
        (upstream_status_error(500, {}), True),
        (upstream_status_error(429, {}), True),
        (upstream_status_error(403, {}), True),
        (upstream_status_error(400, {}), False),
        (BadRequest("bad"), False),
    ],
)
def test_what_falls_back(error: Exception, falls_back: bool) -> None:
    tries = Tries(time.time())
    job = with_fallback(make_job())
    assert CallPolicy.may_fall_back(job, error, tries) is falls_back  # type: ignore[arg-type]
    # Never without a next deployment, nor past the deadline.
    assert not CallPolicy.may_fall_back(make_job(), error, tries)  # type: ignore[arg-type]
    late = with_fallback(make_job(timeout=-1))
    assert not CallPolicy.may_fall_back(late, error, tries)  # type: ignore[arg-type]


def test_history_is_told_only_when_there_is_something_to_tell() -> None:
    tries = Tries(time.time())
    job = make_job()
    assert tries.history(job, 200, "") == []
    tries.retries = 1
    (attempt,) = tries.history(job, 200, "")
    assert (attempt.deployment, attempt.status, attempt.retries) == ("mock/mock", 200, 1)


def test_a_wildcard_route_is_one_deployment_whatever_the_model_name() -> None:
    job = msgspec.structs.replace(make_job("mock-fast"), route="mock*")
    assert deployment_name(job) == "mock/mock*"
    assert deployment_name(make_job("mock-fast")) == "mock/mock-fast"
