"""Consumers in other accounts and regions, on the moto server: resource policies put (and refused), the
customer-managed key a cross-account reader needs, replicas read by the consumer helper from their region,
and the README's consumer policies checked against what the helper actually calls.

moto has no `ValidateResourcePolicy`; a before-call hook answers it in the API's own shape with the check AWS
documents for `BlockPublicPolicy` (a wildcard principal is public), the way tests/test_appflow.py answers
AppFlow. Our own parser refuses wildcards before any call, so the hook is the second line, as in AWS.
"""

from __future__ import annotations

import fnmatch
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse

from admin.cli import main as cli
from core.consumer import servicenow_session

DOCS = Path(__file__).resolve().parent.parent / "docs" / "consumer-policies"
HOSTS = ["--allowed-hosts", "127.0.0.1,*.service-now.com"]
OTHER_ACCOUNT = "444455556666"
ROLE = f"arn:aws:iam::{OTHER_ACCOUNT}:role/erp-reader"
SECRET = "servicenow-oauth/prod"


@pytest.fixture
def aws_calls(aws: str) -> Iterator[list[tuple[str, str]]]:
    """Every AWS call the code under test makes, as (region, operation); ValidateResourcePolicy answered."""
    calls: list[tuple[str, str]] = []

    def record(model: Any, context: Any, **_: Any) -> None:
        calls.append((context.get("client_region", "?"), model.name))

    def validate(params: dict[str, Any], **_: Any) -> Any:
        document = json.loads(json.loads(params["body"])["ResourcePolicy"])  # the serialized request's body
        public = any("*" in json.dumps(statement.get("Principal", {})) for statement in document.get("Statement", []))
        errors = [{"CheckName": "BLOCK_PUBLIC_POLICY", "ErrorMessage": "the policy grants public access"}]
        body = {"PolicyValidationPassed": not public, "ValidationErrors": errors if public else []}
        return AWSResponse("http://test", 200, {}, None), body

    boto3.setup_default_session()
    session = boto3.DEFAULT_SESSION
    assert session is not None
    session.events.register("before-call.*.*", record)
    session.events.register("before-call.secrets-manager.ValidateResourcePolicy", validate)
    yield calls
    boto3.DEFAULT_SESSION = None


def run(*argv: str, stdin: str = "client-secret-A9\n") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli([*HOSTS, *argv], out=out, err=err, stdin=io.StringIO(stdin))
    return code, out.getvalue(), err.getvalue()


def add(*extra: str) -> tuple[int, str, str]:
    return run(
        "connections", "add", "prod", "--instance-url", "https://acme.service-now.com", "--client-id", "c1", *extra
    )


def secrets() -> list[str]:
    return [s["Name"] for s in boto3.client("secretsmanager").list_secrets()["SecretList"]]


def cmk() -> str:
    return str(boto3.client("kms").create_key()["KeyMetadata"]["Arn"])


def test_a_reader_in_another_account_needs_a_customer_managed_key(aws_calls: list[Any]) -> None:
    code, _, err = add("--consumer", ROLE)
    assert code == 2 and "customer-managed KMS key" in err and "nothing was created" in err
    assert secrets() == []
    code, _out, err = add("--consumer", ROLE, "--consumer", OTHER_ACCOUNT, "--kms-key-id", cmk())
    assert code == 0, err
    policy = json.loads(boto3.client("secretsmanager").get_resource_policy(SecretId=SECRET)["ResourcePolicy"])
    [statement] = policy["Statement"]
    assert statement["Principal"]["AWS"] == sorted([ROLE, f"arn:aws:iam::{OTHER_ACCOUNT}:root"])
    assert statement["Action"] == ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    assert "ValidateResourcePolicy" in {name for _, name in aws_calls}


@pytest.mark.parametrize(
    "principal", ["*", "arn:aws:iam::444455556666:user/bob", "4444555566", "arn:aws:iam::*:role/x", "s3.amazonaws.com"]
)
def test_a_principal_that_does_not_parse_is_refused_and_nothing_changes(aws_calls: list[Any], principal: str) -> None:
    code, _, err = add("--consumer", principal)
    assert code == 2 and "not an AWS account id" in err and secrets() == []
    run("connections", "add", "prod", "--instance-url", "https://acme.service-now.com", "--client-id", "c1")
    code, _, err = run("connections", "grant", "prod", principal)
    assert code == 2 and "refused" in err
    assert boto3.client("secretsmanager").get_resource_policy(SecretId=SECRET).get("ResourcePolicy") is None


def test_grant_on_the_default_key_is_refused_with_what_to_do(aws_calls: list[Any]) -> None:
    assert add()[0] == 0
    code, _, err = run("connections", "grant", "prod", ROLE)
    assert code == 2 and "aws/secretsmanager" in err and "update-secret" in err and "nothing was changed" in err
    assert boto3.client("secretsmanager").get_resource_policy(SecretId=SECRET).get("ResourcePolicy") is None
    # A reader in this very account needs no shared key.
    code, out, _ = run("connections", "grant", "prod", "123456789012")
    assert code == 0 and "arn:aws:iam::123456789012:root" in out


def test_grant_list_and_revoke(aws_calls: list[Any]) -> None:
    assert add("--kms-key-id", cmk())[0] == 0
    assert run("connections", "grant", "prod", ROLE)[0] == 0
    assert run("connections", "grant", "prod", OTHER_ACCOUNT)[0] == 0
    code, listing, _ = run("connections", "list")
    assert code == 0 and ROLE in listing and f"arn:aws:iam::{OTHER_ACCOUNT}:root" in listing
    assert run("connections", "revoke-access", "prod", ROLE)[0] == 0
    code, _, err = run("connections", "revoke-access", "prod", ROLE)
    assert code == 2 and "not one of its readers" in err
    assert run("connections", "revoke-access", "prod", OTHER_ACCOUNT)[0] == 0
    assert boto3.client("secretsmanager").get_resource_policy(SecretId=SECRET).get("ResourcePolicy") is None
    code, _, err = run("connections", "grant", "nosuch", ROLE)
    assert code == 2 and "not found" in err


def test_a_public_policy_is_refused_by_validation_too(aws_calls: list[Any]) -> None:
    """Even a policy our parser would never build is stopped by ValidateResourcePolicy before it is put."""
    from admin.access import AccessError, ConnectionAccess

    assert add("--kms-key-id", cmk())[0] == 0
    access = ConnectionAccess(boto3.client("secretsmanager"))
    with pytest.raises(AccessError, match="refused the policy"):
        access._put("prod", SECRET, ["*"])
    assert boto3.client("secretsmanager").get_resource_policy(SecretId=SECRET).get("ResourcePolicy") is None


@pytest.mark.parametrize(
    ("region", "problem"), [("us-east-1", "primary region"), ("mars-north-1", "not a region"), ("EU", "not a region")]
)
def test_a_bad_replica_region_is_refused(aws_calls: list[Any], region: str, problem: str) -> None:
    code, _, err = add("--replica-region", region)
    assert code == 2 and problem in err and secrets() == []


def test_a_replica_is_read_from_its_region_and_only_the_primary_is_written(
    aws_calls: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = add("--replica-region", "eu-west-1")
    assert code == 0 and "replicated to eu-west-1" in out, err
    primary = boto3.client("secretsmanager")
    value = json.loads(primary.get_secret_value(SecretId=SECRET)["SecretString"])
    value.update(accessToken="replica-read-T1", status="active")
    primary.put_secret_value(SecretId=SECRET, SecretString=json.dumps(value))  # as the refresher writes
    _, listing, _ = run("connections", "list")
    assert "eu-west-1" in listing
    aws_calls.clear()
    _session, base = servicenow_session(SECRET, region="eu-west-1")
    assert base == "https://acme.service-now.com"
    assert aws_calls and {region for region, _ in aws_calls} == {"eu-west-1"}
    assert {name for _, name in aws_calls} == {"GetSecretValue"}


# ------------------------------------------------------------------------------------------------ the policies
def allows(policy: dict[str, Any], action: str, resource: str, context: dict[str, str] | None = None) -> bool:
    """IAM's evaluation for one Allow-only policy: action and resource by wildcard, StringEquals conditions."""
    for statement in policy["Statement"]:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        if statement["Effect"] != "Allow" or not any(fnmatch.fnmatchcase(action, a) for a in actions):
            continue
        if not any(fnmatch.fnmatchcase(resource, r) for r in resources):
            continue
        wanted = statement.get("Condition", {}).get("StringEquals", {})
        if all((context or {}).get(key) == value for key, value in wanted.items()):
            return True
    return False


@pytest.mark.parametrize(
    ("snippet", "region"),
    [("same-account.json", "us-east-1"), ("other-account.json", "us-east-1"), ("replica-region.json", "eu-west-1")],
)
def test_each_consumer_policy_allows_exactly_what_the_helper_calls(
    aws_calls: list[Any], snippet: str, region: str
) -> None:
    kms_key = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    assert add("--replica-region", "eu-west-1")[0] == 0
    primary = boto3.client("secretsmanager")
    value = {**json.loads(primary.get_secret_value(SecretId=SECRET)["SecretString"]), "accessToken": "policy-T2"}
    primary.put_secret_value(SecretId=SECRET, SecretString=json.dumps(value))
    aws_calls.clear()
    servicenow_session(SECRET, region=region)
    policy = json.loads((DOCS / snippet).read_text())
    arn = f"arn:aws:secretsmanager:{region}:111122223333:secret:servicenow-oauth/prod-AbCdEf"
    for _, operation in aws_calls:
        assert allows(policy, f"secretsmanager:{operation}", arn), (snippet, operation)
    assert not allows(policy, "secretsmanager:GetSecretValue", arn.replace("/prod-", "/other-")), "one connection only"
    assert not allows(policy, "secretsmanager:PutSecretValue", arn)
    if snippet == "other-account.json":
        via = {"kms:ViaService": "secretsmanager.us-east-1.amazonaws.com"}
        assert allows(policy, "kms:Decrypt", kms_key, via)
        assert not allows(policy, "kms:Decrypt", kms_key, {"kms:ViaService": "s3.us-east-1.amazonaws.com"})
