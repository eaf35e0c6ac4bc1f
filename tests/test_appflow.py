"""AppFlow sync: moto has no AppFlow, so a botocore Stubber on a real AppFlow client checks every request
against the service model, while the secret side runs on the moto server."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from core.appflow import SYNCED_TAG, AppFlowSync, update_request
from core.refresh import Refresher
from core.secret import Connection
from core.sweep import Sweep
from local.servicenow_emulator import ServiceNowEmulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REGION, FakeClock
from tests.test_refresh import World

PROFILE_ARN = "arn:aws:appflow:us-east-1:123456789012:connectorprofile/snow-prod"


@pytest.fixture
def appflow() -> Any:
    return boto3.client("appflow", region_name=REGION, endpoint_url="https://appflow.invalid")


def expected(world: World, name: str, profile: str) -> dict[str, Any]:
    """What the request must be for the secret's current version: built independently of update_request."""
    value = world.sm.get_secret_value(SecretId=f"servicenow-oauth/{name}", VersionStage="AWSCURRENT")
    document = json.loads(value["SecretString"])
    return {
        "connectorProfileName": profile,
        "connectionMode": "Public",
        "connectorProfileConfig": {
            "connectorProfileProperties": {"ServiceNow": {"instanceUrl": document["instanceUrl"]}},
            "connectorProfileCredentials": {
                "ServiceNow": {
                    "oAuth2Credentials": {
                        "clientId": CLIENT_ID,
                        "clientSecret": CLIENT_SECRET,
                        "accessToken": document["accessToken"],
                        "refreshToken": document["refreshToken"],
                    }
                }
            },
        },
        "clientToken": update_request(world.store.get(name).connection, profile, value["VersionId"])["clientToken"],
    }


def tags(world: World, name: str = "prod") -> dict[str, str]:
    listed = world.sm.describe_secret(SecretId=f"servicenow-oauth/{name}").get("Tags", [])
    return {tag["Key"]: tag["Value"] for tag in listed}


def sync_refresher(world: World, appflow: Any) -> Refresher:
    refresher = world.refresher()
    refresher.appflow = AppFlowSync(appflow, world.sm)
    return refresher


def test_request_matches_the_service_model_and_is_idempotent_per_version(emulator: ServiceNowEmulator) -> None:
    connection = Connection("prod", emulator.url, CLIENT_ID, CLIENT_SECRET, access_token="at", refresh_token="rt")
    first = update_request(connection, "snow-prod", "v1")
    assert first == update_request(connection, "snow-prod", "v1")
    assert first["clientToken"] != update_request(connection, "snow-prod", "v2")["clientToken"]
    assert first["clientToken"] != update_request(connection, "snow-other", "v1")["clientToken"]
    client = boto3.client("appflow", region_name=REGION, endpoint_url="https://appflow.invalid")
    with Stubber(client) as stub:  # botocore validates the parameters against AppFlow's model
        stub.add_response("update_connector_profile", {"connectorProfileArn": PROFILE_ARN}, first)
        client.update_connector_profile(**first)


def test_refreshed_tokens_are_pushed_once_and_remembered(
    secretsmanager: Any, emulator: ServiceNowEmulator, clock: FakeClock, appflow: Any, leak_check: list
) -> None:
    world = World(secretsmanager, emulator, clock)
    world.add(appflowConnectorProfiles=["snow-prod"])
    clock.advance(1700)
    refresher = sync_refresher(world, appflow)
    with Stubber(appflow) as stub:
        # The request is only known after the refresh; check it in the call itself.
        seen: list[dict[str, Any]] = []
        appflow.meta.events.register(
            "provide-client-params.appflow.UpdateConnectorProfile", lambda params, **_: seen.append(params)
        )
        stub.add_response("update_connector_profile", {"connectorProfileArn": PROFILE_ARN})
        [outcome] = Sweep(refresher).run()
        stub.assert_no_pending_responses()
    assert outcome.result == "refreshed" and outcome.appflow_synced == ("snow-prod",)
    assert seen == [expected(world, "prod", "snow-prod")]
    version = world.store.get("prod").version_id
    assert tags(world)[SYNCED_TAG] == version
    with Stubber(appflow):  # no response queued: any AppFlow call now would raise
        [again] = Sweep(refresher).run()
    assert again.result == "not_due" and again.appflow_synced == ()


def test_a_failed_push_never_blocks_the_secret_and_is_retried_next_run(
    secretsmanager: Any, emulator: ServiceNowEmulator, clock: FakeClock, appflow: Any, leak_check: list
) -> None:
    world = World(secretsmanager, emulator, clock)
    world.add(appflowConnectorProfiles=["snow-prod", "snow-backup"])
    clock.advance(1700)
    refresher = sync_refresher(world, appflow)
    with Stubber(appflow) as stub:
        stub.add_response("update_connector_profile", {"connectorProfileArn": PROFILE_ARN})
        stub.add_client_error("update_connector_profile", service_error_code="ConflictException", http_status_code=409)
        [outcome] = Sweep(refresher).run()
    leak_check.append(repr(outcome))
    assert outcome.result == "refreshed"
    assert outcome.appflow_failed == ("snow-backup (ConflictException)",)
    refreshed = world.store.get("prod")
    assert refreshed.connection.access_token_expires_at == outcome.access_token_expires_at
    assert SYNCED_TAG not in tags(world)
    with Stubber(appflow) as stub:  # next sweep: not due, but the push is owed
        stub.add_response("update_connector_profile", {"connectorProfileArn": PROFILE_ARN})
        stub.add_response("update_connector_profile", {"connectorProfileArn": PROFILE_ARN})
        [retry] = Sweep(refresher).run()
        stub.assert_no_pending_responses()
    assert retry.result == "not_due" and retry.appflow_synced == ("snow-prod", "snow-backup")
    assert tags(world)[SYNCED_TAG] == refreshed.version_id


def test_connections_without_profiles_never_call_appflow(
    secretsmanager: Any, emulator: ServiceNowEmulator, clock: FakeClock, appflow: Any
) -> None:
    world = World(secretsmanager, emulator, clock)
    world.add()
    clock.advance(1700)
    with Stubber(appflow):
        [outcome] = Sweep(sync_refresher(world, appflow)).run()
    assert outcome.result == "refreshed" and outcome.appflow_synced == () and outcome.appflow_failed == ()


def test_a_push_that_keeps_failing_backs_off_instead_of_calling_every_sweep(
    secretsmanager: Any, emulator: ServiceNowEmulator, clock: FakeClock, appflow: Any
) -> None:
    from core.monitor import Monitor

    world = World(secretsmanager, emulator, clock)
    world.add(appflowConnectorProfiles=["snow-prod"])
    clock.advance(1700)
    refresher = sync_refresher(world, appflow)
    refresher.monitor = Monitor(secretsmanager, None, clock=clock.now, policy=refresher.policy)
    calls = refreshes = 0
    with Stubber(appflow) as stub:
        for _ in range(24):  # two hours of sweeps, AppFlow denying every push
            stub.add_client_error("update_connector_profile", service_error_code="AccessDeniedException")
        for _ in range(24):
            before = len(stub._queue)
            refreshes += sum(1 for outcome in Sweep(refresher).run() if outcome.result == "refreshed")
            calls += before - len(stub._queue)
            clock.advance(300)
    # Each new token is offered once; in between, retries back off (5, 10, 20, 40 min): not one call per sweep.
    assert calls <= refreshes + 4 < 24, (calls, refreshes)
