"""Schemathesis against the real processes, driven by the served ``/openapi.json``.

Every operation of the document gets generated requests, valid ones (with the
model set to a routed one, so they run through a worker and the mock upstream)
and invalid ones. The run fails on any 5xx, any answer that does not match the
document (status, content type, headers, body) and any answer slower than 5 s.
``--fuzz-examples N`` sets the number of valid requests per operation (the
invalid ones are half that; default 200). Schemathesis leaves out the operation
that serves the document itself (``GET /openapi.json``); tests/test_openapi.py
covers it.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from hypothesis.strategies import SearchStrategy
from schemathesis import APIOperation, Case, GenerationMode, Response
from schemathesis.checks import CheckFunction
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.core.result import Err
from schemathesis.specs.openapi import checks as oas

from llm_broker.shared.config import hash_key
from tests.conftest import ConfigFactory, Procs

pytestmark = pytest.mark.fuzz

AnyCase = Case[Any]
Operation = APIOperation[Any, Any, Any, Any]

SLOWEST_S = 5.0
#: A client's own deadline below this may pass in the queue: its 504 is the documented answer.
_SHORT_DEADLINE_S = 1.0


def _check_fns() -> list[CheckFunction]:
    return [
        schemathesis.checks.not_a_server_error,
        oas.status_code_conformance,
        oas.content_type_conformance,
        oas.response_headers_conformance,
        oas.response_schema_conformance,
    ]


@dataclass
class Findings:
    cases: int = 0
    statuses: dict[str, dict[int, int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    #: Jobs the fuzzed submissions created, for the operations on one job.
    job_ids: list[str] = field(default_factory=list)

    def add(self, case: AnyCase, what: str, response: Response | None) -> None:
        sent = case.as_curl_command(headers={"Authorization": "Bearer ..."})
        got = (
            "" if response is None else f"-> {response.status_code} {response.text_lossy()[:300]!r}"
        )
        self.failures.append(f"{case.operation.label}: {what}\n  {sent}\n  {got}")


def _routed(case: AnyCase) -> None:
    """A call names a routed model, so that it gets past routing and runs upstream."""
    body = case.body
    if isinstance(body, dict):
        target = body.get("request") if case.operation.path == "/v1/jobs" else body
        if isinstance(target, dict) and isinstance(target.get("model"), str):
            target["model"] = "mock"
            target.pop("mock", None)  # the mock upstream's behaviour switch


def _own_deadline(case: AnyCase, response: Response) -> bool:
    """A 504 for a deadline the client itself set very short."""
    if response.status_code != 504:
        return False
    try:
        seconds = float(case.headers.get("X-Request-Timeout", "inf") if case.headers else "inf")
    except ValueError:
        return False
    return seconds < _SHORT_DEADLINE_S


def _run(
    case: AnyCase, url: str, session: requests.Session, auth: dict[str, str], found: Findings
) -> None:
    found.cases += 1
    started = time.monotonic()
    try:
        response = case.call(base_url=url, session=session, headers=auth, timeout=SLOWEST_S * 2)
    except requests.RequestException as e:
        found.add(case, f"no answer: {e!r}", None)
        return
    elapsed = time.monotonic() - started
    seen = found.statuses.setdefault(case.operation.label, {})
    seen[response.status_code] = seen.get(response.status_code, 0) + 1
    if response.status_code == 202:
        found.job_ids.append(response.json()["id"])
    if elapsed > SLOWEST_S:
        found.add(case, f"answered in {elapsed:.1f}s", response)
    checks = _check_fns()
    if _own_deadline(case, response):
        checks.remove(schemathesis.checks.not_a_server_error)
    try:
        case.validate_response(response, checks=checks, headers=auth)
    except (Failure, FailureGroup) as e:
        found.add(case, str(e).strip()[:1500], response)


def _strategies(
    operation: Operation, examples: int, found: Findings
) -> list[tuple[str, SearchStrategy[AnyCase], int]]:
    """What to generate for one operation: valid requests, invalid ones and, for the
    operations on one job, valid requests about the jobs the fuzzer created. A batch of
    Messages requests gets a tenth as many: each case holds many requests of the
    ``/v1/messages`` schema, fuzzed in full there, and costs seconds to generate."""
    if operation.path == "/v1/messages/batches" and operation.method.upper() == "POST":
        examples = max(10, examples // 10)
    plans = [
        ("valid", operation.as_strategy(GenerationMode.POSITIVE), examples),
        ("invalid", operation.as_strategy(GenerationMode.NEGATIVE), examples // 2),
    ]
    if "{job_id}" in operation.path and found.job_ids:
        ids = st.sampled_from(found.job_ids)
        existing = ids.flatmap(lambda i: operation.as_strategy(path_parameters={"job_id": i}))
        plans.append(("existing job", existing, examples // 2))
    return plans


def _fuzz_operation(
    operation: Operation, url: str, auth: dict[str, str], examples: int, found: Findings
) -> None:
    with requests.Session() as session:
        for kind, strategy, count in _strategies(operation, examples, found):
            if count == 0:
                continue

            @settings(
                max_examples=count,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=strategy)
            def run(case: AnyCase) -> None:
                _routed(case)
                _run(case, url, session, auth, found)

            try:
                run()
            except Unsatisfiable:
                # Nothing of this operation can be made invalid (no body, no parameters).
                assert kind == "invalid", operation.label


def test_fuzz_every_operation(
    procs: Procs, make_config: ConfigFactory, request: pytest.FixtureRequest
) -> None:
    examples: int = request.config.getoption("--fuzz-examples")
    key = "sk-fuzz-" + secrets.token_hex(8)
    _, mock_url = procs.mock()
    config = make_config(mock_url, auth={"keys": [{"tenant": "fuzz", "sha256": hash_key(key)}]})
    procs.worker(config)
    _, url = procs.ingress(config)
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    auth = {"Authorization": f"Bearer {key}"}
    found = Findings()
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            pytest.fail(f"the document has an operation schemathesis cannot use: {result.err()}")
        operation = result.ok()
        _fuzz_operation(operation, url, auth, examples, found)
    print(f"{found.cases} cases; statuses by operation:")
    for label, seen in found.statuses.items():
        print(f"  {label}: {json.dumps(seen, sort_keys=True)}")
    assert not found.failures, f"{len(found.failures)} failures:\n\n" + "\n\n".join(
        found.failures[:20]
    )
