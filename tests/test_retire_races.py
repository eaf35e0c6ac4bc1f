"""`connections retire-jwt-key` against a concurrent stage-jwt-key (verifier-map trust). Both failed before their
fixes (found by review): a key staged between the re-read and the deletes lost its map, and a promotion the stored
value did not take up was announced (and the announced key's map deleted)."""

from __future__ import annotations

import json
from typing import Any

import pytest

import admin.cli as cli_module
from admin.registration import VERIFIER_MAP
from local.servicenow_emulator import ServiceNowEmulator
from tests.test_registration import admin, document, instance, kms, new_key, register, run, table  # noqa: F401


def rolled_to_key_2(instance: ServiceNowEmulator, kms: Any) -> tuple[str, str, str]:  # noqa: F811
    """A verifier-map JWT connection on key-1 with key-2 staged (and trusted by ServiceNow)."""
    instance.supports_jwks = False
    instance.add_user("svc.jwt", "jwt-user-password-1")
    first, second, third = new_key(kms), new_key(kms), new_key(kms)
    jwt = ["--grant-type", "jwt_bearer", "--jwt-subject", "svc.jwt", "--jwt-key-id", "key-1", "--jwt-kms-key", first]
    code, _out, err = register(instance, *jwt)
    assert (code, err) == (0, ""), err
    assert run("refresh", "prod")[0] == 0
    stage = ["connections", "stage-jwt-key", "prod", "--jwt-key-id", "key-2", "--jwt-kms-key", second]
    code, _out, err = run(*stage, stdin=admin(instance))
    assert (code, err) == (0, ""), err
    return first, second, third


def test_a_key_staged_while_retire_runs_keeps_its_verifier_map(
    instance: ServiceNowEmulator,  # noqa: F811
    secretsmanager: Any,
    kms: Any,  # noqa: F811
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
            stage = ["connections", "stage-jwt-key", "prod", "--jwt-key-id", "key-3", "--jwt-kms-key", third]
            staged_meanwhile.append(run(*stage, stdin=admin(instance)))
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
    kms: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stored access token is due. retire-jwt-key gets a token with staged key-2; just before its write, an
    operator's stage-jwt-key of key-3 wins. retire-jwt-key exited 0 saying key-2 was current while the secret kept
    key-1, and deleted key-2's map; it now claims only what the stored value shows, else refuses changing nothing."""
    _first, _second, third = rolled_to_key_2(instance, kms)
    # The stored access token is due (as it is whenever the sweep has not run for a while).
    due = {**document(secretsmanager), "accessTokenExpiresAt": "2000-01-01T00:00:00Z"}
    secretsmanager.put_secret_value(SecretId="servicenow-oauth/prod", SecretString=json.dumps(due))
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
                stage = ["connections", "stage-jwt-key", "prod", "--jwt-key-id", "key-3", "--jwt-kms-key", third]
                staged_meanwhile.append(run(*stage, stdin=admin(instance)))

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
    if code != 0:  # a refusal: the secret must be exactly what the concurrent stage left
        expected = {**before_stage, "jwtKeyIdNext": "key-3", "kmsKeyIdNext": third}
        changed = sorted(k for k in set(expected) | set(after) if expected.get(k) != after.get(k))
        assert not changed, f"retire refused ({err.strip()!r}) yet changed {changed}"
