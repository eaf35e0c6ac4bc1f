"""Consumers in other accounts and regions, on the moto server: resource policies put (and refused), the
customer-managed key a cross-account reader needs, replicas read by the consumer helper from their region,
and the README's consumer policies checked against what the helper actually calls.

moto has no `ValidateResourcePolicy`; a before-call hook answers it in the API's own shape with the check AWS
documents for `BlockPublicPolicy` (a wildcard principal is public), the way tests/test_appflow.py answers
AppFlow. Our own parser refuses wildcards before any call, so the hook is the second line, as in AWS.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import permissions
import pytest
from botocore.awsrequest import AWSResponse
from iam import Policy, Request, decide

from admin.cli import main as cli
from core.consumer import servicenow_session
from local.template_check import translate

DOCS = Path(__file__).resolve().parent.parent / "docs" / "consumer-policies"
HOSTS = ["--allowed-hosts", "127.0.0.1,*.service-now.com"]
OTHER_ACCOUNT = "444455556666"
ROLE = f"arn:aws:iam::{OTHER_ACCOUNT}:role/erp-reader"
SECRET = "servicenow-oauth/prod"
EXAMPLE_KEY = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"  # other-account.json's


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
        access._put("prod", SECRET, None, ["*"])
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
@pytest.mark.parametrize(
    ("snippet", "region"),
    [("same-account.json", "us-east-1"), ("other-account.json", "us-east-1"), ("replica-region.json", "eu-west-1")],
)
def test_each_consumer_policy_allows_exactly_what_the_helper_calls(
    aws_calls: list[Any], snippet: str, region: str
) -> None:
    """Each README policy, with its example account made this one, on the IAM evaluator the whole suite's calls go
    through (tests/permissions.py): the helper's real calls are allowed, another connection and a write are not. The
    reader in another account also needs the secret's resource policy (put by `connections grant`) and the stack's
    key policy (ConsumerPrincipals), and decrypts only through Secrets Manager."""
    consumer = ROLE if snippet == "other-account.json" else f"arn:aws:iam::{permissions.ACCOUNT}:role/erp-reader"
    key = cmk() if snippet == "other-account.json" else None
    assert add("--replica-region", "eu-west-1", *(["--kms-key-id", key, "--consumer", ROLE] if key else []))[0] == 0
    primary = boto3.client("secretsmanager")
    value = {**json.loads(primary.get_secret_value(SecretId=SECRET)["SecretString"]), "accessToken": "policy-T2"}
    primary.put_secret_value(SecretId=SECRET, SecretString=json.dumps(value))
    permissions.RECORDER.take()
    servicenow_session(SECRET, region=region)
    calls = [call for call in permissions.RECORDER.take() if call.actor == permissions.CONSUMER]
    text = (DOCS / snippet).read_text().replace(EXAMPLE_KEY, key or EXAMPLE_KEY)  # the stack's key, as the README says
    identity = [Policy.of(snippet, json.loads(text.replace("111122223333", permissions.ACCOUNT)))]
    shared = primary.get_resource_policy(SecretId=SECRET).get("ResourcePolicy")
    resource_policy = Policy.of("secret", json.loads(shared)) if shared else None
    template = permissions.Template(translate(), permissions.Deployment().with_parameters(
        SecretsKmsKeyArn="create", ConsumerPrincipals=ROLE))  # fmt: skip
    key_policy = template.key_policy("SecretsKey")

    def decision(action: str, resource: str, **context: str) -> bool:
        request = Request(consumer, action, resource, tuple(sorted(context.items())))
        on_key = key_policy if action.startswith("kms:") and key else None
        return decide(request, identity, resource_policy=resource_policy, key_policy=on_key).allowed

    assert calls and {call.operation for call in calls} == {"GetSecretValue"}
    for authorization in (a for call in calls for a in call.authorizations):
        if authorization.modelled and not key:
            continue  # the AWS managed key: its own policy lets any reader of the secret decrypt in this account
        resource = key if authorization.action.startswith("kms:") and key else authorization.resource
        assert decision(authorization.action, resource, **dict(authorization.context)), (snippet, authorization)
    arn = calls[0].authorizations[0].resource
    assert not decision("secretsmanager:GetSecretValue", arn.replace("/prod-", "/other-")), "one connection only"
    assert not decision("secretsmanager:PutSecretValue", arn)
    if key:
        assert decision("kms:Decrypt", key, **{"kms:ViaService": "secretsmanager.us-east-1.amazonaws.com"})
        assert not decision("kms:Decrypt", key, **{"kms:ViaService": "s3.us-east-1.amazonaws.com"})


def test_grant_and_revoke_keep_statements_others_put_on_the_secret(aws_calls: list[Any]) -> None:
    """Found by the review: our policy replaced the whole resource policy, dropping a guardrail or a backup
    account's read; revoking the last reader deleted it."""
    assert add("--kms-key-id", cmk())[0] == 0
    sm = boto3.client("secretsmanager")
    guard = {
        "Sid": "NobodyDeletesIt",
        "Effect": "Deny",
        "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
        "Action": "secretsmanager:DeleteSecret",
        "Resource": "*",
    }
    sm.put_resource_policy(SecretId=SECRET, ResourcePolicy=json.dumps({"Version": "2012-10-17", "Statement": [guard]}))
    assert run("connections", "grant", "prod", ROLE)[0] == 0
    sids = [s["Sid"] for s in json.loads(sm.get_resource_policy(SecretId=SECRET)["ResourcePolicy"])["Statement"]]
    assert sids == ["NobodyDeletesIt", "ServiceNowOAuthConsumers"]
    assert run("connections", "revoke-access", "prod", ROLE)[0] == 0
    left = json.loads(sm.get_resource_policy(SecretId=SECRET)["ResourcePolicy"])["Statement"]
    assert left == [guard]


def test_a_refused_grant_leaves_no_half_made_connection(aws_calls: list[Any]) -> None:
    """Found by the review: the secret was created, the grant failed, and the CLI said nothing was changed."""

    def refuse(**_: Any) -> Any:
        body = {"Error": {"Code": "MalformedPolicyDocumentException", "Message": "no such principal"}}
        return AWSResponse("http://test", 400, {}, None), body

    boto3.DEFAULT_SESSION.events.register("before-call.secrets-manager.PutResourcePolicy", refuse)  # type: ignore[union-attr]
    code, out, err = add("--consumer", ROLE, "--kms-key-id", cmk(), "--replica-region", "eu-west-1")
    assert code == 2 and "MalformedPolicyDocumentException" in err and "nothing was created" in err, (out, err)
    assert secrets() == [] and "created connection" not in out
    code, _, err = add("--consumer", ROLE, "--kms-key-id", "alias/aws/secretsmanager")
    assert code == 2 and "customer-managed KMS key" in err and secrets() == []


@pytest.mark.parametrize(
    "principal",
    [
        "\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669\u0660\u0661\u0662",
        "arn:aws:iam::444455556666:role/lecteur-\u00e9",
    ],
    ids=["arabic-indic digits", "non-ascii role name"],
)
def test_principals_iam_would_refuse_are_refused_here(aws_calls: list[Any], principal: str) -> None:
    code, _, err = add("--consumer", principal)
    assert code == 2 and "not an AWS account id" in err and secrets() == []


def test_a_deleted_readers_unique_id_can_be_revoked(aws_calls: list[Any]) -> None:
    """AWS shows a granted role that was deleted by its unique id (AROA...): still revocable."""
    assert add("--kms-key-id", cmk())[0] == 0
    sm = boto3.client("secretsmanager")
    stale = "AROAEXAMPLEID1234567"
    statement = {"Sid": "ServiceNowOAuthConsumers", "Effect": "Allow", "Principal": {"AWS": [stale]},
                 "Action": ["secretsmanager:GetSecretValue"], "Resource": "*"}  # fmt: skip
    sm.put_resource_policy(
        SecretId=SECRET, ResourcePolicy=json.dumps({"Version": "2012-10-17", "Statement": [statement]})
    )
    assert run("connections", "revoke-access", "prod", stale)[0] == 0
    assert sm.get_resource_policy(SecretId=SECRET).get("ResourcePolicy") is None


@pytest.mark.parametrize("operation", ["GetResourcePolicy", "PutResourcePolicy"])
def test_a_grant_refused_by_aws_itself_leaves_no_half_made_connection(aws_calls: list[Any], operation: str) -> None:
    """Found by review (#26): only our own AccessError cleaned up; an AWS refusal of the grant (GetResourcePolicy
    denied to the operator, throttling past retries) left the secret, and the next add said "already exists"."""

    def deny(**_: Any) -> Any:
        body = {"Error": {"Code": "AccessDeniedException", "Message": f"not authorized to perform {operation}"}}
        return AWSResponse("http://test", 400, {}, None), body

    handler_id = f"before-call.secrets-manager.{operation}"
    boto3.DEFAULT_SESSION.events.register(handler_id, deny)  # type: ignore[union-attr]
    code, out, err = add("--consumer", ROLE, "--kms-key-id", cmk())
    assert code == 2 and "AccessDeniedException" in err and "nothing was created" in err, (out, err)
    assert secrets() == []
    boto3.DEFAULT_SESSION.events.unregister(handler_id, deny)  # type: ignore[union-attr]
    code, out, err = add("--consumer", ROLE, "--kms-key-id", cmk())
    assert code == 0 and secrets() == [SECRET], (out, err)


def test_a_malformed_principal_is_refused_before_any_call(aws_calls: list[Any]) -> None:
    """admin/access.py promises it; `connections grant` described the secret first."""
    assert add()[0] == 0
    aws_calls.clear()
    code, _, err = run("connections", "grant", "prod", "*")
    assert code == 2 and aws_calls == [], (err, aws_calls)
