"""template.yaml checked as CloudFormation sees it: SAM-translated, then cfn-lint; plus `sam validate --lint`."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cfnlint.api import lint_all
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "template.yaml"


class _NoManagedPolicies:
    """The translator asks IAM for AWS managed policy ARNs only when a template names one; we don't."""

    def load(self) -> dict[str, str]:
        return {}


def load_template() -> dict[str, Any]:
    return yaml_parse(TEMPLATE.read_text())


def translate() -> dict[str, Any]:
    """The CloudFormation template SAM would deploy (CodeUri points at S3 after `sam package`)."""
    template = copy.deepcopy(load_template())
    template.setdefault("Globals", {}).setdefault("Function", {})["CodeUri"] = "s3://artifacts-bucket/src.zip"
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::Serverless::Function" and "CodeUri" in resource.get("Properties", {}):
            resource["Properties"]["CodeUri"] = "s3://artifacts-bucket/src.zip"
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    return transform(template, {}, _NoManagedPolicies())


@pytest.fixture(scope="module")
def translated() -> dict[str, Any]:
    return translate()


def test_translated_template_passes_cfn_lint(translated: dict[str, Any]) -> None:
    # Informational rules (e.g. I4010's "Context" metadata) are advice, not defects; errors and warnings fail.
    matches = [m for m in lint_all(json.dumps(translated)) if m.rule.severity in ("error", "warning")]
    assert [str(match) for match in matches] == []


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
