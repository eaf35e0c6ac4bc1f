"""`servicenow-client --grant-type jwt_bearer`: reruns, a fault at each step part-way, a release switched between
runs, and a map or certificate of another key under the same kid (the last two failed before their fixes)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from botocore.exceptions import ClientError

from admin.registration import TableApi
from core.store import ConnectionStore
from local.servicenow_emulator import ServiceNowEmulator
from tests.conftest import new_key
from tests.test_registration import accepted, document, register, run, table, versions
from tests.test_registration import instance as instance


def jwt_args(key: str) -> list[str]:
    return ["--grant-type", "jwt_bearer", "--jwt-subject", "svc.jwt", "--jwt-key-id", "key-1", "--jwt-kms-key", key]


def table_writes(instance: ServiceNowEmulator, start: int) -> list[tuple[str, str]]:
    return [
        (e["method"], e["path"])
        for e in instance.requests_log[start:]
        if e["path"].startswith("/api/now/table/") and e["method"] != "GET"
    ]


@pytest.mark.parametrize("first_jwks", [False, True], ids=["verifier_map-then-zurich", "zurich-then-older"])
def test_a_rerun_after_a_release_switch_changes_nothing(
    instance: ServiceNowEmulator, secretsmanager: Any, kms: Any, first_jwks: bool
) -> None:
    instance.add_user("svc.jwt", "jwt-user-password-1")
    instance.supports_jwks = first_jwks
    args = jwt_args(new_key(kms))
    code, out, err = register(instance, *args)
    assert (code, err) == (0, ""), err
    rows, before, start = copy.deepcopy(instance.tables.rows), versions(secretsmanager), len(instance.requests_log)
    trust = document(secretsmanager)["servicenowTrust"]

    instance.supports_jwks = not first_jwks
    code, out, err = register(instance, *args)
    assert (code, err) == (0, ""), err
    assert table_writes(instance, start) == [], (trust, out)
    assert instance.tables.rows == rows, out
    assert versions(secretsmanager) == before, out


@pytest.mark.parametrize("trust", ["jwks", "verifier_map"])
def test_a_plain_rerun_changes_nothing(instance: ServiceNowEmulator, secretsmanager: Any, kms: Any, trust: str) -> None:
    instance.add_user("svc.jwt", "jwt-user-password-1")
    args = [*jwt_args(new_key(kms)), "--trust", trust]
    assert register(instance, *args)[0] == 0
    rows, before, start = copy.deepcopy(instance.tables.rows), versions(secretsmanager), len(instance.requests_log)
    code, _out, err = register(instance, *args)
    assert (code, err) == (0, ""), err
    assert table_writes(instance, start) == [] and instance.tables.rows == rows and versions(secretsmanager) == before


def fault_on(monkeypatch: pytest.MonkeyPatch, instance: ServiceNowEmulator, kind: str, method: str, table_name: str):
    """Inject `kind` on the first `method` request to `table_name` (a POST or PATCH, not the reads before it)."""
    real = TableApi.call
    state = {"done": False}

    def call(self: TableApi, m: str, t: str, sys_id: str | None = None, **kwargs: Any) -> Any:
        if not state["done"] and m == method and t == table_name:
            state["done"] = True
            path = f"/api/now/table/{t}" + (f"/{sys_id}" if sys_id else "")
            instance.inject(kind, path=path, count=1)
        return real(self, m, t, sys_id, **kwargs)

    monkeypatch.setattr(TableApi, "call", call)
    return state


STEPS = [
    ("POST", "oauth_jwt"),
    ("POST", "sys_certificate"),
    ("POST", "jwt_verifier_map"),
    ("PATCH", "oauth_jwt"),
]


# JWKS trust writes no certificate and no verifier map: those steps exist in the verifier-map mode only.
CASES = [
    (trust, step)
    for trust in ("verifier_map", "jwks")
    for step in STEPS
    if trust == "verifier_map" or step[1] not in ("sys_certificate", "jwt_verifier_map")
]


@pytest.mark.parametrize("kind", ["server_error", "lost"])
@pytest.mark.parametrize(("trust", "step"), CASES, ids=[f"{t}-{m}-{n}" for t, (m, n) in CASES])
def test_a_failure_part_way_is_finished_by_a_rerun(
    instance: ServiceNowEmulator,
    secretsmanager: Any,
    kms: Any,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    step: tuple[str, str],
    trust: str,
) -> None:
    method, table_name = step
    instance.add_user("svc.jwt", "jwt-user-password-1")
    args = [*jwt_args(new_key(kms)), "--trust", trust]
    if method == "PATCH":  # a PATCH happens on a rerun after a failed secret write
        real_create = ConnectionStore.create

        def refused(*a: Any, **k: Any) -> Any:
            raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "CreateSecret")

        monkeypatch.setattr(ConnectionStore, "create", refused)
        assert register(instance, *args)[0] == 1
        monkeypatch.setattr(ConnectionStore, "create", real_create)
    state = fault_on(monkeypatch, instance, kind, method, table_name)
    code, out, err = register(instance, *args)
    assert state["done"] and code != 0, (out, err)
    monkeypatch.undo()
    instance.clear_faults()
    code, out, err = register(instance, *args)
    assert (code, err) == (0, ""), err
    assert len(table(instance, "oauth_entity")) == 1
    if trust == "verifier_map":
        assert len(table(instance, "sys_certificate")) == 1
        [mapping] = table(instance, "jwt_verifier_map")
        [entry] = table(instance, "oauth_jwt")
        [cert] = table(instance, "sys_certificate")
        assert mapping["sys_certificate"]["value"] == cert["sys_id"]
        assert mapping["oauth_jwt"]["value"] == entry["sys_id"]
    if trust == "jwks":  # the JWKS URL here is not served (no stack): check the stored client secret instead
        stored = document(secretsmanager)
        [entry] = table(instance, "oauth_jwt")
        assert entry["client_id"] == stored["clientId"] and entry["jwks_url"].endswith("/connections/prod/jwks.json")
        assert accepted(instance, stored["clientId"], stored["clientSecret"])
        return
    code, out, err = run("refresh", "prod")
    assert (code, err) == (0, "") and "refreshed" in out, (out, err)


def test_a_secret_write_failure_then_rerun_with_the_stack_key(
    instance: ServiceNowEmulator, secretsmanager: Any, kms: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret write that fails, rerun: refresh works and no second map."""
    instance.add_user("svc.jwt", "jwt-user-password-1")
    args = [*jwt_args(new_key(kms)), "--trust", "verifier_map"]

    def refused(*a: Any, **k: Any) -> Any:
        raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "CreateSecret")

    monkeypatch.setattr(ConnectionStore, "create", refused)
    assert register(instance, *args)[0] == 1
    monkeypatch.undo()
    code, out, err = register(instance, *args)
    assert (code, err) == (0, ""), err
    assert len(table(instance, "jwt_verifier_map")) == 1
    code, out, err = run("refresh", "prod")
    assert (code, err) == (0, "") and "refreshed" in out, (out, err)


def test_a_rerun_with_another_kms_key_for_the_same_kid_never_maps_the_wrong_certificate(
    instance: ServiceNowEmulator, secretsmanager: Any, kms: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(d): a half-done run (map made for key A, secret write failed) rerun with key B under the same kid: either
    refused, or the connection ends up signing with the key its verifier map's certificate holds."""
    instance.add_user("svc.jwt", "jwt-user-password-1")
    first, second = new_key(kms), new_key(kms)

    def refused(*a: Any, **k: Any) -> Any:
        raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "CreateSecret")

    monkeypatch.setattr(ConnectionStore, "create", refused)
    assert register(instance, *jwt_args(first), "--trust", "verifier_map")[0] == 1
    monkeypatch.undo()
    code, out, err = register(instance, *jwt_args(second), "--trust", "verifier_map")
    if code != 0:
        return  # refused: acceptable
    assert document(secretsmanager)["kmsKeyId"] == second
    code, out, err = run("refresh", "prod")
    assert (code, err) == (0, "") and "refreshed" in out, (
        "the verifier map for key-1 points at the certificate of the first KMS key while the connection signs "
        f"with the second: {out} {err}"
    )
