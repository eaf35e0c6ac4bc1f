"""What the CLI's calls need as AWS documents them, beyond the operation itself (found by review: the checker
missed each). Each test records the CLI's real `connections add`, takes out of docs/operator-policy.json (or narrows)
what AWS documents the call as needing, and expects the checker to name the denial."""

from __future__ import annotations

import io
import json
from typing import Any

import boto3
import permissions
from permissions import Checker

from admin.cli import main as cli
from tests.test_permissions import denials

HOSTS = ["--allowed-hosts", "*.service-now.com"]


def _add(*extra: str) -> list[Any]:
    permissions.RECORDER.take()
    out, err = io.StringIO(), io.StringIO()
    argv = [*HOSTS, "connections", "add", "prod", "--instance-url", "https://acme.service-now.com",
            "--client-id", "c1", *extra]  # fmt: skip
    assert cli(argv, out=out, err=err, stdin=io.StringIO("s3cret-A1\n")) == 0, err.getvalue()
    return permissions.RECORDER.take()


def _operator_policy_without(action: str) -> dict[str, Any]:
    document = json.loads((permissions.DOCS / "operator-policy.json").read_text())
    for statement in document["Statement"]:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        statement["Action"] = [a for a in actions if a != action] or ["none:None"]
    return document


def test_create_secret_with_tags_needs_tag_resource(permission_checker: Checker, aws: str) -> None:
    """CreateSecret's API reference: "If you include tags in the secret, you also need secretsmanager:TagResource".
    `connections add` always passes Tags (the health tags); an operator policy without TagResource fails in AWS."""
    calls = _add()
    [create] = [c for c in calls if c.operation == "CreateSecret"]
    assert create.params.get("Tags")
    assert denials(permission_checker, calls) == []
    checker = Checker(
        permission_checker.translated, operator_policy=_operator_policy_without("secretsmanager:TagResource")
    )
    found = denials(checker, [create])
    permissions.RECORDER.give_back(calls)
    assert any("secretsmanager:TagResource" in line for line in found), (
        "CreateSecret with Tags is allowed without secretsmanager:TagResource: "
        + repr([a.action for a in create.authorizations])
    )


def test_create_secret_with_replicas_needs_replicate_secret_to_regions(permission_checker: Checker, aws: str) -> None:
    """CreateSecret's API reference: "To add replica Regions, you must also have
    secretsmanager:ReplicateSecretToRegions"."""
    calls = _add("--replica-region", "eu-west-1")
    [create] = [c for c in calls if c.operation == "CreateSecret"]
    assert create.params.get("AddReplicaRegions")
    assert denials(permission_checker, calls) == []
    checker = Checker(
        permission_checker.translated,
        operator_policy=_operator_policy_without("secretsmanager:ReplicateSecretToRegions"),
    )
    found = denials(checker, [create])
    permissions.RECORDER.give_back(calls)
    assert any("ReplicateSecretToRegions" in line for line in found), (
        "CreateSecret with AddReplicaRegions is allowed without secretsmanager:ReplicateSecretToRegions: "
        + repr([a.action for a in create.authorizations])
    )


def test_a_replica_on_its_own_key_needs_that_key_through_the_replica_region(
    permission_checker: Checker, aws: str
) -> None:
    """ReplicateSecretToRegions' API reference: "To encrypt the replicated secret with a KMS key other than
    aws/secretsmanager, you need kms:GenerateDataKey and kms:Encrypt to the key" (Secrets Manager in the replica's
    region). An operator policy that lets KMS be used only through the primary region's Secrets Manager fails there."""
    primary_key = boto3.client("kms").create_key()["KeyMetadata"]["Arn"]
    replica_key = boto3.client("kms", region_name="eu-west-1").create_key()["KeyMetadata"]["Arn"]
    calls = _add("--kms-key-id", primary_key, "--replica-region", "eu-west-1",
                 "--replica-kms-key", f"eu-west-1={replica_key}")  # fmt: skip
    [create] = [c for c in calls if c.operation == "CreateSecret"]
    assert create.params["AddReplicaRegions"] == [{"Region": "eu-west-1", "KmsKeyId": replica_key}]
    assert denials(permission_checker, calls) == []
    document = json.loads((permissions.DOCS / "operator-policy.json").read_text())
    [kms] = [s for s in document["Statement"] if s["Sid"] == "SecretsOnACustomerManagedKey"]
    kms["Condition"] = {"StringEquals": {"kms:ViaService": "secretsmanager.us-east-1.amazonaws.com"}}
    found = denials(Checker(permission_checker.translated, operator_policy=document), [create])
    permissions.RECORDER.give_back(calls)
    assert any(replica_key in line for line in found), "the replica's key is never authorized: " + repr(
        [(a.action, a.resource) for a in create.authorizations]
    )
