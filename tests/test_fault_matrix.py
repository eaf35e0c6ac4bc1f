"""Every fault the emulator and moto can produce, at every step of the sweep and the callback.

After each case: the secret still holds a usable credential (or an explicit reauthorization_required
with the old tokens), the next run recovers, and nothing secret reached a log, metric, page or error
(`leak_check`). AWS-side faults (throttling, conflicts) are raised by a botocore hook in front of the
real moto server, as if boto3 had exhausted its own retries.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber

from core.appflow import AppFlowSync
from core.sweep import Sweep
from local.servicenow_emulator import ServiceNowEmulator, press_consent
from tests.conftest import CLIENT_ID, REGION, FakeClock
from tests.test_callback import Stack, stack  # noqa: F401 (fixture)
from tests.test_refresh import World

TOKEN_FAULTS = ["slow", "drop", "hibernate", "rate_limit", "server_error"]


@contextmanager
def aws_fault(client: Any, operation: str, code: str, times: int = 100) -> Iterator[list[str]]:
    """Make `operation` fail with `code` for the next `times` calls, then behave again."""
    raised: list[str] = []

    def fail(model: Any, **_: Any) -> None:
        if model.name == operation and len(raised) < times:
            raised.append(code)
            raise ClientError({"Error": {"Code": code, "Message": "injected"}}, operation)

    client.meta.events.register(f"before-call.secretsmanager.{operation}", fail)
    try:
        yield raised
    finally:
        client.meta.events.unregister(f"before-call.secretsmanager.{operation}", fail)


def usable(world: World, name: str = "prod") -> dict[str, Any]:
    """The invariant: a valid access token, or reauthorization_required with the old tokens kept."""
    _, document = world.value(name)
    info = world.emulator.token_info(document["accessToken"]) or {}
    if document["status"] == "reauthorization_required":
        assert document["accessToken"] and document["refreshToken"], "marked dead but the tokens were dropped"
    else:
        assert document["status"] == "active" and info.get("active"), "the secret holds no usable token"
    return document


def recovers(world: World) -> None:
    world.emulator.clear_faults()
    outcomes = {o.connection: o.result for o in Sweep(world.refresher()).run()}
    assert outcomes["prod"] in ("refreshed", "not_due"), outcomes
    assert usable(world)["status"] == "active"


@pytest.fixture
def due(world: World) -> World:
    world.add()
    world.clock.advance(1700)
    return world


@pytest.fixture
def world(secretsmanager: Any, emulator: ServiceNowEmulator, clock: FakeClock) -> World:
    return World(secretsmanager, emulator, clock)


# ----------------------------------------------------------------------------------------- the sweep
@pytest.mark.parametrize("fault", TOKEN_FAULTS)
def test_sweep_token_call_faults(due: World, fault: str, leak_check: list) -> None:
    before = due.value()
    due.emulator.inject(fault, count=10, retry_after=0, delay=1.2)
    [outcome] = Sweep(due.refresher()).run()
    leak_check.append(repr(outcome))
    assert outcome.result == "failed" and due.value() == before
    usable(due)
    recovers(due)


def test_sweep_token_call_rejected(due: World, leak_check: list) -> None:
    due.emulator.revoke_user_tokens("svc.integration")
    [outcome] = Sweep(due.refresher()).run()
    leak_check.append(repr(outcome))
    assert outcome.result == "reauthorization_required"
    usable(due)  # old tokens kept, explicitly marked


def test_sweep_listing_fault_fails_the_invocation(due: World, leak_check: list) -> None:
    before = due.value()
    with aws_fault(due.sm, "ListSecrets", "ThrottlingException"), pytest.raises(ClientError) as raised:
        Sweep(due.refresher()).run()  # the Lambda fails loudly (RefreshErrorsAlarm); nothing is written
    leak_check.append(raised.value)
    assert due.value() == before
    usable(due)
    recovers(due)


@pytest.mark.parametrize("code", ["ThrottlingException", "InternalServiceError"])
def test_sweep_batch_read_fault_costs_only_that_batch(due: World, code: str, leak_check: list) -> None:
    before = due.value()
    with aws_fault(due.sm, "BatchGetSecretValue", code):
        [outcome] = Sweep(due.refresher()).run()  # one throttled batch must not stop the other batches
    leak_check.append(repr(outcome))
    assert outcome.result == "failed" and outcome.failure == "transient" and code in (outcome.detail or "")
    assert due.value() == before
    usable(due)
    recovers(due)


@pytest.mark.parametrize(
    ("operation", "code"),
    [
        ("PutSecretValue", "ThrottlingException"),
        ("UpdateSecretVersionStage", "ThrottlingException"),
        ("PutSecretValue", "InternalServiceError"),
    ],
)
def test_sweep_secret_write_faults(due: World, operation: str, code: str, leak_check: list) -> None:
    before = due.value()
    with aws_fault(due.sm, operation, code):
        [outcome] = Sweep(due.refresher()).run()
    leak_check.append(repr(outcome))
    assert outcome.result == "write_failed" and due.value()[1] == before[1]
    usable(due)
    recovers(due)


def test_sweep_version_conflict(due: World, leak_check: list) -> None:
    """Someone writes between our read and our promote: we build on their value, never over it."""
    original_put = due.store.compare_and_swap
    raced: list[bool] = []

    def racing(read: Any, new: Any, **kwargs: Any) -> Any:
        if not raced:
            raced.append(True)
            other = due.store.get("prod")
            original_put(
                other,
                other.connection.with_token(
                    due.client.refresh(other.connection.app, other.connection.refresh_token),
                    grant="refresh_token",
                    now=due.clock.now(),
                ),
            )
        return original_put(read, new, **kwargs)

    due.store.compare_and_swap = racing  # type: ignore[method-assign]
    [outcome] = Sweep(due.refresher()).run()
    assert outcome.result == "not_due" and outcome.detail == "updated concurrently"
    usable(due)
    recovers(due)


def test_sweep_appflow_faults(
    secretsmanager: Any, emulator: ServiceNowEmulator, clock: FakeClock, leak_check: list
) -> None:
    import boto3

    world = World(secretsmanager, emulator, clock)
    world.add(appflowConnectorProfiles=["snow-prod"])
    clock.advance(1700)
    appflow = boto3.client("appflow", region_name=REGION, endpoint_url="https://appflow.invalid")
    refresher = world.refresher()
    refresher.appflow = AppFlowSync(appflow, secretsmanager)
    for code in ("ThrottlingException", "ValidationException", "InternalServerException"):
        with Stubber(appflow) as stub:
            stub.add_client_error("update_connector_profile", service_error_code=code, http_status_code=400)
            [outcome] = Sweep(refresher).run()
        leak_check.append(repr(outcome))
        assert outcome.appflow_failed == (f"snow-prod ({code})",)
        usable(world)
    with Stubber(appflow) as stub:
        stub.add_response(
            "update_connector_profile",
            {"connectorProfileArn": "arn:aws:appflow:us-east-1:123456789012:connectorprofile/snow-prod"},
        )
        [outcome] = Sweep(refresher).run()
    assert outcome.appflow_synced == ("snow-prod",)


# -------------------------------------------------------------------------------------- the callback
def consent_redirect(running: Stack) -> dict[str, str]:
    return press_consent(running.start())


@pytest.mark.parametrize("fault", [*TOKEN_FAULTS, "rejected"])
def test_callback_code_exchange_faults(stack: Stack, fault: str, leak_check: list) -> None:  # noqa: F811
    stack.create_connection()
    before = stack.snapshot()
    redirect = consent_redirect(stack)
    if fault == "rejected":
        stack.emulator.set_client_secret(CLIENT_ID, "changed-in-servicenow-1")
    else:
        stack.handler.servicenow._timeout = (1, 1)  # a slow instance times out in 1 s here, not 10
        stack.emulator.inject(fault, count=10, retry_after=0, delay=1.2)
    answer = stack.get("/callback", redirect)
    leak_check.append(answer["body"])
    assert 500 <= answer["statusCode"] < 600 and stack.snapshot() == before
    stack.emulator.clear_faults()
    if fault == "rejected":
        return  # recovery needs a person to fix clientSecret: the page says so
    assert stack.get("/callback", consent_redirect(stack))["statusCode"] == 200  # a new consent recovers


@pytest.mark.parametrize(
    ("operation", "code"),
    [
        ("GetSecretValue", "ThrottlingException"),
        ("PutSecretValue", "ThrottlingException"),
        ("UpdateSecretVersionStage", "InternalServiceError"),
    ],
)
def test_callback_secret_faults(stack: Stack, operation: str, code: str, leak_check: list) -> None:  # noqa: F811
    stack.create_connection()
    before = stack.snapshot()
    redirect = consent_redirect(stack)
    client = stack.handler.store.client
    with aws_fault(client, operation, code):
        answer = stack.get("/callback", redirect)
    leak_check.append(answer["body"])
    assert answer["statusCode"] == 500 and "Traceback" not in answer["body"]
    assert json.loads(stack.snapshot()[1]) == json.loads(before[1])
    assert stack.get("/callback", consent_redirect(stack))["statusCode"] == 200


def test_callback_version_conflict(stack: Stack, leak_check: list) -> None:  # noqa: F811
    """A sweep writes while the callback exchanges the code: the consent lands on top of the sweep's value."""
    stack.create_connection()
    redirect = consent_redirect(stack)
    store = stack.handler.store
    original = store.compare_and_swap
    raced: list[bool] = []

    def racing(read: Any, new: Any, **kwargs: Any) -> Any:
        if not raced:
            raced.append(True)
            other = store.get("prod")
            original(other, type(other.connection)(**{**other.connection.__dict__, "scope": "raced"}))
        return original(read, new, **kwargs)

    store.compare_and_swap = racing
    answer = stack.get("/callback", redirect)
    store.compare_and_swap = original
    assert answer["statusCode"] == 200
    document = json.loads(stack.snapshot()[1])
    assert document["status"] == "active" and document["accessToken"]
    assert document["scope"] in ("raced", "useraccount")
