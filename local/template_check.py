"""Checks template.yaml as CloudFormation will see it: SAM-translated offline, then cfn-lint.

cfn-lint alone skips what is inside `AWS::Serverless::*` resources, so the template is first
transformed by aws-sam-translator (the same library `sam deploy` uses), with an S3 stand-in for
`CodeUri`. `python -m local.template_check` is what `make lint` runs; the tests import `translate`.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

from cfnlint.api import lint_all
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

TEMPLATE = Path(__file__).resolve().parent.parent / "template.yaml"
CODE_STAND_IN = "s3://artifacts-bucket/src.zip"


class _NoManagedPolicies:
    """The translator asks IAM for AWS managed policy ARNs only when a template names one; ours names none."""

    def load(self) -> dict[str, str]:
        return {}


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    template: dict[str, Any] = yaml_parse(path.read_text())
    return template


def translate(path: Path = TEMPLATE) -> dict[str, Any]:
    """The CloudFormation template SAM would deploy (after `sam package` points CodeUri at S3)."""
    template = copy.deepcopy(load_template(path))
    template.setdefault("Globals", {}).setdefault("Function", {})["CodeUri"] = CODE_STAND_IN
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::Serverless::Function" and "CodeUri" in resource.get("Properties", {}):
            resource["Properties"]["CodeUri"] = CODE_STAND_IN
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    translated: dict[str, Any] = transform(template, {}, _NoManagedPolicies())
    return translated


def lint(path: Path = TEMPLATE) -> list[str]:
    """cfn-lint errors and warnings on the translated template (informational rules are advice, not defects)."""
    matches = lint_all(json.dumps(translate(path)))
    return [str(match) for match in matches if match.rule.severity in ("error", "warning")]


def main() -> int:
    problems = lint()
    for problem in problems:
        print(problem)
    print(f"cfn-lint on the SAM-translated template: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
