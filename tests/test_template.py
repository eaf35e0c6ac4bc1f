"""template.yaml checked as CloudFormation sees it: SAM-translated, then cfn-lint; plus `sam validate --lint`."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any
from uuid import NAMESPACE_URL, uuid5

import pytest

from local.template_check import TEMPLATE, lint, load_template, translate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def translated() -> dict[str, Any]:
    return translate()


def test_translated_template_passes_cfn_lint() -> None:
    assert lint() == []


def test_sam_validate_lint() -> None:
    sam = os.environ.get("SAM_CLI") or str(ROOT / ".venv-sam" / "bin" / "sam")
    assert Path(sam).exists(), "SAM CLI missing: run `make test`, which installs it into .venv-sam"
    env = {**os.environ, "SAM_CLI_TELEMETRY": "0", "AWS_DEFAULT_REGION": "us-east-1"}
    result = subprocess.run(
        [sam, "validate", "--lint", "--template", str(TEMPLATE)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_functions_run_the_lambda_python_runtime_from_src() -> None:
    template = load_template()
    function_globals = template["Globals"]["Function"]
    assert function_globals["Runtime"] == "python3.12"
    assert function_globals["CodeUri"] == "src/"
    for name, resource in template["Resources"].items():
        if resource["Type"] == "AWS::Serverless::Function":
            handler = resource["Properties"]["Handler"]
            module = handler.removesuffix(".lambda_handler")
            assert handler.endswith(".lambda_handler") and module.startswith("handlers."), name
            assert (ROOT / "src" / (module.replace(".", "/") + ".py")).exists(), name


def test_every_environment_variable_read_by_config_is_declared() -> None:
    source = (ROOT / "src" / "core" / "config.py").read_text()
    declared = set(load_template()["Globals"]["Function"]["Environment"]["Variables"])
    for resource in load_template()["Resources"].values():
        declared |= set(resource.get("Properties", {}).get("Environment", {}).get("Variables", {}))
    import re

    read = set(re.findall(r'env(?:iron)?\.get\("([A-Z_]+)"', source)) | set(
        re.findall(r'_int\(env, "([A-Z_]+)"', source)
    )
    assert read, "config.py reads no variables?"
    assert read <= declared, f"read but not declared in template.yaml: {sorted(read - declared)}"


PREFIX_ARN = "arn:${AWS::Partition}:secretsmanager:${AWS::Region}:${AWS::AccountId}:secret:${ConnectionSecretPrefix}*"
APPFLOW_SECRETS = "arn:*:secretsmanager:*:*:secret:appflow!????????????-"
WRITES = {"PutSecretValue", "UpdateSecretVersionStage", "TagResource", "UntagResource", "UpdateSecret"}
WRITERS = {"CallbackFunctionRole", "RefreshFunctionRole", "WorkerFunctionRole", "RotationFunctionRole"}


def _branches(value: Any) -> list[Any]:
    """Both sides of an Fn::If (a conditional policy is granted in some deployments)."""
    if isinstance(value, dict) and "Fn::If" in value:
        return [branch for side in value["Fn::If"][1:] for branch in _branches(side)]
    return [value]


def role_statements(translated: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every statement a role may hold: its inline policies and the stack's managed policies it references
    (both sides of every condition)."""
    resources = translated["Resources"]
    roles: dict[str, list[dict[str, Any]]] = {}
    for name, resource in resources.items():
        if resource["Type"] != "AWS::IAM::Role":
            continue
        statements = roles.setdefault(name, [])
        for policy in resource["Properties"].get("Policies", []):
            for branch in _branches(policy):
                if isinstance(branch, dict) and "PolicyDocument" in branch:
                    statements += [s for item in branch["PolicyDocument"]["Statement"] for s in _branches(item)]
        for arn in resource["Properties"].get("ManagedPolicyArns", []):
            for branch in _branches(arn):
                if isinstance(branch, dict) and branch.get("Ref") in resources:
                    document = resources[branch["Ref"]]["Properties"]["PolicyDocument"]
                    statements += [s for item in document["Statement"] for s in _branches(item)]
    return {
        role: [s for s in statements if isinstance(s, dict) and "Action" in s] for role, statements in roles.items()
    }


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def test_secrets_manager_access_is_scoped_to_the_prefix_and_the_state_key(translated: dict[str, Any]) -> None:
    writers = set()
    for role, statements in role_statements(translated).items():
        for statement in statements:
            actions = [a.split(":", 1)[1] for a in _as_list(statement["Action"]) if a.startswith("secretsmanager:")]
            if not actions:
                continue
            resources = _as_list(statement["Resource"])
            if actions == ["ListSecrets"]:  # the MonitoringPolicy: names and tags, no value
                assert resources == ["*"] and role == "DashboardFunctionRole", (role, actions)
                continue
            if set(actions) <= {"ListSecrets", "BatchGetSecretValue"}:
                assert resources == ["*"] and role == "RefreshFunctionRole", (role, actions)
                continue
            if resources == [{"Ref": "StateKeySecret"}]:
                assert actions == ["GetSecretValue"] and role == "CallbackFunctionRole", (role, actions)
                continue
            if APPFLOW_SECRETS in json.dumps(resources):
                # AppFlow's own credential secrets, one pattern per named profile, in this account only.
                assert set(actions) <= {"PutSecretValue", "UpdateSecret"}, (role, actions)
                assert statement["Condition"]["StringEquals"]["aws:ResourceAccount"] == {"Ref": "AWS::AccountId"}
                continue
            assert resources == [{"Fn::Sub": PREFIX_ARN}], (role, resources)
            assert set(actions) <= {"GetSecretValue", "DescribeSecret", "GetResourcePolicy"} | WRITES, (role, actions)
            if WRITES & set(actions):
                writers.add(role)
    assert writers == WRITERS


def test_no_role_can_create_delete_or_share_secrets(translated: dict[str, Any]) -> None:
    forbidden = {"CreateSecret", "DeleteSecret", "PutResourcePolicy", "RestoreSecret", "ReplicateSecretToRegions"}
    for role, statements in role_statements(translated).items():
        for statement in statements:
            for action in _as_list(statement["Action"]):
                assert action != "secretsmanager:*" and action.split(":")[-1] not in forbidden, (role, action)


def _statements_allowing(policy: dict[str, Any], service: str) -> list[dict[str, Any]]:
    return [
        statement
        for statement in policy["Statement"]
        if statement["Effect"] == "Allow" and service in _as_list(statement.get("Principal", {}).get("Service", []))
    ]


def test_every_topic_an_alarm_or_rule_notifies_is_on_a_key_both_services_may_use(translated: dict[str, Any]) -> None:
    """CloudWatch and EventBridge cannot publish to a topic on the AWS managed SNS key; the topic's own key must
    let both use it, without source conditions for EventBridge (unsupported there: every event would be dropped),
    and the topic policy (which replaces the default one) must let both publish."""
    resources = translated["Resources"]
    targeted: dict[str, set[str]] = {}
    for resource in resources.values():
        properties = resource.get("Properties", {})
        if resource["Type"] == "AWS::CloudWatch::Alarm":
            for action in properties.get("AlarmActions", []) + properties.get("OKActions", []):
                targeted.setdefault(action["Ref"], set()).add("cloudwatch.amazonaws.com")
        if resource["Type"] == "AWS::Events::Rule":
            for target in properties.get("Targets", []):
                if resources.get(target["Arn"].get("Ref", ""), {}).get("Type") == "AWS::SNS::Topic":
                    targeted.setdefault(target["Arn"]["Ref"], set()).add("events.amazonaws.com")
    assert targeted, "no alarm or rule notifies a topic?"
    for topic, services in targeted.items():
        key = resources[topic]["Properties"]["KmsMasterKeyId"]
        assert key != "alias/aws/sns" and "Fn::GetAtt" in key, (topic, key)
        key_policy = resources[key["Fn::GetAtt"][0]]["Properties"]["KeyPolicy"]
        topic_policies = [
            r["Properties"]["PolicyDocument"]
            for r in resources.values()
            if r["Type"] == "AWS::SNS::TopicPolicy" and {"Ref": topic} in r["Properties"]["Topics"]
        ]
        for service in {"cloudwatch.amazonaws.com", "events.amazonaws.com"}:
            [grant] = _statements_allowing(key_policy, service)
            assert {"kms:Decrypt", "kms:GenerateDataKey*"} <= set(grant["Action"]), service
            if service == "events.amazonaws.com":
                assert "Condition" not in grant, "EventBridge's KMS requests carry no aws:SourceArn/SourceAccount"
            else:
                assert "aws:SourceArn" in json.dumps(grant["Condition"]), "CloudWatch's grant is scoped to our alarms"
            if service in services:
                for policy in topic_policies:
                    [publish] = _statements_allowing(policy, service)
                    assert publish["Action"] == "sns:Publish" and "aws:SourceArn" in json.dumps(publish["Condition"])


def test_each_condition_reaches_a_person_once(translated: dict[str, Any]) -> None:
    """An alarm that notifies and an event the rule forwards for the same condition would be two e-mails."""
    resources = translated["Resources"]
    forwarded = set(resources["AttentionEventsRule"]["Properties"]["EventPattern"]["detail-type"])
    by_metric = {
        "ReauthorizationRequired": "ServiceNow Connection Reauthorization Required",
        "RefreshTokenExpiring": "ServiceNow Refresh Token Expiring",
        "ConnectionsFailing": "ServiceNow Connection Failing",
    }
    for name, resource in resources.items():
        if resource["Type"] != "AWS::CloudWatch::Alarm":
            continue
        properties = resource["Properties"]
        event = by_metric.get(properties.get("MetricName", ""))
        assert bool(properties.get("AlarmActions")) != (event in forwarded), name
    alarmed = {
        r["Properties"]["Dimensions"][0]["Value"]["Ref"]
        for r in resources.values()
        if r["Type"] == "AWS::CloudWatch::Alarm" and r["Properties"].get("MetricName") == "Errors"
    }
    assert {"RefreshFunction", "WorkerFunction", "RotationFunction"} <= alarmed
    # The one path of the three conditions the rule forwards is watched itself.
    watched = {r["Properties"].get("MetricName") for r in resources.values() if r["Type"] == "AWS::CloudWatch::Alarm"}
    assert {"FailedInvocations", "ChangeEventsNotPublished"} <= watched
    # Health that lives only in a container's memory (tag writes refused) is a condition a person must hear of.
    assert {"HealthTagsNotWritten", "SecretWriteFailed"} <= watched
    assert any(
        r["Type"] == "AWS::CloudWatch::Alarm" and r["Properties"].get("MetricName") == "InvalidConnectionSecret"
        for r in resources.values()
    )


def test_a_failed_first_create_leaves_no_secret_or_key_behind() -> None:
    """A failed first create must not leave a secret whose name blocks the retry, nor keys billed at $1 a month."""
    resources = load_template()["Resources"]
    for name, resource in resources.items():
        if resource["Type"] in ("AWS::SecretsManager::Secret", "AWS::KMS::Key"):
            assert resource.get("DeletionPolicy") in ("RetainExceptOnCreate", "Delete"), name
    # The keys the connections depend on outlive the stack; the signing key of the stack's own links does not.
    assert resources["SecretsKey"]["DeletionPolicy"] == resources["JwtSigningKmsKey"]["DeletionPolicy"]
    assert resources["SecretsKey"]["DeletionPolicy"] == "RetainExceptOnCreate"


def test_a_stack_deleted_and_deployed_again_under_its_name_needs_no_hand_step(translated: dict[str, Any]) -> None:
    """The state key's name carries the stack's id (new on each create, the same across updates): a redeploy under
    the same name does not collide with the old secret, which Secrets Manager keeps through its recovery window."""
    state = translated["Resources"]["StateKeySecret"]
    names = {resolve(state["Properties"]["Name"], "oauth", {"AWS::StackId": stack_id}) for stack_id in (
        "arn:aws:cloudformation:us-east-1:123456789012:stack/oauth/1b2c3d4e-aaaa-bbbb-cccc-000000000001",
        "arn:aws:cloudformation:us-east-1:123456789012:stack/oauth/9f8e7d6c-aaaa-bbbb-cccc-000000000002",
    )}  # fmt: skip
    assert names == {"oauth-state-key-1b2c3d4e", "oauth-state-key-9f8e7d6c"}
    assert state["DeletionPolicy"] == "Delete"


def test_parameters_that_cannot_work_together_are_refused_at_deploy(translated: dict[str, Any]) -> None:
    """CloudFormation Rules refuse the combinations that were silently ignored or broke an update: a certificate
    issuer for a key the stack did not create, consumers with no customer-managed key to decrypt."""
    rules = translated["Rules"]
    issuer = rules["JwtCertificateIssuerNeedsTheCreatedKey"]
    assert issuer["RuleCondition"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "JwtCertificateIssuerArn"}, ""]}]}
    assert issuer["Assertions"][0]["Assert"] == {"Fn::Equals": [{"Ref": "JwtSigningKey"}, "create"]}
    consumers = rules["ConsumersNeedACustomerManagedKey"]
    assert consumers["RuleCondition"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "ConsumerPrincipals"}, ""]}]}
    assert consumers["Assertions"][0]["Assert"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "SecretsKmsKeyArn"}, ""]}]}
    # Multi-Region keys are keys too.
    mrk = "arn:aws:kms:eu-west-1:111122223333:key/mrk-1234abcd12ab34cd56ef1234567890ab"
    single = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    for parameter in ("SecretsKmsKeyArn", "ReplicaKmsKeyArns", "JwtSigningKey"):
        pattern = re.compile(translated["Parameters"][parameter]["AllowedPattern"])
        assert pattern.match(mrk) and pattern.match(single), parameter
    assert re.compile(translated["Parameters"]["ReplicaKmsKeyArns"]["AllowedPattern"]).match(f"{mrk},{single}")


def test_every_function_logs_to_its_own_group_made_before_it(translated: dict[str, Any]) -> None:
    """Never a group Lambda makes on its own (no retention): each function names the stack's group for it."""
    resources = translated["Resources"]
    functions = [name for name, r in resources.items() if r["Type"] == "AWS::Lambda::Function"]
    assert len(functions) == 5
    for name in functions:
        group = resources[name]["Properties"]["LoggingConfig"]["LogGroup"]
        assert group == {"Ref": f"{name}Logs"}, name
        assert resources[f"{name}Logs"]["Properties"]["RetentionInDays"] == 90


def test_every_new_dead_letter_notifies(translated: dict[str, Any]) -> None:
    """The worker announces each record it fails on its last delivery (the rule forwards it, naming the
    connection); the alarm, for those it never saw, watches the queue's growth (one on its size went to ALARM once
    and stayed there, silent). tests/test_refresh_handlers.py shows the worker's event on moto."""
    resources = translated["Resources"]
    alarm = resources["DeadLetterAlarm"]["Properties"]
    [expression] = [m for m in alarm["Metrics"] if m.get("ReturnData")]
    assert expression["Expression"] == "DIFF(FILL(visible, 0))"
    receives = resources["RefreshQueue"]["Properties"]["RedrivePolicy"]["maxReceiveCount"]
    assert f"failed {receives} times" in alarm["AlarmDescription"]
    worker = resources["WorkerFunction"]["Properties"]["Environment"]["Variables"]
    assert int(worker["MAX_RECEIVE_COUNT"]) == receives
    forwarded = resources["AttentionEventsRule"]["Properties"]["EventPattern"]["detail-type"]
    assert "ServiceNow Refresh Dead-Lettered" in forwarded


def test_timeouts_fit_the_worst_case_refresh(translated: dict[str, Any]) -> None:
    """Sized from refresh.ATTEMPT_WORST_SECONDS, as the template's comments state."""
    from core.refresh import ATTEMPT_WORST_SECONDS, START_MARGIN_SECONDS

    resources = translated["Resources"]
    worker = resources["WorkerFunction"]["Properties"]
    [mapping] = [r["Properties"] for r in resources.values() if r["Type"] == "AWS::Lambda::EventSourceMapping"]
    assert mapping["BatchSize"] * ATTEMPT_WORST_SECONDS + START_MARGIN_SECONDS < worker["Timeout"]
    queue = resources["RefreshQueue"]["Properties"]
    assert queue["VisibilityTimeout"] >= 6 * worker["Timeout"]
    # A failed message must live through every redelivery to reach the dead-letter queue (and its alarm).
    receives = queue["RedrivePolicy"]["maxReceiveCount"]
    assert queue["MessageRetentionPeriod"] >= (receives + 1) * queue["VisibilityTimeout"]
    assert resources["RefreshFunction"]["Properties"]["Timeout"] > 2 * ATTEMPT_WORST_SECONDS + START_MARGIN_SECONDS
    assert resources["RotationFunction"]["Properties"]["Timeout"] >= 2 * ATTEMPT_WORST_SECONDS
    [invoke] = [r["Properties"] for r in resources.values() if r["Type"] == "AWS::Lambda::EventInvokeConfig"]
    assert invoke["FunctionName"] == {"Ref": "RefreshFunction"} and invoke["MaximumRetryAttempts"] == 0


def test_only_the_refreshing_functions_may_sign_with_the_jwt_key(translated: dict[str, Any]) -> None:
    """The JWT signing key's private half never leaves KMS, and the key policy decides who can mint assertions:
    the three functions that refresh (and an optional named certificate issuer), nobody through IAM or grants."""
    resources = translated["Resources"]
    key = resources["JwtSigningKmsKey"]
    assert key["Condition"] == "CreateJwtKey" and key["DeletionPolicy"] == "RetainExceptOnCreate"
    assert key["Properties"]["KeySpec"] == "RSA_2048" and key["Properties"]["KeyUsage"] == "SIGN_VERIFY"
    statements = key["Properties"]["KeyPolicy"]["Statement"]
    signing = [s for s in statements if "kms:Sign" in json.dumps(s["Action"]) or s["Action"] in ("kms:*", "*")]
    assert len(signing) == 1, "exactly one statement may allow kms:Sign"
    principals = signing[0]["Principal"]["AWS"]
    roles = {p["Fn::GetAtt"][0] for p in principals if isinstance(p, dict) and "Fn::GetAtt" in p}
    assert roles == {"RefreshFunctionRole", "WorkerFunctionRole", "RotationFunctionRole"}
    assert [p for p in principals if isinstance(p, dict) and "Fn::If" in p] == [
        {"Fn::If": ["HasJwtIssuer", {"Ref": "JwtCertificateIssuerArn"}, {"Ref": "AWS::NoValue"}]}
    ]
    assert signing[0]["Condition"]["StringEquals"]["kms:SigningAlgorithm"] == "RSASSA_PKCS1_V1_5_SHA_256"
    for statement in statements:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        assert "kms:CreateGrant" not in actions and not any(a.endswith("*") for a in actions), statement["Sid"]
    # Operators read the public key (for the certificate) through IAM: the account may delegate GetPublicKey.
    admin = next(s for s in statements if s["Sid"] == "AccountAdministersTheKey")
    assert "kms:GetPublicKey" in admin["Action"]
    # The callback never signs: no kms:Sign in its role, with either kind of key.
    callback = json.dumps(resources["CallbackFunctionRole"]["Properties"])
    assert "kms:Sign" not in callback
    for role in ("RefreshFunctionRole", "WorkerFunctionRole", "RotationFunctionRole"):
        assert '"JwtSigningPolicy"' in json.dumps(resources[role]["Properties"]), role  # the external key's grant
    assert '"JwtSigningPolicy"' not in callback


def test_the_callback_reads_only_the_jwt_keys_public_half(translated: dict[str, Any]) -> None:
    """The JWKS route needs kms:GetPublicKey and nothing more: the stack's own key names the callback's role in its
    key policy; an existing key through JwtPublicKeyPolicy, attached to the callback alone."""
    resources = translated["Resources"]
    statements = resources["JwtSigningKmsKey"]["Properties"]["KeyPolicy"]["Statement"]
    readers = [s for s in statements if "CallbackFunctionRole" in json.dumps(s.get("Principal"))]
    assert readers == [
        {
            "Sid": "CallbackPublishesPublicKey",
            "Effect": "Allow",
            "Principal": {"AWS": {"Fn::GetAtt": ["CallbackFunctionRole", "Arn"]}},
            "Action": "kms:GetPublicKey",
            "Resource": "*",
        }
    ]
    policy = resources["JwtPublicKeyPolicy"]
    assert policy["Condition"] == "UseExternalJwtKey"
    assert policy["Properties"]["PolicyDocument"]["Statement"] == [
        {"Sid": "JwtPublicKey", "Effect": "Allow", "Action": "kms:GetPublicKey", "Resource": {"Ref": "JwtSigningKey"}}
    ]
    holders = [name for name, r in resources.items() if '"JwtPublicKeyPolicy"' in json.dumps(r.get("Properties"))]
    assert holders == ["CallbackFunctionRole"]
    kms_actions = {
        action
        for statement in role_statements(translated)["CallbackFunctionRole"]
        if "kms:ViaService" not in json.dumps(statement.get("Condition"))  # the secrets' keys, via Secrets Manager
        for action in _as_list(statement["Action"])
        if action.startswith("kms:")
    }
    assert kms_actions == {"kms:GetPublicKey"}


def test_the_api_routes_are_the_same_in_the_template_the_handler_and_the_local_api() -> None:
    """Every HttpApi route of template.yaml reaches the callback handler and exists in local/api.py, and no more."""
    from handlers.callback import _ROUTES
    from local.api import ROUTES

    events = load_template()["Resources"]["CallbackFunction"]["Properties"]["Events"].values()
    declared = {f"{e['Properties']['Method']} {e['Properties']['Path']}" for e in events if e["Type"] == "HttpApi"}
    assert (
        declared
        == {route for route, _ in ROUTES}
        == {
            "GET /callback",
            "GET /connections/{name}/authorize",
            "GET /connections/{name}/jwks.json",
        }
    )
    for route in declared:
        path = route.split(" ", 1)[1].replace("{name}", "prod")
        assert sum(bool(pattern.match(path)) for pattern, _ in _ROUTES) == 1, route


def test_the_dashboard_shows_only_this_stack_and_its_widget_can_only_list(translated: dict[str, Any]) -> None:
    """Every resource the dashboard names is the stack's own; the custom widget's role has the list-only
    MonitoringPolicy and nothing else (no GetSecretValue: the page can hold no token)."""
    import re

    resources = translated["Resources"]
    body_template, values = resources["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"], {}
    for name in re.findall(r"\$\{([A-Za-z0-9]+)\.Arn\}", body_template):
        assert name in resources, f"the dashboard names {name}, which the stack does not have"
        values[f"{name}.Arn"] = f"arn:aws:test:::{name}"
    values["AWS::Region"], values["AWS::StackName"] = "us-east-1", "oauth-prod"
    body = json.loads(re.sub(r"\$\{([^}]+)\}", lambda m: values[m.group(1)], body_template))
    alarms = {r for r, v in resources.items() if v["Type"] == "AWS::CloudWatch::Alarm"}
    [alarm_widget] = [w for w in body["widgets"] if w["type"] == "alarm"]
    assert {arn.rsplit(":", 1)[1] for arn in alarm_widget["properties"]["alarms"]} == alarms, "every alarm shown"
    [custom] = [w for w in body["widgets"] if w["type"] == "custom"]
    assert custom["properties"]["endpoint"] == "arn:aws:test:::DashboardFunction"
    metrics = {m[1] for w in body["widgets"] if w["type"] == "metric" for m in w["properties"]["metrics"]}
    assert {"Refreshed", "FailedRejected", "MinAccessTokenSecondsLeft", "MinRefreshTokenDaysLeft"} <= metrics
    assert {m[0] for w in body["widgets"] if w["type"] == "metric" for m in w["properties"]["metrics"]} == {
        "ServiceNowOAuth"
    }
    # Only this stack's metrics (its name is the `service` dimension), never another stack's in the account.
    assert {tuple(m[2:4]) for w in body["widgets"] if w["type"] == "metric" for m in w["properties"]["metrics"]} == {
        ("service", "oauth-prod")
    }
    role = resources["DashboardFunctionRole"]["Properties"]
    assert role.get("Policies", []) == [], "no inline rights beyond the managed policies"
    managed = role["ManagedPolicyArns"]
    assert {"Ref": "MonitoringPolicy"} in managed
    assert all(
        "AWSLambdaBasicExecutionRole" in json.dumps(p)
        or "AWSXrayWriteOnlyAccess" in json.dumps(p)
        or p == {"Ref": "MonitoringPolicy"}
        for p in managed
    ), managed
    monitoring = json.dumps(resources["MonitoringPolicy"]["Properties"]["PolicyDocument"])
    assert "GetSecretValue" not in monitoring and "BatchGetSecretValue" not in monitoring


def test_the_shared_rights_have_one_home(translated: dict[str, Any]) -> None:
    """The four functions that touch connections reference one ConnectionWriterPolicy; none repeats its
    statements inline, so who can do what is read once."""
    resources = translated["Resources"]
    shared = resources["ConnectionWriterPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    shared_sids = {s["Sid"] for item in shared for s in _branches(item) if isinstance(s, dict) and "Sid" in s}
    assert {"ConnectionSecrets", "ChangeEvents", "SecretsKmsKey"} <= shared_sids
    for role in WRITERS:
        properties = resources[role]["Properties"]
        assert {"Ref": "ConnectionWriterPolicy"} in properties["ManagedPolicyArns"], role
        inline = {
            s.get("Sid")
            for policy in properties.get("Policies", [])
            for branch in _branches(policy)
            for s in branch["PolicyDocument"]["Statement"]
        }
        assert not inline & shared_sids, (role, inline & shared_sids)
    assert {"Ref": "ConnectionWriterPolicy"} not in resources["DashboardFunctionRole"]["Properties"][
        "ManagedPolicyArns"
    ]


def test_readers_in_other_accounts_decrypt_only_through_secrets_manager(translated: dict[str, Any]) -> None:
    """ConsumerPrincipals get kms:Decrypt on the stack's secrets key only via Secrets Manager in this region; the
    key exists when SecretsKmsKeyArn=create, whatever ConsumerPrincipals says (clearing them keeps it)."""
    resources = translated["Resources"]
    key = resources["SecretsKey"]
    assert key["Condition"] == "CreateSecretsKey" and key["DeletionPolicy"] == "RetainExceptOnCreate"
    assert key["Properties"]["EnableKeyRotation"] is True
    [optional] = [s for s in key["Properties"]["KeyPolicy"]["Statement"] if "Fn::If" in s]
    assert optional["Fn::If"][0] == "HasConsumers" and optional["Fn::If"][2] == {"Ref": "AWS::NoValue"}
    consumers = optional["Fn::If"][1]
    assert consumers["Sid"] == "ConsumersDecryptThroughSecretsManager"
    assert consumers["Principal"] == {"AWS": {"Fn::Split": [",", {"Ref": "ConsumerPrincipals"}]}}
    assert sorted(consumers["Action"]) == ["kms:Decrypt", "kms:DescribeKey"]
    assert consumers["Condition"] == {
        "StringEquals": {"kms:ViaService": {"Fn::Sub": "secretsmanager.${AWS::Region}.amazonaws.com"}}
    }
    conditions = translated["Conditions"]
    assert conditions["CreateSecretsKey"] == {"Fn::Equals": [{"Ref": "SecretsKmsKeyArn"}, "create"]}
    # The state key and the functions use whichever key is in force.
    assert "SecretsKey" in json.dumps(resources["StateKeySecret"]["Properties"]["KmsKeyId"])
    import re

    pattern = re.compile(translated["Parameters"]["ConsumerPrincipals"]["AllowedPattern"])
    assert pattern.match("111122223333,arn:aws:iam::444455556666:role/reader")
    for bad in ("*", "arn:aws:iam::111122223333:user/bob", "11112222333", "111122223333,*"):
        assert not pattern.match(bad), bad


def resolve(value: Any, stack: str, parameters: dict[str, str] | None = None) -> Any:
    """`value` as CloudFormation would resolve it in a stack named `stack`: pseudo parameters and !Sub, and every
    other resource's name as that stack's own (physical names are per stack)."""
    parameters = {"AWS::StackName": stack, "AWS::Region": "us-east-1", "AWS::AccountId": "123456789012",
                  "AWS::Partition": "aws",
                  "AWS::StackId": f"arn:aws:cloudformation:::stack/{stack}/{uuid5(NAMESPACE_URL, stack)}",
                  **(parameters or {})}  # fmt: skip
    if isinstance(value, list):
        return [resolve(item, stack, parameters) for item in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"Ref"}:
        return parameters.get(value["Ref"], f"{stack}-{value['Ref']}")
    if set(value) == {"Fn::GetAtt"}:
        return f"{stack}-{'.'.join(value['Fn::GetAtt'])}"
    if set(value) == {"Fn::Sub"}:
        text, local = (value["Fn::Sub"], {}) if isinstance(value["Fn::Sub"], str) else value["Fn::Sub"]
        known = {**parameters, **{k: resolve(v, stack, parameters) for k, v in local.items()}}
        return re.sub(r"\$\{([^}]+)\}", lambda m: str(known.get(m.group(1), f"{stack}-{m.group(1)}")), text)
    if set(value) == {"Fn::Split"}:
        delimiter, text = value["Fn::Split"]
        return str(resolve(text, stack, parameters)).split(delimiter)
    if set(value) == {"Fn::Select"}:
        index, items = value["Fn::Select"]
        return resolve(items, stack, parameters)[int(index)]
    if set(value) == {"Fn::FindInMap"}:
        return value  # a period, not a name
    return {key: resolve(item, stack, parameters) for key, item in value.items()}


def test_two_stacks_in_one_account_share_no_alarm_metric_and_no_rule_pattern(translated: dict[str, Any]) -> None:
    """Staging and prod side by side in one account and region: each stack's alarms watch only its own metrics, and
    its rule forwards only its own events (the stack name is in the `service` dimension and in the source)."""

    def watched(stack: str) -> tuple[set[str], list[Any]]:
        resources = resolve(translated["Resources"], stack)
        alarms = [r["Properties"] for r in resources.values() if r["Type"] == "AWS::CloudWatch::Alarm"]
        stats = [p for p in alarms if "MetricName" in p]
        stats += [m["MetricStat"]["Metric"] for p in alarms for m in p.get("Metrics", []) if "MetricStat" in m]
        metrics = {json.dumps([p["Namespace"], p["MetricName"], p.get("Dimensions")], sort_keys=True) for p in stats}
        rules = [r["Properties"] for r in resources.values() if r["Type"] == "AWS::Events::Rule"]
        patterns = [rule["EventPattern"] for rule in rules if "EventPattern" in rule]  # not the schedule
        return metrics, patterns

    staging, prod = watched("oauth-staging"), watched("oauth-prod")
    assert staging[0] and not staging[0] & prod[0]
    sources = [set(pattern["source"]) for pattern in staging[1] + prod[1]]
    assert len(sources) == 2 and not sources[0] & sources[1]
    # What the functions are told to send and emit is what the other stack's alarms and rules do not watch.
    variables = resolve(translated["Resources"]["RefreshFunction"]["Properties"]["Environment"]["Variables"], "x")
    assert variables["POWERTOOLS_SERVICE_NAME"] == "x" and variables["EVENT_SOURCE"] == "servicenow-oauth.x"
    assert {"source": ["servicenow-oauth.x"]}.items() <= resolve(
        translated["Resources"]["AttentionEventsRule"]["Properties"]["EventPattern"], "x"
    ).items()


def test_a_stopped_refresher_and_an_expiring_access_token_each_raise_an_alarm(translated: dict[str, Any]) -> None:
    """Silence is an alarm: both watch a figure every sweep emits (tests/test_refresh_handlers.py shows it on moto),
    and treat its absence as breaching, so a refresher that stops running is heard within three intervals."""
    resources, mapping = translated["Resources"], translated["Mappings"]["SweepInterval"]
    silent = resources["RefresherSilentAlarm"]["Properties"]
    expiring = resources["AccessTokenExpiringAlarm"]["Properties"]
    for alarm, metric in ((silent, "SweepsCompleted"), (expiring, "MinAccessTokenSecondsLeft")):
        assert alarm["Namespace"] == "ServiceNowOAuth" and alarm["MetricName"] == metric
        assert alarm["TreatMissingData"] == "breaching" and alarm["AlarmActions"] == [{"Ref": "AlarmTopic"}]
        assert alarm["Period"] == {"Fn::FindInMap": ["SweepInterval", {"Ref": "RefreshIntervalMinutes"}, "Seconds"]}
        assert alarm["ComparisonOperator"] == "LessThanThreshold"
    interval = translated["Parameters"]["RefreshIntervalMinutes"]
    minutes = range(interval["MinValue"], interval["MaxValue"] + 1)
    assert {int(key): value["Seconds"] for key, value in mapping.items()} == {m: 60 * m for m in minutes}
    assert silent["Threshold"] == 1 and silent["EvaluationPeriods"] == silent["DatapointsToAlarm"] == 3
    # 15 minutes at the default interval: a silent refresher is heard while the last tokens still live (30 min).
    assert 3 * mapping[str(interval["Default"])]["Seconds"] <= 900
    assert expiring["Threshold"] == 60
