"""`connections retire-jwt-key` against a concurrent stage-jwt-key (verifier-map trust), found by review: a key staged
between retire's re-read and its deletes lost its verifier map (failed before its fix); and retire claims a promotion
only from the value stored after it."""

from __future__ import annotations

import json
from typing import Any

import pytest

import admin.cli as cli_module
from admin.registration import VERIFIER_MAP
from local.servicenow_emulator import ServiceNowEmulator
from tests.conftest import new_key
from tests.test_registration import admin, document, instance, register, run, table  # noqa: F401


def rolled_to_key_2(instance: ServiceNowEmulator, kms: Any) -> tuple[str, str, str]:  # noqa: F811
    """A verifier-map JWT connection on key-1 with key-2 staged (and trusted by ServiceNow)."""
    instance.supports_jwks = False
    instance.add_user("svc.jwt", "jwt-user-password-1")
    first, second, third = new_key(kms), new_key(kms), new_key(kms)
    jwt = ["--grant-type", "jwt_bearer", "--jwt-subject", "svc.jwt", "--jwt-key-id", "key-1", "--jwt-kms-key", first]
    code, _out, err = register(instance, *jwt)
    assert (code, err) == (0, ""), err
    assert run("refresh", "prod")[0] == 0
    code, _out, err = stage_key(instance, "key-2", second)
    assert (code, err) == (0, ""), err
    return first, second, third


def stage_key(instance: ServiceNowEmulator, kid: str, key: str) -> tuple[int, str, str]:  # noqa: F811
    """An operator's `make stage-jwt-key`, the ServiceNow admin answering its prompt."""
    return run("connections", "stage-jwt-key", "prod", "--jwt-key-id", kid, "--jwt-kms-key", key, stdin=admin(instance))


def overwrite(secretsmanager: Any, secret_id: str, value: str) -> None:
    """Another writer's whole write as AWS does it: a new version made current, taken off the version that is current
    now. (moto's plain put demotes the version it last put itself, not one a stage move made current, and would
    leave AWSCURRENT on two versions after the stack's compare-and-swap writes.)"""
    stages = secretsmanager.describe_secret(SecretId=secret_id)["VersionIdsToStages"]
    current = next(version for version, labels in stages.items() if "AWSCURRENT" in labels)
    version = secretsmanager.put_secret_value(SecretId=secret_id, SecretString=value, VersionStages=["TESTWRITE"])
    secretsmanager.update_secret_version_stage(
        SecretId=secret_id, VersionStage="AWSCURRENT", MoveToVersionId=version["VersionId"], RemoveFromVersionId=current
    )
    stages = secretsmanager.describe_secret(SecretId=secret_id)["VersionIdsToStages"]
    assert sum("AWSCURRENT" in labels for labels in stages.values()) == 1


def test_a_key_staged_while_retire_runs_keeps_its_verifier_map(
    instance: ServiceNowEmulator,  # noqa: F811
    secretsmanager: Any,
    kms: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """retire-jwt-key promotes key-2 and re-reads the secret (current key-2, nothing staged). Before it lists and
    deletes the verifier maps, an operator's stage-jwt-key of key-3 completes: the secret stages key-3 and
    ServiceNow gets its map. retire-jwt-key then deletes key-3's map with the `keep` set computed from its stale
    read: the secret ends staging a key whose verifier map retire-jwt-key removed."""
    _first, _second, third = rolled_to_key_2(instance, kms)
    client_id = document(secretsmanager)["clientId"]
    real_remove = cli_module.remove_verifier_maps
    staged_meanwhile: list[tuple[int, str, str]] = []

    def stage_then_remove(*args: Any, **kwargs: Any) -> list[str]:
        if not staged_meanwhile:  # the concurrent writer, run once at this point of the interleaving
            staged_meanwhile.append(stage_key(instance, "key-3", third))
        return real_remove(*args, **kwargs)

    monkeypatch.setattr(cli_module, "remove_verifier_maps", stage_then_remove)
    code, out, err = run("connections", "retire-jwt-key", "prod", stdin=admin(instance))
    [(stage_code, _stage_out, stage_err)] = staged_meanwhile
    assert (stage_code, stage_err) == (0, ""), stage_err
    assert (code, err) == (0, ""), err

    after = document(secretsmanager)
    assert after["jwtKeyId"] == "key-2" and after["jwtKeyIdNext"] == "key-3"
    in_use = {after["jwtKeyId"], after["jwtKeyIdNext"]}
    trusted = {row["kid"] for row in table(instance, VERIFIER_MAP)}
    assert in_use <= trusted, (
        f"the secret uses {sorted(in_use)} but ServiceNow only trusts {sorted(trusted)}; retire said: {out!r}"
    )
    assert instance.jwt_key_ids(client_id) >= in_use


def test_retire_never_reports_a_promotion_the_secret_did_not_take_up(
    instance: ServiceNowEmulator,  # noqa: F811
    secretsmanager: Any,
    kms: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stored access token is due. retire-jwt-key gets a token with staged key-2; just before its write, an
    operator's stage-jwt-key of key-3 wins. The review's first version overwrote the secret with a plain put, which
    in moto leaves AWSCURRENT on two versions after a stage move (`overwrite` does it as AWS does): there, retire
    announced key-2 while the secret kept key-1. In a faithful world the refresher reports no promotion and retire
    refuses; it also checks the value stored after it, so it never claims what the secret does not hold."""
    _first, _second, third = rolled_to_key_2(instance, kms)
    # The stored access token is due (as it is whenever the sweep has not run for a while).
    due = {**document(secretsmanager), "accessTokenExpiresAt": "2000-01-01T00:00:00Z"}
    overwrite(secretsmanager, "servicenow-oauth/prod", json.dumps(due))
    real_store = cli_module._store
    staged_meanwhile: list[tuple[int, str, str]] = []
    armed = [True]

    def hooked_store(args: Any) -> Any:
        store = real_store(args)
        if armed[0]:
            armed[0] = False  # only retire-jwt-key's own client

            def before_put(params: dict[str, Any], **_: Any) -> None:
                value = json.loads(params.get("SecretString", "{}"))
                if staged_meanwhile or value.get("jwtKeyId") != "key-2":
                    return
                staged_meanwhile.append(stage_key(instance, "key-3", third))

            store.client.meta.events.register("before-parameter-build.secrets-manager.PutSecretValue", before_put)
        return store

    monkeypatch.setattr(cli_module, "_store", hooked_store)
    before_stage = document(secretsmanager)
    code, _out, err = run("connections", "retire-jwt-key", "prod", stdin=admin(instance))
    [(stage_code, _stage_out, stage_err)] = staged_meanwhile
    assert (stage_code, stage_err) == (0, ""), stage_err
    after = document(secretsmanager)
    trusted = {row["kid"] for row in table(instance, VERIFIER_MAP)}
    assert code != 0 or "key id key-2 is now the current key" not in _out or after["jwtKeyId"] == "key-2", (
        f"retire exited {code} saying {_out!r}, but the secret's current key is {after['jwtKeyId']!r} "
        f"(staged {after.get('jwtKeyIdNext')!r}); ServiceNow now trusts {sorted(trusted)}"
    )
    if code != 0:  # a refusal: the keys are what the concurrent stage left; a fresh token may be stored on them
        expected = {**before_stage, "jwtKeyIdNext": "key-3", "kmsKeyIdNext": third}
        changed = sorted(k for k in set(expected) | set(after) if expected.get(k) != after.get(k))
        assert set(changed) <= {"accessToken", "accessTokenExpiresAt", "updatedAt"}, (
            f"retire refused ({err.strip()!r}) yet changed {changed}"
        )
        assert {"key-1", "key-3"} <= trusted, f"a map of a key the secret uses was removed: {sorted(trusted)}"
