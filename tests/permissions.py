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
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from botocore.client import BaseClient
from iam import (
    ACCOUNT,
    REGION,
    Decision,
    Deployment,
    Policy,
    Request,
    Template,
    _like,
    _listed,
    decide,
    role_arn,
    secret_arn,
)

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
            self.lookup.forget("secret", "policy")
        if call.service == "kms" and call.operation in ("PutKeyPolicy", "CreateAlias", "UpdateAlias", "DeleteAlias"):
            self.lookup.forget("key")
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

    def give_back(self, calls: list[Recorded]) -> None:
        """Calls a test took to look at, returned so that conftest's check still sees them."""
        with self.lock:
            self.calls.extend(calls)


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
    "core/jwks.py": "CallbackFunction",
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
SQS_BATCH = "https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/sqs-batch-api.html"
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
                except Exception:  # deleted since, or never there: the name's ARN, the AWS managed key
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
                except Exception:  # not there (yet): asked again next time
                    return key_id, None
            self.cache[cache_key] = (arn, policy)
        return self.cache[cache_key]  # type: ignore[no-any-return]

    def resource_policy(self, endpoint: str, region: str, arn: str) -> dict[str, Any] | None:
        key = ("policy", endpoint, region, arn)
        if key not in self.cache:
            with unrecorded():
                try:
                    text = self._client(endpoint, "secretsmanager", region).get_resource_policy(SecretId=arn)
                except Exception:  # no such secret: no policy
                    text = {}
            self.cache[key] = json.loads(text["ResourcePolicy"]) if text.get("ResourcePolicy") else None
        return self.cache[key]  # type: ignore[no-any-return]

    def forget(self, *kinds: str) -> None:
        """After a call that changes what these look-ups answer (a secret created, a key's alias moved)."""
        self.cache = {k: v for k, v in self.cache.items() if k[0] not in kinds}


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
        secret = secret_arn(f"appflow!{ACCOUNT}-{name}", region)  # AppFlow's own, written with the caller's rights
        via = _ctx(**{"aws:CalledVia": "appflow.amazonaws.com"})
        return [
            Authorization(action, f"arn:aws:appflow:{region}:{ACCOUNT}:connectorprofile/{name}"),
            Authorization("secretsmanager:PutSecretValue", secret, via, secret=secret, modelled=APPFLOW_CREDENTIALS),
        ]
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
                request = Request(principal, authorization.action, authorization.resource)
                context = {  # the global keys every request carries
                    "aws:PrincipalArn": principal,
                    "aws:PrincipalAccount": ACCOUNT,
                    "aws:RequestedRegion": call.region or REGION,
                    "aws:ResourceAccount": request.resource_account or ACCOUNT,
                    **dict(authorization.context),
                }
                request = replace(request, context=tuple(sorted(context.items())))
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

    used: dict[str, dict[str, set[str]]] = field(default_factory=dict)  # actor -> statement label -> actions granted
    modelled: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    actors: dict[str, int] = field(default_factory=dict)
    denied: int = 0

    def add(self, verdicts: list[Verdict]) -> None:
        for verdict in verdicts:
            self.actors[verdict.actor] = self.actors.get(verdict.actor, 0) + 1
            if not verdict.decision.allowed:
                self.denied += 1
            for label in verdict.decision.used:
                self.used.setdefault(verdict.actor, {}).setdefault(label, set()).add(verdict.authorization.action)
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
# A statement's label explains all of its actions; "label action" one of them.
_MANAGED_AS_A_WHOLE = "an AWS managed policy SAM attaches whole"
UNUSED_BECAUSE: dict[str, str] = {
    "AWSLambdaBasicExecutionRole/#0 logs:CreateLogGroup": f"{_MANAGED_AS_A_WHOLE}; Lambda creates a group only when "
    "it is missing, and the stack makes each function's group first",
    "AWSLambdaSQSQueueExecutionRole/#0 logs:CreateLogGroup": f"{_MANAGED_AS_A_WHOLE} (the SQS event source's)",
    "AWSXrayWriteOnlyAccess/#0 xray:GetSamplingRules": f"{_MANAGED_AS_A_WHOLE} for `Tracing: Active`; sampling rules "
    "are for the X-Ray SDK, and Lambda samples for the functions",
    "AWSXrayWriteOnlyAccess/#0 xray:GetSamplingTargets": "as GetSamplingRules",
    "AWSXrayWriteOnlyAccess/#0 xray:GetSamplingStatisticSummaries": "as GetSamplingRules",
    "AppFlowPushPolicy/AppFlowManagedCredentials secretsmanager:UpdateSecret": "AWS does not document which write "
    "AppFlow makes to its credential secret on an update (PutSecretValue is modelled); kept so a push never "
    "fails on the other",
    "ConnectionWriterPolicy/ConnectionSecrets secretsmanager:UntagResource": "the functions' shared policy; only "
    "rotation removes a tag (its base marker, in finishSecret)",
    "RotationFunctionRole: JwtSigningPolicy/JwtSigningKey": "rotation of a JWT connection signs through the "
    "refresher's path, whose JWT tests (sweep, worker) use this same policy; not run through rotation itself",
    "DashboardFunctionRole: MonitoringPolicy/DescribeConnections": "MonitoringPolicy is also the operators' watch "
    "policy: `make connections` uses this statement, checked against MonitoringPolicy alone; the widget only lists",
    "JwtSigningKmsKey/AccountAdministersTheKey": "the account administers its key (CloudFormation updates and "
    "deletes it; a person disables or schedules it); the functions only sign and the callback reads the public key, "
    "through the statements beside it",
}


def _label(item: str) -> str:
    return item.split(" ")[0]


def _label(item: str) -> str:
    return item.split(" ")[0]


def _why(row: str, item: str) -> str | None:
    """The reason an unused statement or action is kept: for this role, for every role, or its whole statement's."""
    for key in (f"{row}: {item}", item, f"{row}: {_label(item)}", _label(item)):
        if key in UNUSED_BECAUSE:
            return UNUSED_BECAUSE[key]
    return None


def statement_table(checker: Checker, used_by: dict[str, dict[str, set[str]]]) -> tuple[str, list[str]]:
    """(a Markdown table per role of the statements and the action patterns that role's own calls used, the unused
    ones nobody explained). A role is taken with every optional policy attached; a shared managed policy's statement
    counts for a role only if that role's calls used it."""
    full = Deployment().with_parameters(
        JwtSigningKey=f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        AppFlowConnectorProfiles="snow-prod",
    )
    template = checker.template(full)
    created = checker.template(full.with_parameters(JwtSigningKey="create", JwtCertificateIssuerArn=OPERATOR_ARN))
    key = created.key_policy("JwtSigningKmsKey")
    assert key is not None
    anyone: dict[str, set[str]] = {}
    for labels in used_by.values():
        for label, actions in labels.items():
            anyone.setdefault(label, set()).update(actions)
    rows: list[tuple[str, list[Policy], dict[str, set[str]]]] = [
        (f"{actor}Role", template.identity(actor), used_by.get(actor, {})) for actor in HANDLERS.values()
    ]
    rows += [
        ("operator (docs/operator-policy.json)", [checker.operator], used_by.get(OPERATOR, {})),
        ("JwtSigningKmsKey's key policy", [key], anyone),
    ]
    lines = [
        "| role or policy | statements used | actions used | unused, and why |",
        "|---|---|---|---|",
    ]
    unexplained = []
    for name, policies, used in rows:
        statements = [(label, statement) for policy in policies for label, statement in policy.statements]
        unused = [label for label, _ in statements if label not in used]
        patterns = [
            (label, action) for label, statement in statements for action in _listed(statement.get("Action", []))
        ]
        idle = [
            f"{label} {action}"
            for label, action in patterns
            if label in used and not any(_like(done, action, ignore_case=True) for done in used[label])
        ]
        idle += [f"{label} {action}" for label, action in patterns if label in unused]
        unexplained += [f"{name}: {item}" for item in unused + idle if _why(name, item) is None]
        reasons: dict[str, list[str]] = {}  # reason -> what it explains, a whole statement's actions counted once
        for item in unused + [i for i in idle if _label(i) not in unused]:
            whole = item not in unused and _why(name, item) == _why(name, _label(item))
            reason = _why(name, item) or "UNEXPLAINED"
            reasons.setdefault(reason, []).append(_label(item) if whole else item)
        why = "; ".join(
            f"{', '.join(f'`{item}`' for item in dict.fromkeys(items))}"
            f"{f' ({len(items)} actions)' if len(set(items)) < len(items) else ''}: {reason}"
            for reason, items in reasons.items()
        )
        lines.append(
            f"| {name} | {len(statements) - len(unused)} of {len(statements)} | "
            f"{len(patterns) - len(idle)} of {len(patterns)} | {why or '-'} |"
        )
    return "\n".join(lines) + "\n", unexplained


def modelled_table(modelled: dict[tuple[str, str], set[str]]) -> str:
    """The authorizations AWS makes on a caller's behalf, modelled from its documentation (moto makes none)."""
    lines = ["| modelled authorization | made for | AWS documentation |", "|---|---|---|"]
    lines += [f"| `{action}` | {', '.join(sorted(who))} | {page} |" for (action, page), who in sorted(modelled.items())]
    return "\n".join(lines) + "\n"
