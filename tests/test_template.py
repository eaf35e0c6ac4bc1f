"""template.yaml checked as CloudFormation sees it: SAM-translated, then cfn-lint; plus `sam validate --lint`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

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
APPFLOW_SECRETS = "arn:${AWS::Partition}:secretsmanager:${AWS::Region}:${AWS::AccountId}:secret:appflow!*"
WRITES = {"PutSecretValue", "UpdateSecretVersionStage", "TagResource", "UntagResource", "UpdateSecret"}
WRITERS = {"CallbackFunctionRole", "RefreshFunctionRole", "WorkerFunctionRole", "RotationFunctionRole"}


def _branches(value: Any) -> list[Any]:
    """Both sides of an Fn::If (a conditional policy is granted in some deployments)."""
    if isinstance(value, dict) and "Fn::If" in value:
        return [branch for side in value["Fn::If"][1:] for branch in _branches(side)]
    return [value]


def role_statements(translated: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    roles: dict[str, list[dict[str, Any]]] = {}
    for name, resource in translated["Resources"].items():
        if resource["Type"] != "AWS::IAM::Role":
            continue
        statements = roles.setdefault(name, [])
        for policy in resource["Properties"].get("Policies", []):
            for branch in _branches(policy):
                if isinstance(branch, dict) and "PolicyDocument" in branch:
                    statements += branch["PolicyDocument"]["Statement"]
    return roles


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
            if set(actions) <= {"ListSecrets", "BatchGetSecretValue"}:
                assert resources == ["*"] and role == "RefreshFunctionRole", (role, actions)
                continue
            if resources == [{"Ref": "StateKeySecret"}]:
                assert actions == ["GetSecretValue"] and role == "CallbackFunctionRole", (role, actions)
                continue
            if resources == [{"Fn::Sub": APPFLOW_SECRETS}]:
                assert set(actions) <= {"PutSecretValue", "UpdateSecret"}, (role, actions)
                continue
            assert resources == [{"Fn::Sub": PREFIX_ARN}], (role, resources)
            assert set(actions) <= {"GetSecretValue", "DescribeSecret"} | WRITES, (role, actions)
            if WRITES & set(actions):
                writers.add(role)
    assert writers == WRITERS


def test_no_role_can_create_delete_or_share_secrets(translated: dict[str, Any]) -> None:
    forbidden = {"CreateSecret", "DeleteSecret", "PutResourcePolicy", "RestoreSecret", "ReplicateSecretToRegions"}
    for role, statements in role_statements(translated).items():
        for statement in statements:
            for action in _as_list(statement["Action"]):
                assert action != "secretsmanager:*" and action.split(":")[-1] not in forbidden, (role, action)
