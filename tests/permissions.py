"""Every AWS call the code makes, recorded and attributed to the function (or the operator's CLI) that made it.

moto accepts any call whatever IAM says; this records each one with what IAM would read from it, so that
tests/test_permissions.py can evaluate it against the role the SAM-translated template gives that function.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from botocore.client import BaseClient

ROOT = Path(__file__).resolve().parent.parent
HANDLERS = {
    "callback": "CallbackFunction",
    "refresh": "RefreshFunction",
    "worker": "WorkerFunction",
    "rotation": "RotationFunction",
    "dashboard": "DashboardFunction",
}
OPERATOR = "operator"
CONSUMER = "consumer"
SETUP = "setup"  # a test or a dev script arranging its world: not the code under test
CORE = "core"  # core code a test called directly, with no handler or CLI above it

_ACTOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("aws_actor", default=None)
_INSIDE = threading.local()


@dataclass
class Recorded:
    actor: str
    service: str
    operation: str
    params: dict[str, Any]
    region: str
    response: dict[str, Any] | None = None
    error: str | None = None
    where: str = ""  # the innermost frame of our own code that made the call
    environment: tuple[tuple[str, str], ...] = ()  # the functions' settings when it was made (ENVIRONMENT)
    authorizations: list[Authorization] = field(default_factory=list)
    key_policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    resource_policies: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Recorder:
    calls: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    lookup: Lookup = field(default_factory=lambda: Lookup())

    def observe(self, call: Recorded, endpoint: str) -> None:
        """What IAM would read from the call, looked up now, while its world (moto) is still there."""
        if call.service == "secretsmanager" and call.operation in FORGETTING:
            self.lookup.forget_secrets()
        if call.service == "kms" and call.operation in ("PutKeyPolicy", "CreateAlias", "UpdateAlias", "DeleteAlias"):
            self.lookup.cache = {k: v for k, v in self.lookup.cache.items() if k[0] != "key"}
        if call.actor != SETUP:
            with unrecorded():
                self._describe(call, endpoint)
        with self.lock:
            self.calls.append(call)

    def _describe(self, call: Recorded, endpoint: str) -> None:
        region = call.region or REGION
        environment = {name: os.environ[name] for name in ENVIRONMENT if os.environ.get(name)}
        if "STATE_KEY_SECRET_ID" in environment:
            environment["STATE_KEY_SECRET_ID_ARN"] = self.lookup.secret(
                endpoint, region, environment["STATE_KEY_SECRET_ID"]
            )[0]
        call.environment = tuple(sorted(environment.items()))
        call.authorizations = authorizations(call, endpoint, self.lookup)
        if call.service == "appflow":
            name = call.params.get("connectorProfileName", "")
            secret = f"arn:aws:secretsmanager:{region}:{ACCOUNT}:secret:appflow!{ACCOUNT}-{name}-AbCdEf"
            via = _ctx(**{"aws:CalledVia": "appflow.amazonaws.com"})
            call.authorizations.append(
                Authorization("secretsmanager:PutSecretValue", secret, via, secret=secret, modelled=APPFLOW_CREDENTIALS)
            )
        for authorization in call.authorizations:
            if authorization.key and not authorization.key.endswith(AWS_MANAGED_SECRETS_KEY):
                parts = authorization.key.split(":")  # a replica's key is in the replica's region
                policy = self.lookup.key(endpoint, parts[3] if len(parts) > 5 else region, authorization.key)[1]
                if policy is not None:
                    call.key_policies[authorization.key] = policy
            if authorization.secret and authorization.secret not in call.resource_policies:
                policy = self.lookup.resource_policy(endpoint, region, authorization.secret)
                if policy is not None:
                    call.resource_policies[authorization.secret] = policy

    def take(self) -> list[Recorded]:
        with self.lock:
            taken, self.calls = self.calls, []
        return taken


@functools.cache
def _ours(filename: str) -> Path | None:
    """The file's path in this repository, if it is our code (not a library in .venv)."""
    try:
        relative = Path(filename).resolve().relative_to(ROOT)
    except ValueError:
        return None
    return relative if relative.parts[0] in ("src", "admin", "tests", "local", "benchmarks") else None


def actor_of(frame: Any) -> tuple[str, str]:
    """(who, where). A call made by test code (a hook, a setup step) is the test's, whatever runs above it.
    Else the innermost handler on the stack decides; else a declared actor (a pool thread inherits its
    submitter's, the explorer names its writers); else the CLI, the consumer helper, or the core entry point
    a test called directly (ENTRY_POINTS)."""
    where, entry, innermost, has_admin, has_consumer = "", "", None, False, False
    while frame is not None:
        relative = _ours(frame.f_code.co_filename)
        if relative is None:
            frame = frame.f_back
            continue
        top = relative.parts[0]
        innermost = innermost or top
        if top in ("src", "admin") and not where:
            where = f"{relative}:{frame.f_lineno}"
        if relative.parts[:2] == ("src", "handlers") and relative.stem in HANDLERS and innermost == "src":
            return HANDLERS[relative.stem], where
        has_admin = has_admin or top == "admin"
        has_consumer = has_consumer or relative.parts[1:] == ("core", "consumer.py")
        if relative.parts[:2] == ("src", "core"):
            entry = f"{Path(*relative.parts[1:])}:{frame.f_code.co_qualname}"
        frame = frame.f_back
    if innermost not in ("src", "admin"):
        return SETUP, where
    inherited = _ACTOR.get()
    if inherited is not None:
        return inherited, where
    if has_admin:
        return OPERATOR, where
    if has_consumer:
        return CONSUMER, where
    module, _, qualname = entry.partition(":")
    for key in (entry, f"{module}:{qualname.split('.')[0]}", module):
        if key in ENTRY_POINTS:
            return ENTRY_POINTS[key], where
    return f"{CORE}:{entry}", where


def _recording_call(original: Callable[..., Any]) -> Callable[..., Any]:
    def call(self: BaseClient, operation_name: str, api_params: dict[str, Any]) -> Any:
        if getattr(_INSIDE, "active", False):
            return original(self, operation_name, api_params)
        who, where = actor_of(sys._getframe(1))
        record = Recorded(
            who, self.meta.service_model.service_name, operation_name, dict(api_params), self.meta.region_name,
            where=where,
        )  # fmt: skip
        try:
            record.response = original(self, operation_name, api_params)
        except Exception as error:
            record.error = type(error).__name__
            raise
        finally:
            RECORDER.observe(record, self.meta.endpoint_url)
        return record.response

    return call


def _propagating_submit(original: Callable[..., Any]) -> Callable[..., Any]:
    """A pool thread has no handler on its stack: it runs as whoever submitted the work."""

    def submit(self: ThreadPoolExecutor, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        who, _ = actor_of(sys._getframe(1))

        def run() -> Any:
            token = _ACTOR.set(who)
            try:
                return fn(*args, **kwargs)
            finally:
                _ACTOR.reset(token)

        return original(self, run)

    return submit


def install() -> None:
    if getattr(BaseClient, "_permissions_recording", False):
        return
    BaseClient._make_api_call = _recording_call(BaseClient._make_api_call)  # type: ignore[method-assign]
    ThreadPoolExecutor.submit = _propagating_submit(ThreadPoolExecutor.submit)  # type: ignore[method-assign]
    BaseClient._permissions_recording = True  # type: ignore[attr-defined]


@contextlib.contextmanager
def unrecorded() -> Iterator[None]:
    """The checker's own look-ups (a secret's key, a key's policy) are not calls of the code under test."""
    previous = getattr(_INSIDE, "active", False)
    _INSIDE.active = True
    try:
        yield
    finally:
        _INSIDE.active = previous


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
        key_account = request.resource.split(":")[4] if request.resource.count(":") >= 5 else request.account
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
    resource_account = request.resource.split(":")[4] if request.resource.count(":") >= 5 else ""
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


# ------------------------------------------------------------------------ what IAM reads from each call
# A test that calls core code directly is checked as the function that runs that code in production; where two
# functions run it, as the one with the fewer rights (the worker's role is the sweep's less discovery and SQS).
ENTRY_POINTS: dict[str, str] = {
    "core/sweep.py": "RefreshFunction",
    "core/fanout.py:send_connections": "RefreshFunction",
    "core/refresh.py": "WorkerFunction",
    "core/appflow.py": "WorkerFunction",
    "core/monitor.py": "WorkerFunction",
    "core/rotation.py": "RotationFunction",
    "core/consent.py": "CallbackFunction",
    "core/store.py:ConnectionStore.create": OPERATOR,
    "core/store.py": "WorkerFunction",
    "core/revoke.py": OPERATOR,
    "core/dashboard.py": "DashboardFunction",
    "core/jwt_bearer.py": "WorkerFunction",
}
# What the explorer's writers (tests/explorer.py) stand for.
WRITERS = {
    "sweep": "RefreshFunction",
    "worker": "WorkerFunction",
    "rotation": "RotationFunction",
    "callback": "CallbackFunction",
}


@contextlib.contextmanager
def acting_as(actor: str) -> Iterator[None]:
    """Calls made in this block are the named function's (or the operator's), as in production."""
    token = _ACTOR.set(actor)
    try:
        yield
    finally:
        _ACTOR.reset(token)


def secret_arn(secret_id: str, region: str = REGION) -> str:
    """A name stands for the ARN IAM evaluates: AWS adds a 6-character suffix to every secret's name."""
    if secret_id.startswith("arn:"):
        return secret_id
    return f"arn:aws:secretsmanager:{region}:{ACCOUNT}:secret:{secret_id}-AbCdEf"


@dataclass(frozen=True)
class Authorization:
    """One authorization a call needs: recorded (the call itself) or modelled (what AWS does on the caller's
    behalf with the caller's rights, each citing the AWS page that says so)."""

    action: str
    resource: str
    context: tuple[tuple[str, str], ...] = ()
    key: str | None = None  # a KMS key's ARN: its key policy applies
    secret: str | None = None  # a secret's ARN: its resource policy applies
    modelled: str = ""  # the documentation reference of a modelled authorization


AWS_MANAGED_SECRETS_KEY = "alias/aws/secretsmanager"  # in a key ARN: arn:aws:kms:<region>:<account>:alias/aws/...


# https://docs.aws.amazon.com/secretsmanager/latest/userguide/security-encryption.html ("Key policy of the AWS
# managed key (aws/secretsmanager)"): any principal of the account that Secrets Manager acts for may use it.
def aws_managed_secrets_key_policy(region: str) -> dict[str, Any]:
    return {"Statement": [{
        "Sid": "Allow access through AWS Secrets Manager for all principals in the account that are authorized to use "
        "AWS Secrets Manager",
        "Effect": "Allow", "Principal": {"AWS": "*"},
        "Action": ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:CreateGrant", "kms:DescribeKey",
                   "kms:GenerateDataKey*"],
        "Resource": "*",
        "Condition": {"StringEquals": {"kms:CallerAccount": ACCOUNT,
                                       "kms:ViaService": f"secretsmanager.{region}.amazonaws.com"}},
    }]}  # fmt: skip


SECRETS_MANAGER_KMS = "https://docs.aws.amazon.com/secretsmanager/latest/userguide/security-encryption.html"
CREATE_SECRET = "https://docs.aws.amazon.com/secretsmanager/latest/apireference/API_CreateSecret.html"
REPLICATE = "https://docs.aws.amazon.com/secretsmanager/latest/apireference/API_ReplicateSecretToRegions.html"
BATCH_GET = "https://docs.aws.amazon.com/secretsmanager/latest/apireference/API_BatchGetSecretValue.html"
SQS_BATCH = (
    "https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/sqs-api-permissions-reference.html"
)
NO_PERMISSION = {
    ("sts", "GetCallerIdentity")
}  # https://docs.aws.amazon.com/STS/latest/APIReference/API_GetCallerIdentity.html
# Writes that carry a secret value: Secrets Manager asks KMS for a data key to encrypt it.
VALUE_WRITES = {"PutSecretValue", "CreateSecret", "UpdateSecret"}
# AppFlow keeps a connector profile's credentials in its own secret (appflow!<account>-<profile>-...) and writes
# it with the caller's rights (https://docs.aws.amazon.com/appflow/latest/userguide/data-protection.html
# #connection-credentials, which names CreateSecret for a new profile; which write an update makes is not
# documented: PutSecretValue is assumed, the README says so).
APPFLOW_CREDENTIALS = "https://docs.aws.amazon.com/appflow/latest/userguide/data-protection.html#connection-credentials"
FORGETTING = {"CreateSecret", "DeleteSecret", "UpdateSecret", "PutResourcePolicy", "DeleteResourcePolicy",
              "ReplicateSecretToRegions", "RemoveRegionsFromReplication", "RestoreSecret"}  # fmt: skip
SECRET_FREE = {"ListSecrets", "BatchGetSecretValue", "ValidateResourcePolicy"}


def _ctx(**values: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(values.items()))


class Lookup:
    """The checker's own reads of the world (a secret's key, a key's ARN and policy), made unrecorded on the
    same endpoint as the call, and cached for the length of one test."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, ...], Any] = {}

    def _client(self, endpoint: str, service: str, region: str) -> Any:
        key = ("client", endpoint, service, region)
        if key not in self.cache:
            import boto3

            self.cache[key] = boto3.session.Session().client(service, endpoint_url=endpoint, region_name=region)
        return self.cache[key]

    def secret(self, endpoint: str, region: str, secret_id: str) -> tuple[str, str | None]:
        """(ARN, KMS key ARN or None for aws/secretsmanager)."""
        key = ("secret", endpoint, region, secret_id)
        if key not in self.cache:
            with unrecorded():
                try:
                    described = self._client(endpoint, "secretsmanager", region).describe_secret(SecretId=secret_id)
                except Exception:
                    self.cache[key] = (secret_arn(secret_id, region), None)
                else:
                    kms = described.get("KmsKeyId")
                    self.cache[key] = (described["ARN"], self.key(endpoint, region, kms)[0] if kms else None)
        return self.cache[key]  # type: ignore[no-any-return]

    def key(self, endpoint: str, region: str, key_id: str) -> tuple[str, dict[str, Any] | None]:
        """(key ARN, key policy)."""
        cache_key = ("key", endpoint, region, key_id)
        if cache_key not in self.cache:
            with unrecorded():
                kms = self._client(endpoint, "kms", region)
                try:
                    arn = kms.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"]
                    policy = json.loads(kms.get_key_policy(KeyId=arn, PolicyName="default")["Policy"])
                except Exception:
                    return key_id, None
            self.cache[cache_key] = (arn, policy)
        return self.cache[cache_key]  # type: ignore[no-any-return]

    def resource_policy(self, endpoint: str, region: str, arn: str) -> dict[str, Any] | None:
        key = ("policy", endpoint, region, arn)
        if key not in self.cache:
            with unrecorded():
                try:
                    text = self._client(endpoint, "secretsmanager", region).get_resource_policy(SecretId=arn)
                except Exception:
                    text = {}
            self.cache[key] = json.loads(text["ResourcePolicy"]) if text.get("ResourcePolicy") else None
        return self.cache[key]  # type: ignore[no-any-return]

    def forget_secrets(self) -> None:
        self.cache = {k: v for k, v in self.cache.items() if k[0] not in ("secret", "policy")}


def authorizations(call: Recorded, endpoint: str, lookup: Lookup) -> list[Authorization]:
    """What IAM authorizes for one call, with the request context its conditions read."""
    service, operation, params, region = call.service, call.operation, call.params, call.region or REGION
    if (service, operation) in NO_PERMISSION:
        return []
    action = f"{service}:{operation}"
    if service == "secretsmanager":
        if operation in SECRET_FREE and not params.get("SecretId"):
            found = [Authorization(action, "*")]
            if operation == "BatchGetSecretValue":
                for value in (call.response or {}).get("SecretValues", []):
                    arn, key = lookup.secret(endpoint, region, value["ARN"])
                    found += [Authorization("secretsmanager:GetSecretValue", arn, secret=arn, modelled=BATCH_GET)]
                    found += [_decrypt(arn, key, region)]
            return found
        secret_id = params.get("SecretId") or params.get("Name") or ""
        arn, key = lookup.secret(endpoint, region, secret_id)
        if operation == "CreateSecret" and params.get("KmsKeyId"):
            key = lookup.key(endpoint, region, params["KmsKeyId"])[0]
        found = [Authorization(action, arn, _ctx(**{"secretsmanager:SecretId": arn}), secret=arn)]
        if call.error is None and operation == "GetSecretValue":
            found.append(_decrypt(arn, key, region))
        if operation in VALUE_WRITES and (params.get("SecretString") or params.get("SecretBinary")):
            found.append(_decrypt(arn, key, region, "kms:GenerateDataKey"))
        if operation == "CreateSecret" and params.get("Tags"):  # "you also need secretsmanager:TagResource"
            found.append(Authorization("secretsmanager:TagResource", arn, secret=arn, modelled=CREATE_SECRET))
        replicas = params.get("AddReplicaRegions") or []
        if replicas and operation == "CreateSecret":  # "you must also have secretsmanager:ReplicateSecretToRegions"
            found.append(
                Authorization("secretsmanager:ReplicateSecretToRegions", arn, secret=arn, modelled=CREATE_SECRET)
            )
        for replica in replicas:  # the primary's value decrypted, then encrypted on the replica's key in its region
            other = replica["Region"]
            replica_arn = arn.replace(f":{region}:", f":{other}:", 1)
            replica_key = lookup.key(endpoint, other, replica["KmsKeyId"])[0] if replica.get("KmsKeyId") else None
            found += [replace(_decrypt(arn, key, region), modelled=REPLICATE)]
            found += [replace(_decrypt(replica_arn, replica_key, other, kms), modelled=REPLICATE)
                      for kms in ("kms:GenerateDataKey", "kms:Encrypt")]  # fmt: skip
        return found
    if service == "kms":
        arn, policy = lookup.key(endpoint, region, params.get("KeyId", "*"))
        if policy is None and call.error is not None:
            return []  # no such key (an alias not yet made): AWS answers NotFoundException, nothing to authorize
        context = _ctx(**{"kms:SigningAlgorithm": params["SigningAlgorithm"]}) if "SigningAlgorithm" in params else ()
        return [Authorization(action, arn, context, key=arn)]
    if service == "events" and operation == "PutEvents":
        return [
            Authorization(
                action,
                f"arn:aws:events:{region}:{ACCOUNT}:event-bus/{entry.get('EventBusName') or 'default'}",
                _ctx(**{"events:source": entry.get("Source", ""), "events:detail-type": entry.get("DetailType", "")}),
            )
            for entry in params.get("Entries", [])
        ]
    if service == "sqs":
        queue = params.get("QueueUrl", "").rstrip("/").rsplit("/", 1)[-1]
        batch = operation.endswith("Batch")
        return [
            Authorization(
                f"sqs:{operation.removesuffix('Batch')}",
                f"arn:aws:sqs:{region}:{ACCOUNT}:{queue}",
                modelled=SQS_BATCH if batch else "",
            )
        ]
    if service == "appflow":
        name = params.get("connectorProfileName", "")
        return [Authorization(action, f"arn:aws:appflow:{region}:{ACCOUNT}:connectorprofile/{name}")]
    return [Authorization(ACTIONS.get(action, action), _resource_of(service, params, region))]


# API operations whose IAM action has another name (the Service Authorization Reference's "Actions" tables).
ACTIONS = {"lambda:Invoke": "lambda:InvokeFunction"}


def _resource_of(service: str, params: dict[str, Any], region: str) -> str:
    """The ARN of the resource a call acts on, as the Service Authorization Reference names it ("*" for none)."""
    arn = f"{region}:{ACCOUNT}"
    if service == "cloudformation" and params.get("StackName"):
        name = params["StackName"]
        return name if name.startswith("arn:") else f"arn:aws:cloudformation:{arn}:stack/{name}/4e8b2c1a-0000"
    if service == "cloudwatch" and params.get("AlarmName"):
        return f"arn:aws:cloudwatch:{arn}:alarm:{params['AlarmName']}"
    if service == "lambda" and params.get("FunctionName"):
        name = params["FunctionName"]
        return name if name.startswith("arn:") else f"arn:aws:lambda:{arn}:function:{name}"
    if service == "sns" and params.get("TopicArn"):
        return str(params["TopicArn"])
    return "*"


def _decrypt(arn: str, key: str | None, region: str, action: str = "kms:Decrypt") -> Authorization:
    """Secrets Manager calls KMS with the caller's rights, through itself and naming the secret
    (SECRETS_MANAGER_KMS: "Secrets Manager uses the following encryption context ... SecretARN")."""
    context = _ctx(
        **{
            "kms:ViaService": f"secretsmanager.{region}.amazonaws.com",
            "kms:EncryptionContext:SecretARN": arn,
            "kms:CallerAccount": ACCOUNT,
        }
    )
    key = key or f"arn:aws:kms:{region}:{ACCOUNT}:{AWS_MANAGED_SECRETS_KEY}"
    return Authorization(action, key, context, key=key, modelled=SECRETS_MANAGER_KMS)


# ------------------------------------------------------------------------------------------------ the checker
DOCS = ROOT / "docs"
# Where the code under test does not say, the deployment the tests' worlds stand for: the queue they create as
# the stack's RefreshQueue, and the AppFlow profiles they name as its AppFlowConnectorProfiles (a push to any
# other profile is denied, as in AWS).
TEST_QUEUE = "refresh"
TEST_PROFILES = "snow-prod,snow-backup,model-profile"
DOCS_ACCOUNT = "111122223333"  # the example account docs/consumer-policies name
OPERATOR_ARN = f"arn:aws:iam::{ACCOUNT}:role/servicenow-oauth-operator"
CONSUMER_ARN = f"arn:aws:iam::{ACCOUNT}:role/erp-reader"
ENVIRONMENT = ("CONNECTION_SECRET_PREFIX", "STATE_KEY_SECRET_ID", "EVENT_SOURCE", "REFRESH_QUEUE_URL")


@dataclass(frozen=True)
class Verdict:
    actor: str
    operation: str
    authorization: Authorization
    decision: Decision
    deployment: Deployment
    where: str

    def __str__(self) -> str:
        modelled = f" (made by AWS on its behalf: {self.authorization.modelled})" if self.authorization.modelled else ""
        return (
            f"{self.actor} called {self.operation} at {self.where or '?'}: {self.authorization.action} on "
            f"{self.authorization.resource}{modelled} is denied: {self.decision.reason}"
        )


class Checker:
    """Each recorded authorization, evaluated against the role of the function that made it in the deployment
    its test's world stands for (or the operator's and consumers' policies in docs/)."""

    def __init__(self, translated: dict[str, Any], *, operator_policy: dict[str, Any] | None = None,
                 consumer_policy: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.translated = translated
        self.operator = Policy.of(
            "operator-policy", operator_policy or json.loads((DOCS / "operator-policy.json").read_text())
        )
        self.consumer_policy = consumer_policy
        self._templates: dict[Deployment, Template] = {}

    def template(self, deployment: Deployment) -> Template:
        if deployment not in self._templates:
            self._templates[deployment] = Template(self.translated, deployment)
        return self._templates[deployment]

    def deployments(self, call: Recorded, authorization: Authorization) -> list[Deployment]:
        """The configurations the call must be allowed in: the world's settings as the template would set them;
        a signing key both as the stack's own (JwtSigningKey=create) and as an existing one (its ARN)."""
        env = dict(call.environment)
        source = env.get("EVENT_SOURCE", "")
        stack = (
            source.removeprefix("servicenow-oauth.") if source.startswith("servicenow-oauth.") else "servicenow-oauth"
        )
        physical = {}
        if env.get("STATE_KEY_SECRET_ID"):
            physical["StateKeySecret"] = env["STATE_KEY_SECRET_ID_ARN"]
        # The queue the sweep sends to is the stack's RefreshQueue (REFRESH_QUEUE_URL: !Ref RefreshQueue); a test
        # that hands the URL to the code directly rather than through the environment uses TEST_QUEUE.
        queue = env.get("REFRESH_QUEUE_URL") or f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/{TEST_QUEUE}"
        physical["RefreshQueue"] = queue
        physical["RefreshQueue.QueueName"] = queue.rstrip("/").rsplit("/", 1)[-1]
        base = Deployment(stack, physical=tuple(sorted(physical.items()))).with_parameters(
            ConnectionSecretPrefix=env.get("CONNECTION_SECRET_PREFIX") or "servicenow-oauth/"
        )
        if call.service == "appflow" or "appflow!" in authorization.resource:
            base = base.with_parameters(AppFlowConnectorProfiles=TEST_PROFILES)
        if authorization.action in ("kms:Sign", "kms:GetPublicKey"):  # only ever on a JWT signing key
            issuer = {"JwtCertificateIssuerArn": OPERATOR_ARN} if call.actor == OPERATOR else {}
            own = Deployment(
                base.stack, base.parameters, (*base.physical, ("JwtSigningKmsKey.Arn", authorization.resource))
            )
            return [base.with_parameters(JwtSigningKey=authorization.resource),
                    own.with_parameters(JwtSigningKey="create", **issuer)]  # fmt: skip
        return [base]

    def consumer(self, region: str) -> Policy:
        """The README's policy for a reader in this account (the replica's, in another region), with the
        documentation's example account replaced by this one."""
        if self.consumer_policy is not None:
            return Policy.of("consumer", self.consumer_policy)
        snippet = "same-account.json" if region == REGION else "replica-region.json"
        text = (DOCS / "consumer-policies" / snippet).read_text().replace(DOCS_ACCOUNT, ACCOUNT)
        return Policy.of(snippet.removesuffix(".json"), json.loads(text))

    def identity(self, actor: str, template: Template, region: str = REGION) -> tuple[str, list[Policy]]:
        if actor == OPERATOR:
            return OPERATOR_ARN, [self.operator]
        if actor == CONSUMER:
            return CONSUMER_ARN, [self.consumer(region)]
        if actor in HANDLERS.values():
            return role_arn(template.deployment.stack, actor), template.identity(actor)
        raise AssertionError(f"no role for {actor!r}: name the function that runs this code (ENTRY_POINTS)")

    def key_policy(self, call: Recorded, authorization: Authorization, template: Template) -> Policy | None:
        key = authorization.key
        if key is not None and key.endswith(AWS_MANAGED_SECRETS_KEY):
            return Policy.of("aws/secretsmanager", aws_managed_secrets_key_policy(key.split(":")[3]))
        if key is not None and dict(template.deployment.physical).get("JwtSigningKmsKey.Arn") == key:
            return template.key_policy("JwtSigningKmsKey")
        document = call.key_policies.get(key or "")
        return Policy.of(f"key {key}", document) if document else Policy.of(f"key {key} (unknown)", {})

    def invocations(self, calls: list[Recorded]) -> list[Recorded]:
        """What Lambda itself did with the role of each function that ran (`invocation`)."""
        ran = sorted({(call.actor, call.environment) for call in calls if call.actor in HANDLERS.values()})
        found = []
        for actor, environment in ran:
            probe = Recorded(actor, "lambda", "(invocation)", {}, REGION, environment=environment)
            found.append(
                invocation(actor, self.template(self.deployments(probe, Authorization("-", "*"))[0]), environment)
            )
        return found

    def verdicts(self, call: Recorded) -> list[Verdict]:
        found = []
        for authorization in call.authorizations:
            for deployment in self.deployments(call, authorization):
                try:
                    template = self.template(deployment)
                except ValueError as error:  # a world no stack can be: nothing in AWS would allow its calls
                    found.append(Verdict(call.actor, f"{call.service}:{call.operation}", authorization,
                                         Decision(False, str(error)), deployment, call.where))  # fmt: skip
                    continue
                principal, identity = self.identity(call.actor, template, call.region or REGION)
                resource_policy = call.resource_policies.get(authorization.secret or "")
                parts = authorization.resource.split(":")
                context = {  # the global keys every request carries
                    "aws:PrincipalArn": principal,
                    "aws:PrincipalAccount": ACCOUNT,
                    "aws:RequestedRegion": call.region or REGION,
                    "aws:ResourceAccount": parts[4] if len(parts) > 5 and parts[4] else ACCOUNT,
                    **dict(authorization.context),
                }
                request = Request(
                    principal, authorization.action, authorization.resource, tuple(sorted(context.items()))
                )
                decision = decide(
                    request,
                    identity,
                    resource_policy=Policy.of(f"secret {authorization.secret}", resource_policy)
                    if resource_policy
                    else None,
                    key_policy=self.key_policy(call, authorization, template) if authorization.key else None,
                )  # fmt: skip
                found.append(Verdict(call.actor, f"{call.service}:{call.operation}", authorization, decision,
                                     deployment, call.where))  # fmt: skip
        return found


RECORDER = Recorder()


@dataclass
class Ledger:
    """What the whole run authorized: which statements were used, which calls were modelled."""

    used: dict[str, int] = field(default_factory=dict)
    modelled: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    actors: dict[str, int] = field(default_factory=dict)
    denied: int = 0

    def add(self, verdicts: list[Verdict]) -> None:
        for verdict in verdicts:
            self.actors[verdict.actor] = self.actors.get(verdict.actor, 0) + 1
            if not verdict.decision.allowed:
                self.denied += 1
            for label in verdict.decision.used:
                self.used[label] = self.used.get(label, 0) + 1
            if verdict.authorization.modelled:
                key = (verdict.authorization.action, verdict.authorization.modelled)
                self.modelled.setdefault(key, set()).add(verdict.actor)


LEDGER = Ledger()


# ------------------------------------------------------- what Lambda does with a function's role, per invocation
LAMBDA_LOGS = "https://docs.aws.amazon.com/lambda/latest/dg/monitoring-cloudwatchlogs.html"
LAMBDA_XRAY = "https://docs.aws.amazon.com/lambda/latest/dg/services-xray.html"
LAMBDA_SQS = "https://docs.aws.amazon.com/lambda/latest/dg/services-sqs-configure.html"


def invocation(actor: str, template: Template, environment: tuple[tuple[str, str], ...]) -> Recorded:
    """The calls Lambda makes with the role of a function that ran: its log lines into its own group, its
    trace segments (Tracing: Active), and for the worker the SQS event source's polling of the queue."""
    function = template.translated["Resources"][actor]["Properties"]
    group = template.resolve(template.translated["Resources"][function["LoggingConfig"]["LogGroup"]["Ref"]])
    name = group["Properties"]["LogGroupName"]
    stream = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{name}:log-stream:2026/12/05/[$LATEST]0f5bd1a5"
    found = [
        Authorization(f"logs:{action}", stream, modelled=LAMBDA_LOGS) for action in ("CreateLogStream", "PutLogEvents")
    ]
    found += [
        Authorization(f"xray:{action}", "*", modelled=LAMBDA_XRAY)
        for action in ("PutTraceSegments", "PutTelemetryRecords")
    ]
    if actor == "WorkerFunction":
        queue = template.get_att("RefreshQueue", "Arn")
        found += [Authorization(f"sqs:{action}", queue, modelled=LAMBDA_SQS)
                  for action in ("ReceiveMessage", "DeleteMessage", "GetQueueAttributes")]  # fmt: skip
    return Recorded(actor, "lambda", "(invocation)", {}, REGION, where="(Lambda)", environment=environment,
                    authorizations=found)  # fmt: skip


# ------------------------------------------------------------------------------ least privilege, measured
# Statements no test's call uses, each with why it stays. The session's end fails on any other unused one.
UNUSED_BECAUSE: dict[str, str] = {}


def statement_table(checker: Checker, used: dict[str, int]) -> tuple[str, list[str]]:
    """(a Markdown table of used/total statements per role, the unused statements nobody explained)."""
    full = Deployment().with_parameters(
        JwtSigningKey=f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        AppFlowConnectorProfiles="snow-prod",
    )
    template = checker.template(full)
    created = checker.template(full.with_parameters(JwtSigningKey="create", JwtCertificateIssuerArn=OPERATOR_ARN))
    rows: list[tuple[str, list[str]]] = [
        (f"{actor}Role", [label for policy in template.identity(actor) for label, _ in policy.statements])
        for actor in HANDLERS.values()
    ]
    rows.append(("operator (docs/operator-policy.json)", [label for label, _ in checker.operator.statements]))
    key = created.key_policy("JwtSigningKmsKey")
    assert key is not None
    rows.append(("JwtSigningKmsKey's key policy", [label for label, _ in key.statements]))
    lines = ["| role or policy | statements used by a test | unused, and why |", "|---|---|---|"]
    unexplained = []
    for name, labels in rows:
        unused = [label for label in labels if not used.get(label)]
        unexplained += [label for label in unused if label not in UNUSED_BECAUSE]
        why = "; ".join(f"`{label}`: {UNUSED_BECAUSE.get(label, 'UNEXPLAINED')}" for label in unused) or "-"
        lines.append(f"| {name} | {len(labels) - len(unused)} of {len(labels)} | {why} |")
    return "\n".join(lines) + "\n", unexplained


def modelled_table(modelled: dict[tuple[str, str], set[str]]) -> str:
    """The authorizations AWS makes on a caller's behalf, modelled from its documentation (moto makes none)."""
    lines = ["| modelled authorization | made for | AWS documentation |", "|---|---|---|"]
    lines += [f"| `{action}` | {', '.join(sorted(who))} | {page} |" for (action, page), who in sorted(modelled.items())]
    return "\n".join(lines) + "\n"
