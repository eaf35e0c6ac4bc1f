"""IAM's answer for one request, and the roles the SAM-translated template deploys, resolved for one stack.

A small evaluator, because none of the maintained ones fits (README, "Permissions, checked call by call"): Allow
and Deny, NotAction/NotResource, IAM's own wildcards, the condition operators the template and docs/ use, KMS's
key-policy rule and the two-account rule. tests/permissions.py feeds it every AWS call the suite records.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# ------------------------------------------------------------------------------------------ IAM's evaluation
# https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_evaluation-logic.html
Statement = dict[str, Any]
Context = dict[str, str]


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


@functools.cache
def _glob(pattern: str, *, ignore_case: bool = False) -> re.Pattern[str]:
    """IAM's wildcards: * any run of characters, ? exactly one; nothing else is special (unlike fnmatch's [])."""
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(body, re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL)


def _like(have: str, want: str, *, ignore_case: bool = False) -> bool:
    return _glob(want, ignore_case=ignore_case).fullmatch(have) is not None


def _arn_like(have: str, want: str) -> bool:
    """ArnLike/ArnEquals: the six colon-separated parts each matched with wildcards."""
    have_parts, want_parts = have.split(":", 5), want.split(":", 5)
    return len(have_parts) == len(want_parts) == 6 and all(
        _like(h, w) for h, w in zip(have_parts, want_parts, strict=True)
    )


# https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_elements_condition_operators.html
OPERATORS: dict[str, Callable[[str, str], bool]] = {
    "StringEquals": lambda have, want: have == want,
    "StringEqualsIgnoreCase": lambda have, want: have.lower() == want.lower(),
    "StringLike": _like,
    "ArnEquals": _arn_like,
    "ArnLike": _arn_like,
    "Bool": lambda have, want: have.lower() == str(want).lower(),
}


def condition_holds(condition: dict[str, Any], context: Context, *, unknown: bool) -> bool:
    """Every operator and every key must hold (AND); any of a key's values may (OR). A key missing from the
    request does not match (…IfExists: it does; Null tests presence). An operator this evaluator does not know
    counts as `unknown`: not satisfied for an Allow, satisfied for a Deny, so a gap never widens access.
    Condition key names are not case-sensitive (IAM's Condition element), their values are."""
    context = {key.lower(): value for key, value in context.items()}
    for operator, pairs in condition.items():
        base, if_exists = (operator[:-8], True) if operator.endswith("IfExists") else (operator, False)
        for key, wanted in pairs.items():
            options = [str(option) for option in _listed(wanted)]
            have = context.get(key.lower())
            if base == "Null":
                if not any((have is None) == (option.lower() == "true") for option in options):
                    return False
                continue
            test = OPERATORS.get(base)
            if test is None:
                if not unknown:
                    return False
                continue
            if have is None:
                if if_exists:
                    continue
                return False
            if not any(test(have, option) for option in options):
                return False
    return True


@dataclass(frozen=True)
class Request:
    """One authorization IAM makes: who, what, on what, with which request context."""

    principal: str
    action: str
    resource: str
    context: tuple[tuple[str, str], ...] = ()

    @property
    def account(self) -> str:
        return self.principal.split(":")[4]

    @property
    def resource_account(self) -> str:
        """The account in the resource's ARN ("" for "*" or an ARN without one, as an S3 bucket's)."""
        parts = self.resource.split(":")
        return parts[4] if len(parts) > 5 else ""


def _principal_matches(statement: Statement, principal: str) -> str | None:
    """ "direct" when the statement names the caller, "account" when it names the caller's account (which
    delegates to the caller's own IAM policies), None otherwise."""
    if "NotPrincipal" in statement:
        return None  # never used by this project; refuse to guess
    block = statement.get("Principal")
    if block == "*":
        return "direct"
    if not isinstance(block, dict):
        return None
    account = principal.split(":")[4]
    for value in _listed(block.get("AWS", [])):
        if value == "*" or value == principal:
            return "direct"
        if value in (account, f"arn:aws:iam::{account}:root"):
            return "account"
    return None


def statement_matches(statement: Statement, request: Request) -> bool:
    action, resource, context = request.action, request.resource, dict(request.context)
    if "Action" in statement:
        if not any(_like(action, a, ignore_case=True) for a in _listed(statement["Action"])):
            return False
    elif any(_like(action, a, ignore_case=True) for a in _listed(statement["NotAction"])):
        return False
    if "Resource" in statement:
        if not any(_like(resource, r) for r in _listed(statement["Resource"])):
            return False
    elif "NotResource" in statement and any(_like(resource, r) for r in _listed(statement["NotResource"])):
        return False
    return condition_holds(statement.get("Condition", {}), context, unknown=statement["Effect"] == "Deny")


@dataclass(frozen=True)
class Policy:
    """A named policy document: a role's (identity), a key's or a secret's (resource)."""

    name: str
    statements: tuple[tuple[str, Statement], ...]  # (label, statement)

    @classmethod
    def of(cls, name: str, document: dict[str, Any]) -> Policy:
        statements = [s for s in _listed(document.get("Statement", [])) if isinstance(s, dict)]
        return cls(name, tuple((f"{name}/{s.get('Sid') or f'#{i}'}", s) for i, s in enumerate(statements)))


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    used: tuple[str, ...] = ()  # the Allow statements that granted it


def decide(
    request: Request,
    identity: list[Policy],
    *,
    resource_policy: Policy | None = None,
    key_policy: Policy | None = None,
) -> Decision:
    """IAM's answer for one request: an explicit Deny anywhere wins. A KMS key's own policy must allow, naming
    the caller or delegating to its account's IAM policies. Elsewhere, within one account, the identity policy
    or a resource policy naming the caller is enough; from another account both must allow."""

    def allows(policy: Policy, *, with_principal: bool) -> tuple[list[str], str | None]:
        labels, how = [], None
        for label, statement in policy.statements:
            if statement["Effect"] != "Allow" or not statement_matches(statement, request):
                continue
            kind = _principal_matches(statement, request.principal) if with_principal else "direct"
            if kind is not None:
                labels.append(label)
                how = "direct" if kind == "direct" or how == "direct" else "account"
        return labels, how

    for policy, with_principal in [(p, False) for p in identity] + [
        (p, True) for p in (resource_policy, key_policy) if p is not None
    ]:
        for label, statement in policy.statements:
            named = (  # a Deny with NotPrincipal is never read as sparing the caller: it applies
                not with_principal or "NotPrincipal" in statement or _principal_matches(statement, request.principal)
            )
            if statement["Effect"] == "Deny" and named and statement_matches(statement, request):
                return Decision(False, f"explicitly denied by {label}")
    granted = [label for policy in identity for label in allows(policy, with_principal=False)[0]]
    if key_policy is not None:
        labels, how = allows(key_policy, with_principal=True)
        key_account = request.resource_account or request.account
        if key_account != request.account:  # "Neither the key policy nor the IAM policy alone is sufficient"
            if how is not None and granted:
                return Decision(True, "the key policy names the caller (or its account) and its IAM allows it",
                                tuple(labels + granted))  # fmt: skip
            return Decision(
                False, f"a key in account {key_account} needs its key policy and the caller's IAM to allow it"
            )
        if how == "direct":
            return Decision(True, "the key policy names the caller", tuple(labels))
        if how == "account" and granted:
            return Decision(True, "the key policy delegates to IAM, which allows it", tuple(labels + granted))
        if how == "account":
            return Decision(False, f"no identity policy allows {request.action} (the key policy delegates to IAM)")
        return Decision(False, f"the key policy of {request.resource} does not allow {request.action}")
    resource_labels, how = allows(resource_policy, with_principal=True) if resource_policy else ([], None)
    resource_account = request.resource_account
    if resource_account and resource_account != request.account:
        if granted and resource_labels:
            return Decision(True, "both accounts allow it", tuple(granted + resource_labels))
        return Decision(False, f"a call into account {resource_account} needs its resource policy and IAM to allow it")
    if granted or how == "direct":
        return Decision(True, "allowed", tuple(granted + (resource_labels if how == "direct" else [])))
    return Decision(False, f"no statement allows {request.action} on {request.resource}")


# ---------------------------------------------------------------------------------- the template, resolved
ACCOUNT = "123456789012"  # moto's account, and the deployed stack's in these checks
REGION = "us-east-1"
# AWS managed policies the translated template attaches, as the AWS Managed Policy Reference states them:
# https://docs.aws.amazon.com/aws-managed-policy/latest/reference/AWSLambdaBasicExecutionRole.html
# https://docs.aws.amazon.com/aws-managed-policy/latest/reference/AWSXrayWriteOnlyAccess.html
# https://docs.aws.amazon.com/aws-managed-policy/latest/reference/AWSLambdaSQSQueueExecutionRole.html
AWS_MANAGED: dict[str, dict[str, Any]] = {
    "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole": {
        "Statement": [{"Effect": "Allow", "Action": ["logs:CreateLogGroup", "logs:CreateLogStream",
                                                    "logs:PutLogEvents"], "Resource": "*"}]},
    "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess": {
        "Statement": [{"Effect": "Allow", "Action": ["xray:PutTraceSegments", "xray:PutTelemetryRecords",
                                                    "xray:GetSamplingRules", "xray:GetSamplingTargets",
                                                    "xray:GetSamplingStatisticSummaries"], "Resource": ["*"]}]},
    "arn:aws:iam::aws:policy/service-role/AWSLambdaSQSQueueExecutionRole": {
        "Statement": [{"Effect": "Allow", "Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage",
                                                    "sqs:GetQueueAttributes", "logs:CreateLogGroup",
                                                    "logs:CreateLogStream", "logs:PutLogEvents"], "Resource": "*"}]},
}  # fmt: skip


def role_arn(stack: str, function: str) -> str:
    return f"arn:aws:iam::{ACCOUNT}:role/{stack}-{function}Role"


@dataclass(frozen=True)
class Deployment:
    """One deployed configuration: the stack's name, its parameters, and the physical ids of the resources a
    test's world stands in for (the state key secret, the queue, the JWT key)."""

    stack: str = "servicenow-oauth"
    parameters: tuple[tuple[str, str], ...] = ()
    physical: tuple[tuple[str, str], ...] = ()

    def with_parameters(self, **values: str) -> Deployment:
        return Deployment(self.stack, tuple(sorted({**dict(self.parameters), **values}.items())), self.physical)


class Template:
    """The SAM-translated template with its intrinsics resolved for one deployment."""

    def __init__(self, translated: dict[str, Any], deployment: Deployment) -> None:
        self.translated = translated
        self.deployment = deployment
        defaults = {k: str(v.get("Default", "")) for k, v in translated.get("Parameters", {}).items()}
        stack_id = (
            f"arn:aws:cloudformation:{REGION}:{ACCOUNT}:stack/{deployment.stack}/4e8b2c1a-0000-1111-2222-333344445555"
        )
        self.refs: dict[str, str] = {
            **defaults,
            **dict(deployment.parameters),
            "AWS::StackName": deployment.stack,
            "AWS::Region": REGION,
            "AWS::AccountId": ACCOUNT,
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::StackId": stack_id,
        }
        self.physical = dict(deployment.physical)
        for name, value in deployment.parameters:  # CloudFormation refuses a stack whose parameter fails these
            pattern = translated["Parameters"][name].get("AllowedPattern")
            if pattern is not None and re.fullmatch(pattern, value) is None:
                raise ValueError(f"parameter {name}={value!r} fails its AllowedPattern: no deployment has it")
        self._conditions: dict[str, bool] = {}
        self._identities: dict[str, list[Policy]] = {}

    def condition(self, name: str) -> bool:
        if name not in self._conditions:
            self._conditions[name] = bool(self.resolve(self.translated["Conditions"][name]))
        return self._conditions[name]

    def ref(self, name: str) -> str:
        if name in self.refs:
            return self.refs[name]
        if name in self.physical:
            return self.physical[name]
        resource = self.translated["Resources"][name]
        if resource["Type"] == "AWS::IAM::ManagedPolicy":
            return f"arn:aws:iam::{ACCOUNT}:policy/{self.deployment.stack}-{name}"
        if resource["Type"] == "AWS::SecretsManager::Secret":  # Ref is the ARN: the name and AWS's suffix
            return secret_arn(str(self.resolve(resource["Properties"]["Name"])))
        return f"{self.deployment.stack}-{name}"

    def get_att(self, name: str, attribute: str) -> str:
        if f"{name}.{attribute}" in self.physical:
            return self.physical[f"{name}.{attribute}"]
        kind = self.translated["Resources"][name]["Type"]
        if kind == "AWS::IAM::Role" and attribute == "Arn":
            return role_arn(self.deployment.stack, name.removesuffix("Role"))
        if kind == "AWS::SQS::Queue" and attribute in ("Arn", "QueueName"):
            queue = self.physical.get(f"{name}.QueueName", f"{self.deployment.stack}-{name}")
            return queue if attribute == "QueueName" else f"arn:aws:sqs:{REGION}:{ACCOUNT}:{queue}"
        return f"{self.deployment.stack}-{name}.{attribute}"

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            items = [self.resolve(item) for item in value]
            return [item for item in items if item is not _NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            [(key, argument)] = value.items()
            if key == "Ref":
                return _NO_VALUE if argument == "AWS::NoValue" else self.ref(argument)
            if key == "Fn::GetAtt":
                name, attribute = argument if isinstance(argument, list) else argument.split(".", 1)
                return self.get_att(name, attribute)
            if key == "Fn::Sub":
                text, local = (argument, {}) if isinstance(argument, str) else argument
                known = {k: self.resolve(v) for k, v in local.items()}

                def substitute(match: re.Match[str]) -> str:
                    name = match.group(1)
                    if name in known:
                        return str(known[name])
                    if "." in name and name not in self.refs:
                        return self.get_att(*name.split(".", 1))
                    return self.ref(name)

                return re.sub(r"\$\{([^}!]+)\}", substitute, text)
            if key == "Fn::Join":
                delimiter, items = argument
                return delimiter.join(str(item) for item in self.resolve(items))
            if key == "Fn::Split":
                delimiter, text = argument
                return str(self.resolve(text)).split(delimiter)
            if key == "Fn::Select":
                index, items = argument
                return self.resolve(items)[int(self.resolve(index))]
            if key == "Fn::If":
                name, yes, no = argument
                return self.resolve(yes if self.condition(name) else no)
            if key == "Fn::Equals":
                left, right = (self.resolve(side) for side in argument)
                return str(left) == str(right)
            if key == "Fn::Not":
                return not self.resolve(argument[0])
            if key == "Fn::And":
                return all(self.resolve(item) for item in argument)
            if key == "Fn::Or":
                return any(self.resolve(item) for item in argument)
            if key == "Condition":
                return self.condition(argument)
            if key == "Fn::FindInMap":
                table, first, second = (self.resolve(item) for item in argument)
                return self.translated["Mappings"][table][str(first)][second]
        resolved = {key: self.resolve(item) for key, item in value.items()}
        return {key: item for key, item in resolved.items() if item is not _NO_VALUE}

    def identity(self, function: str) -> list[Policy]:
        """The role's policies: inline, the stack's managed policies it references, and AWS managed ones."""
        if function not in self._identities:
            self._identities[function] = self._identity(function)
        return self._identities[function]

    def _identity(self, function: str) -> list[Policy]:
        role = self.resolve(self.translated["Resources"][f"{function}Role"]["Properties"])
        policies = [
            Policy.of(f"{function}Role/{p['PolicyName']}", p["PolicyDocument"]) for p in role.get("Policies", [])
        ]
        for arn in role.get("ManagedPolicyArns", []):
            if arn in AWS_MANAGED:
                policies.append(Policy.of(arn.rsplit("/", 1)[1], AWS_MANAGED[arn]))
                continue
            logical = arn.rsplit("/", 1)[1].removeprefix(f"{self.deployment.stack}-")
            resource = self.translated["Resources"][logical]
            if "Condition" in resource and not self.condition(resource["Condition"]):
                raise AssertionError(f"{function}Role references {logical}, which this deployment does not create")
            policies.append(Policy.of(logical, self.resolve(resource["Properties"]["PolicyDocument"])))
        return policies

    def key_policy(self, logical: str) -> Policy | None:
        resource = self.translated["Resources"].get(logical)
        if resource is None or ("Condition" in resource and not self.condition(resource["Condition"])):
            return None
        return Policy.of(logical, self.resolve(resource["Properties"]["KeyPolicy"]))


class _NoValue:
    def __repr__(self) -> str:
        return "AWS::NoValue"


_NO_VALUE: Any = _NoValue()


def secret_arn(secret_id: str, region: str = REGION) -> str:
    """A name stands for the ARN IAM evaluates: AWS adds a 6-character suffix to every secret's name."""
    if secret_id.startswith("arn:"):
        return secret_id
    return f"arn:aws:secretsmanager:{region}:{ACCOUNT}:secret:{secret_id}-AbCdEf"
