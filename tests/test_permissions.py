"""The permission checker (tests/permissions.py) can say no: each way a call is denied in AWS is denied here.

Every test's AWS calls are checked by the autouse fixture in conftest.py; these tests prove the checker fails
where IAM would: an action missing from a role, a Deny, a condition the request does not meet, a key policy
that does not name the caller, a reader in another account, and the operator's policy too.
"""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import permissions
import pytest
from iam import ACCOUNT, Policy, Request, decide
from permissions import Checker

from local.template_check import translate
from tests.test_callback import FakeContext
from tests.test_refresh_handlers import add_due_connection

EVENTS = Path(__file__).resolve().parent.parent / "events"
SECRET = f"arn:aws:secretsmanager:us-east-1:{ACCOUNT}:secret:servicenow-oauth/prod-AbCdEf"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/app"


def allow(action: Any, resource: Any = "*", **extra: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": action, "Resource": resource, **extra}


def allowed(statements: list[dict[str, Any]], action: str, resource: str = SECRET, **context: str) -> bool:
    request = Request(ROLE, action, resource, tuple(sorted(context.items())))
    return decide(request, [Policy.of("p", {"Statement": statements})]).allowed


# ------------------------------------------------------------------------------------------------ the evaluator
def test_an_explicit_deny_wins_over_any_allow() -> None:
    deny = {"Effect": "Deny", "Action": "secretsmanager:*", "Resource": "*"}
    assert allowed([allow("secretsmanager:GetSecretValue")], "secretsmanager:GetSecretValue")
    assert not allowed([allow("secretsmanager:GetSecretValue"), deny], "secretsmanager:GetSecretValue")


def test_actions_match_without_case_and_resources_with_it() -> None:
    assert allowed([allow("SecretsManager:getsecretvalue")], "secretsmanager:GetSecretValue")
    assert not allowed([allow("secretsmanager:GetSecretValue", SECRET.upper())], "secretsmanager:GetSecretValue")


def test_wildcards_are_iams_not_fnmatchs() -> None:
    """? is one character, * any run; [ and ] are literal (fnmatch would read a character class)."""
    assert allowed([allow("secretsmanager:Get*", "arn:aws:secretsmanager:*:*:secret:servicenow-oauth/*")],
                   "secretsmanager:GetSecretValue")  # fmt: skip
    assert allowed([allow("*", "arn:*:secret:servicenow-oauth/prod-??????")], "kms:Decrypt")
    assert not allowed([allow("*", "arn:*:secret:servicenow-oauth/prod-?????")], "kms:Decrypt")
    assert not allowed([allow("*", "arn:*:secret:servicenow-oauth/[p]rod-*")], "kms:Decrypt")


def test_not_action_and_not_resource() -> None:
    everything_but = {"Effect": "Allow", "NotAction": "secretsmanager:Put*", "Resource": "*"}
    assert allowed([everything_but], "secretsmanager:GetSecretValue")
    assert not allowed([everything_but], "secretsmanager:PutSecretValue")
    elsewhere = {"Effect": "Allow", "Action": "*", "NotResource": "arn:*:secret:servicenow-oauth/*"}
    assert not allowed([elsewhere], "secretsmanager:GetSecretValue")
    assert allowed([elsewhere], "secretsmanager:GetSecretValue", SECRET.replace("servicenow-oauth", "other"))


@pytest.mark.parametrize(
    ("condition", "context", "expected"),
    [
        ({"StringEquals": {"events:source": "oauth.prod"}}, {"events:source": "oauth.prod"}, True),
        ({"StringEquals": {"events:source": "oauth.prod"}}, {"events:source": "oauth.dev"}, False),
        ({"StringEquals": {"events:source": "servicenow-oauth.prod"}}, {}, False),
        ({"StringLike": {"kms:ViaService": "secretsmanager.*.amazonaws.com"}},
         {"kms:ViaService": "secretsmanager.eu-west-1.amazonaws.com"}, True),
        ({"StringLike": {"kms:ViaService": "secretsmanager.*"}}, {"kms:ViaService": "s3.amazonaws.com"}, False),
        ({"ArnLike": {"aws:SourceArn": "arn:aws:cloudwatch:*:1:alarm:prod-*"}},
         {"aws:SourceArn": "arn:aws:cloudwatch:us-east-1:1:alarm:prod-X"}, True),
        ({"ArnLike": {"aws:SourceArn": "arn:aws:cloudwatch:*:1:alarm:prod-*"}},
         {"aws:SourceArn": "arn:aws:cloudwatch:us-east-1:2:alarm:prod-X"}, False),
        ({"ArnEquals": {"aws:SourceArn": "arn:aws:sns:us-east-1:1:t"}}, {"aws:SourceArn": "arn:aws:sns:us-east-1:1:t"},
         True),
        ({"StringEqualsIfExists": {"aws:ResourceAccount": "1"}}, {}, True),
        ({"StringEqualsIfExists": {"aws:ResourceAccount": "1"}}, {"aws:ResourceAccount": "2"}, False),
        ({"Null": {"aws:ResourceTag/owner": "true"}}, {}, True),
        ({"Null": {"aws:ResourceTag/owner": "true"}}, {"aws:ResourceTag/owner": "x"}, False),
        # Two keys are AND, two values of one key OR.
        ({"StringEquals": {"a": ["1", "2"], "b": "3"}}, {"a": "2", "b": "3"}, True),
        ({"StringEquals": {"a": ["1", "2"], "b": "3"}}, {"a": "2", "b": "4"}, False),
        # An operator it does not know never grants.
        ({"NumericLessThan": {"aws:MultiFactorAuthAge": "3600"}}, {"aws:MultiFactorAuthAge": "1"}, False),
    ],
)  # fmt: skip
def test_conditions(condition: dict[str, Any], context: dict[str, str], expected: bool) -> None:
    assert allowed([allow("*", Condition=condition)], "events:PutEvents", **context) is expected


def test_an_unknown_operator_in_a_deny_still_denies() -> None:
    """A gap in the evaluator never widens access: an Allow it cannot read does not grant, a Deny does deny."""
    deny = {"Effect": "Deny", "Action": "*", "Resource": "*", "Condition": {"DateLessThan": {"aws:CurrentTime": "x"}}}
    assert not allowed([allow("*"), deny], "secretsmanager:GetSecretValue")


def test_a_key_policy_must_name_the_caller_or_delegate_to_iam() -> None:
    """KMS: a key policy naming the role is enough; one naming the account needs IAM to allow too; one naming
    neither denies whatever IAM says (https://docs.aws.amazon.com/kms/latest/developerguide/control-access.html)."""
    key = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1"
    request = Request(ROLE, "kms:Sign", key)
    names_role = Policy.of("key", {"Statement": [{**allow("kms:Sign"), "Principal": {"AWS": ROLE}}]})
    names_account = Policy.of(
        "key", {"Statement": [{**allow("kms:*"), "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}}]}
    )
    names_other = Policy.of("key", {"Statement": [{**allow("kms:Sign"), "Principal": {"AWS": ROLE + "-other"}}]})
    iam = [Policy.of("role", {"Statement": [allow("kms:Sign")]})]
    assert decide(request, [], key_policy=names_role).allowed
    assert not decide(request, [], key_policy=names_account).allowed
    assert decide(request, iam, key_policy=names_account).allowed
    assert not decide(request, iam, key_policy=names_other).allowed


def test_a_reader_in_another_account_needs_both_policies() -> None:
    secret = SECRET.replace(ACCOUNT, "111122223333")
    request = Request(ROLE, "secretsmanager:GetSecretValue", secret)
    iam = [Policy.of("role", {"Statement": [allow("secretsmanager:GetSecretValue")]})]
    shared = Policy.of(
        "secret", {"Statement": [{**allow("secretsmanager:GetSecretValue"), "Principal": {"AWS": ACCOUNT}}]}
    )
    assert not decide(request, iam).allowed
    assert not decide(request, [], resource_policy=shared).allowed
    assert decide(request, iam, resource_policy=shared).allowed


# ------------------------------------------------------------------------------- the checker on real calls
@pytest.fixture
def sweep_calls(aws: str, secretsmanager: Any, emulator: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """A real scheduled sweep's recorded calls, on a due connection (the autouse check still runs on them)."""
    monkeypatch.setenv("SERVICENOW_ALLOWED_HOSTS", "127.0.0.1")
    monkeypatch.setenv("EVENT_SOURCE", "servicenow-oauth.oauth-prod")
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "oauth-prod")
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "ServiceNowOAuth")
    add_due_connection(secretsmanager, emulator, "prod")
    import handlers.refresh

    permissions.RECORDER.take()
    assert importlib.reload(handlers.refresh).lambda_handler(
        json.loads((EVENTS / "schedule.json").read_text()), FakeContext()
    ) == {"refreshed": 1}
    calls = permissions.RECORDER.take()
    yield calls
    permissions.RECORDER.give_back(calls)  # for conftest's check with the real template


def denials(checker: Checker, calls: list[Any]) -> list[str]:
    return sorted({str(v) for call in calls if call.actor != permissions.SETUP for v in checker.verdicts(call)
                   if not v.decision.allowed})  # fmt: skip


def test_the_real_sweep_is_allowed(permission_checker: Checker, sweep_calls: list[Any]) -> None:
    assert {call.actor for call in sweep_calls} >= {"RefreshFunction"}
    operations = {call.operation for call in sweep_calls if call.actor == "RefreshFunction"}
    assert {"ListSecrets", "BatchGetSecretValue", "PutSecretValue", "UpdateSecretVersionStage"} <= operations
    assert denials(permission_checker, sweep_calls) == []


def test_an_action_missing_from_the_role_is_named(permission_checker: Checker, sweep_calls: list[Any]) -> None:
    template = copy.deepcopy(permission_checker.translated)
    [writer] = [s for s in template["Resources"]["ConnectionWriterPolicy"]["Properties"]["PolicyDocument"]["Statement"]
                if s["Sid"] == "ConnectionSecrets"]  # fmt: skip
    writer["Action"].remove("secretsmanager:PutSecretValue")
    [line] = denials(Checker(template), sweep_calls)
    assert line.startswith("RefreshFunction called secretsmanager:PutSecretValue at src/core/store.py:")
    assert (
        "secretsmanager:PutSecretValue on arn:aws:secretsmanager:us-east-1:123456789012:secret:servicenow-oauth/prod-"
        in line
    )


def test_a_deny_in_the_role_is_seen(permission_checker: Checker, sweep_calls: list[Any]) -> None:
    template = copy.deepcopy(permission_checker.translated)
    template["Resources"]["RefreshFunctionRole"]["Properties"]["Policies"].append(
        {"PolicyName": "Guardrail", "PolicyDocument": {"Statement": [
            {"Sid": "NoBatchReads", "Effect": "Deny", "Action": "secretsmanager:BatchGet*", "Resource": "*"}]}}
    )  # fmt: skip
    found = denials(Checker(template), sweep_calls)
    guardrail = "explicitly denied by RefreshFunctionRole/Guardrail/NoBatchReads"
    assert found and all("BatchGetSecretValue" in line and guardrail in line
                         for line in found), found  # fmt: skip


def test_an_unmet_condition_denies_the_call_aws_makes_for_the_function(
    permission_checker: Checker, sweep_calls: list[Any], secretsmanager: Any, emulator: Any
) -> None:
    """The modelled kms:Decrypt Secrets Manager makes for a secret on a customer-managed key: its condition
    names the secrets' prefix; a template whose condition names another prefix fails the read."""
    template = copy.deepcopy(permission_checker.translated)
    [kms] = [s for s in template["Resources"]["ConnectionWriterPolicy"]["Properties"]["PolicyDocument"]["Statement"]
             if s["Sid"] == "SecretsKmsKey"]  # fmt: skip
    kms["Condition"]["StringLike"]["kms:ViaService"] = "s3.*.amazonaws.com"
    key = boto3.client("kms").create_key()["KeyMetadata"]["Arn"]
    add_due_connection(secretsmanager, emulator, "on-cmk")
    secretsmanager.update_secret(SecretId="servicenow-oauth/on-cmk", KmsKeyId=key)
    permissions.RECORDER.take()
    import handlers.refresh

    importlib.reload(handlers.refresh).lambda_handler(json.loads((EVENTS / "schedule.json").read_text()), FakeContext())
    calls = permissions.RECORDER.take()
    assert denials(permission_checker, calls) == []
    found = denials(Checker(template), calls)
    assert found and all("kms:Decrypt" in line or "kms:GenerateDataKey" in line for line in found), found
    assert any("made by AWS on its behalf" in line for line in found)
    permissions.RECORDER.give_back(calls)


def test_the_operators_policy_is_what_the_cli_needs(permission_checker: Checker, aws: str) -> None:
    """docs/operator-policy.json against the CLI's own calls: enough for `connections add`, and an action taken
    out of it is named."""
    import io

    from admin.cli import main as cli

    permissions.RECORDER.take()
    out, err = io.StringIO(), io.StringIO()
    argv = ["--allowed-hosts", "*.service-now.com", "connections", "add", "prod", "--instance-url",
            "https://acme.service-now.com", "--client-id", "c1"]  # fmt: skip
    code = cli(argv, out=out, err=err, stdin=io.StringIO("s3cret-A1\n"))
    assert code == 0, err.getvalue()
    calls = permissions.RECORDER.take()
    assert {call.actor for call in calls} == {permissions.OPERATOR}
    assert denials(permission_checker, calls) == []
    document = json.loads((permissions.DOCS / "operator-policy.json").read_text())
    for statement in document["Statement"]:
        if isinstance(statement["Action"], list) and "secretsmanager:CreateSecret" in statement["Action"]:
            statement["Action"].remove("secretsmanager:CreateSecret")
    [line] = denials(Checker(permission_checker.translated, operator_policy=document), calls)
    assert (
        line.startswith("operator called secretsmanager:CreateSecret at src/core/store.py:")
        and "no statement allows" in line
    )
    permissions.RECORDER.give_back(calls)


def test_rotation_pushes_to_appflow_with_its_own_role(
    permission_checker: Checker,
    secretsmanager: Any,
    emulator: Any,
    rotation_lambda: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by this checker: createSecret refreshes through the sweep's path, which pushes the new tokens to the
    connection's AppFlow profiles, but RotationFunction's role had no AppFlowPushPolicy: every rotation of a
    connection with profiles was denied the push in AWS. The role without it (as it was) is named."""
    from botocore.stub import Stubber

    from core.appflow import AppFlowSync
    from tests.test_rotation import SECRET, connection, start_rotation

    monkeypatch.setenv("SERVICENOW_ALLOWED_HOSTS", "127.0.0.1")
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "servicenow-oauth")
    import handlers.rotation

    handler = importlib.reload(handlers.rotation)
    secretsmanager.create_secret(Name=SECRET, SecretString=connection(emulator, appflowConnectorProfiles=["snow-prod"]))
    token = "5d2c7a64-1b3e-4c8f-9a0d-2e4f6a8b0c1d"
    start_rotation(secretsmanager, rotation_lambda, token)
    appflow = boto3.client("appflow", region_name="us-east-1", endpoint_url="https://appflow.invalid")
    handler.rotation.refresher.appflow = AppFlowSync(appflow, handler.rotation.refresher.store.client)
    permissions.RECORDER.take()
    with Stubber(appflow) as stub:
        stub.add_response(
            "update_connector_profile",
            {"connectorProfileArn": "arn:aws:appflow:us-east-1:123456789012:connectorprofile/snow-prod"},
        )
        handler.lambda_handler({"Step": "createSecret", "SecretId": SECRET, "ClientRequestToken": token}, FakeContext())
        stub.assert_no_pending_responses()
    calls = permissions.RECORDER.take()
    assert ("RotationFunction", "UpdateConnectorProfile") in {(call.actor, call.operation) for call in calls}
    assert denials(permission_checker, calls) == []
    template = copy.deepcopy(permission_checker.translated)
    role = template["Resources"]["RotationFunctionRole"]["Properties"]
    role["ManagedPolicyArns"] = [arn for arn in role["ManagedPolicyArns"] if "AppFlowPushPolicy" not in json.dumps(arn)]
    found = denials(Checker(template), calls)
    assert found and all(line.startswith("RotationFunction called appflow:UpdateConnectorProfile") for line in found), (
        found
    )
    permissions.RECORDER.give_back(calls)


def test_make_connections_needs_only_the_monitoring_policy(permission_checker: Checker, aws: str) -> None:
    """MonitoringPolicy says `make connections` needs only it: the CLI's real listing (health from the tags, the
    readers from a resource policy) is allowed by it alone, with no right to a secret value."""
    import io

    from admin.cli import main as cli

    hosts = ["--allowed-hosts", "*.service-now.com"]
    add = [*hosts, "connections", "add", "prod", "--instance-url", "https://acme.service-now.com", "--client-id", "c1"]
    assert cli(add, out=io.StringIO(), err=io.StringIO(), stdin=io.StringIO("s3cret-A1\n")) == 0
    reader = {"Sid": "ServiceNowOAuthConsumers", "Effect": "Allow", "Principal": {"AWS": permissions.CONSUMER_ARN},
              "Action": "secretsmanager:GetSecretValue", "Resource": "*"}  # fmt: skip
    boto3.client("secretsmanager").put_resource_policy(
        SecretId="servicenow-oauth/prod", ResourcePolicy=json.dumps({"Version": "2012-10-17", "Statement": [reader]})
    )
    permissions.RECORDER.take()
    out = io.StringIO()
    assert cli([*hosts, "connections", "list"], out=out, err=io.StringIO()) == 0
    assert permissions.CONSUMER_ARN in out.getvalue()
    calls = permissions.RECORDER.take()
    assert {call.operation for call in calls} >= {"ListSecrets", "GetResourcePolicy", "DescribeSecret"}
    template = permission_checker.template(permissions.Deployment())
    monitoring = [policy for policy in template.identity("DashboardFunction") if policy.name == "MonitoringPolicy"]
    verdicts = []
    for call in calls:
        for authorization in call.authorizations:
            context = tuple(sorted({"aws:ResourceAccount": ACCOUNT, **dict(authorization.context)}.items()))
            request = Request(permissions.OPERATOR_ARN, authorization.action, authorization.resource, context)
            decision = decide(request, monitoring)
            assert decision.allowed, (call.operation, decision.reason)
            verdicts.append(permissions.Verdict("operator (MonitoringPolicy)", call.operation, authorization,
                                                decision, template.deployment, call.where))  # fmt: skip
    permissions.LEDGER.add(verdicts)  # MonitoringPolicy's statements are used by `make connections`
    secret = next(a.resource for call in calls for a in call.authorizations if a.action.endswith("DescribeSecret"))
    for action in ("secretsmanager:GetSecretValue", "secretsmanager:PutSecretValue"):
        assert not decide(Request(permissions.OPERATOR_ARN, action, secret), monitoring).allowed
    permissions.RECORDER.give_back(calls)


# ------------------------------------------------------------------ found by review (each failed before its fix)
READER = "arn:aws:iam::444455556666:role/erp-reader"  # a ConsumerPrincipal in another account
STACK_KEY = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
VIA = (("kms:ViaService", "secretsmanager.us-east-1.amazonaws.com"),)


def _secrets_key_policy() -> Policy:
    """template.yaml's SecretsKey key policy, resolved, with the reader as ConsumerPrincipals."""
    deployment = permissions.Deployment().with_parameters(SecretsKmsKeyArn="create", ConsumerPrincipals=READER)
    policy = permissions.Template(translate(), deployment).key_policy("SecretsKey")
    assert policy is not None
    return policy


def test_a_key_in_another_account_needs_the_callers_own_iam_too() -> None:
    """KMS: "Neither the key policy nor the IAM policy alone is sufficient" across accounts
    (https://docs.aws.amazon.com/kms/latest/developerguide/key-policy-modifying-external-accounts.html). The
    evaluator allowed a reader in another account on the key policy alone."""
    text = (permissions.DOCS / "consumer-policies" / "other-account.json").read_text().replace("111122223333", ACCOUNT)
    readers_policy = json.loads(text)
    request = Request(READER, "kms:Decrypt", STACK_KEY, VIA)
    assert decide(request, [Policy.of("other-account", readers_policy)], key_policy=_secrets_key_policy()).allowed
    assert not decide(request, [], key_policy=_secrets_key_policy()).allowed
    readers_policy["Statement"] = [s for s in readers_policy["Statement"] if not s["Action"].startswith("kms:")]
    assert not decide(request, [Policy.of("without kms", readers_policy)], key_policy=_secrets_key_policy()).allowed


def test_condition_key_names_are_not_case_sensitive() -> None:
    """IAM: "Condition key names are not case-sensitive." A Deny spelled `AWS:ResourceAccount` was skipped."""
    role = f"arn:aws:iam::{ACCOUNT}:role/servicenow-oauth-WorkerFunctionRole"
    allow_it = Policy.of("role", {"Statement": [allow("secretsmanager:GetSecretValue")]})
    spelled = {"StringEquals": {"AWS:ResourceAccount": ACCOUNT}}
    guard = Policy.of(
        "guard", {"Statement": [{"Effect": "Deny", "Action": "*", "Resource": "*", "Condition": spelled}]}
    )
    request = Request(role, "secretsmanager:GetSecretValue", SECRET, (("aws:ResourceAccount", ACCOUNT),))
    assert decide(request, [allow_it]).allowed
    assert not decide(request, [allow_it, guard]).allowed


def test_a_world_no_stack_can_be_allows_nothing(permission_checker: Checker) -> None:
    """CloudFormation refuses a parameter that fails its AllowedPattern; the checker built a role from one
    (ConnectionSecretPrefix without its '/') whose prefix also covered the state key, and allowed the worker to
    overwrite it. Such a world is now denied, naming the parameter."""
    state_key = f"arn:aws:secretsmanager:us-east-1:{ACCOUNT}:secret:servicenow-oauth-state-key-4e8b2c1a-AbCdEf"
    call = permissions.Recorded(
        "WorkerFunction", "secretsmanager", "PutSecretValue", {"SecretId": state_key}, "us-east-1",
        environment=(("CONNECTION_SECRET_PREFIX", "servicenow-oauth"),),
        authorizations=[permissions.Authorization("secretsmanager:PutSecretValue", state_key, secret=state_key)],
    )  # fmt: skip
    [verdict] = permission_checker.verdicts(call)
    assert not verdict.decision.allowed and "ConnectionSecretPrefix='servicenow-oauth' fails" in verdict.decision.reason


def test_ref_of_the_state_key_secret_is_its_arn(permission_checker: Checker) -> None:
    """Ref of an AWS::SecretsManager::Secret is its ARN (CloudFormation's return values), not a bare name."""
    template = permission_checker.template(permissions.Deployment())
    resolved = template.resolve({"Ref": "StateKeySecret"})
    assert resolved.startswith(
        f"arn:aws:secretsmanager:us-east-1:{ACCOUNT}:secret:servicenow-oauth-state-key-4e8b2c1a-"
    )


def test_an_unused_statement_or_action_is_named_unless_explained(permission_checker: Checker) -> None:
    """The whole run's least-privilege check (conftest's session end) fails on what a role's own calls did not use
    and nobody explained; another role's use of a shared policy does not count."""
    everything = permissions.statement_table(permission_checker, {})[1]
    assert "WorkerFunctionRole: ConnectionWriterPolicy/ConnectionSecrets" in everything
    assert "operator (docs/operator-policy.json): operator-policy/ManageConnections" in everything
    used = {"WorkerFunction": {"ConnectionWriterPolicy/ConnectionSecrets": {"secretsmanager:GetSecretValue"}}}
    table, unexplained = permissions.statement_table(permission_checker, used)
    assert "WorkerFunctionRole: ConnectionWriterPolicy/ConnectionSecrets" not in unexplained
    assert "WorkerFunctionRole: ConnectionWriterPolicy/ConnectionSecrets secretsmanager:PutSecretValue" in unexplained
    assert (
        "WorkerFunctionRole: ConnectionWriterPolicy/ConnectionSecrets secretsmanager:GetSecretValue" not in unexplained
    )
    assert (
        "RotationFunctionRole: ConnectionWriterPolicy/ConnectionSecrets" in unexplained
    )  # the worker's use is not its
    assert "UNEXPLAINED" in table
