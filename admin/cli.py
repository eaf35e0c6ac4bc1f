"""`python -m admin` (or `make` targets): manage connections against AWS or the local stack.

Secrets are read from a prompt or standard input, never from argv (argv lands in shell history and
`ps`). Output never contains a token, client secret or password.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import boto3
import requests
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from admin.access import AccessError, ConnectionAccess, account_of, parse_principal, parse_region, uses_default_key
from core.allowlist import normalize_instance_url, parse_allowed_hosts
from core.appflow import PROFILES_KEY
from core.clock import to_iso, utc_now
from core.config import load_settings
from core.errors import ConnectionNotFound, InstanceNotAllowed, InvalidName, SecretFormatError, ServiceNowOAuthError
from core.health import Health
from core.jwt_bearer import KmsSigner
from core.lifecycle import RefreshPolicy, needs_person
from core.monitor import Monitor
from core.redaction import quiet_libraries
from core.refresh import NEXT_CLIENT_SECRET, Refresher
from core.revoke import revoke_connection
from core.secret import Connection, parse_connection
from core.servicenow import ServiceNowClient, build_session
from core.signing import sign_authorize_link
from core.store import ConnectionStore, validate_name
from core.sweep import Sweep

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
BAD_INPUT = (ConnectionNotFound, InvalidName, SecretFormatError, InstanceNotAllowed)


class CliError(Exception):
    """A refusal with its exit code; the message is safe to print."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


def _read_secret(prompt: str, stdin: TextIO) -> str:
    value = getpass.getpass(prompt) if stdin.isatty() else stdin.readline().rstrip("\n")
    if not value:
        raise CliError(f"no value given for {prompt.strip(': ')} (prompt or standard input)")
    return value


def _stack_outputs(stack: str) -> dict[str, str]:
    outputs = boto3.client("cloudformation").describe_stacks(StackName=stack)["Stacks"][0].get("Outputs", [])
    return {output["OutputKey"]: output["OutputValue"] for output in outputs}


def _store(args: argparse.Namespace) -> ConnectionStore:
    settings = load_settings()
    allowed = parse_allowed_hosts(args.allowed_hosts) if args.allowed_hosts else settings.allowed_hosts
    return ConnectionStore(
        boto3.client("secretsmanager"), prefix=args.prefix or settings.secret_prefix, allowed_hosts=allowed
    )


def cmd_add(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    store = _store(args)
    name = validate_name(args.name)
    try:
        instance = normalize_instance_url(args.instance_url, store.allowed_hosts)
    except InstanceNotAllowed as error:
        raise CliError(f"connection {name!r}: {error}") from None
    client_secret = _read_secret("Client secret: ", stdin)
    password = _read_secret("ServiceNow password: ", stdin) if args.grant_type == "password" else None
    if args.grant_type == "password" and not args.username:
        raise CliError(f"connection {name!r}: --username is required with --grant-type password")
    jwt_options = (args.jwt_subject, args.jwt_key_id, args.jwt_kms_key)
    if args.grant_type == "jwt_bearer" and not all(jwt_options):
        raise CliError(
            f"connection {name!r}: --jwt-subject, --jwt-key-id and --jwt-kms-key are required with --grant-type "
            "jwt_bearer (the ServiceNow user, the verifier map's key id, the stack's JwtSigningKeyArn output)"
        )
    if args.grant_type != "jwt_bearer" and any(jwt_options):
        raise CliError(f"connection {name!r}: --jwt-* options only apply to --grant-type jwt_bearer")
    consumers, replicas = _consumers_and_replicas(args, store, name)
    extra: dict[str, Any] = {"expectedUser": args.expected_user} if args.expected_user else {}
    if args.appflow_profile:
        extra[PROFILES_KEY] = list(args.appflow_profile)
    connection = Connection(
        name=name,
        instance_url=instance,
        client_id=args.client_id,
        client_secret=client_secret,
        grant_type=args.grant_type,
        username=args.username,
        password=password,
        scope=args.scope,
        jwt_subject=args.jwt_subject,
        jwt_key_id=args.jwt_key_id,
        kms_key_id=args.jwt_kms_key,
        status="pending_authorization",
        updated_at=utc_now(),
        extra=extra,
    )
    try:
        # Exactly what every reader will accept (e.g. an empty --client-id is refused here, not at each sweep).
        parse_connection(name, connection.to_json(), store.allowed_hosts)
    except SecretFormatError as error:
        raise CliError(str(error)) from None
    try:
        # Health tags from the start, so `connections list` shows it before the first sweep.
        health = Health(
            status=connection.status,
            instance=connection.host,
            grant=connection.grant_type,
            needs_person=needs_person(connection),
        )
        kms_key_id = args.kms_key_id or os.environ.get("SECRETS_KMS_KEY_ID") or None
        own_account = boto3.client("sts").get_caller_identity()["Account"] if consumers else None
        foreign = [principal for principal in consumers if account_of(principal) != own_account]
        if foreign and uses_default_key({"KmsKeyId": kms_key_id}):
            raise CliError(
                f"connection {name!r}: readers in other accounts need the secret on a customer-managed KMS key "
                "(the AWS managed one cannot be shared): pass --kms-key-id <the stack's SecretsKmsKeyArn output>, "
                "deployed with ConsumerPrincipals or SecretsKmsKeyArn; nothing was created"
            )
        access = ConnectionAccess(store.client)
        if consumers:
            access.check(name, consumers)  # ValidateResourcePolicy before anything exists
        stored = store.create(connection, kms_key_id=kms_key_id, tags=health.to_tags(), replicas=replicas)
    except store.client.exceptions.ResourceExistsException:
        raise CliError(f"connection {name!r} already exists; delete its secret first or pick another name") from None
    except AccessError as error:
        raise CliError(f"{error}; nothing was created") from None
    try:
        readers = [reader for principal in consumers for reader in access.grant(name, stored.arn, principal)]
    except (AccessError, BotoCoreError, ClientError) as error:
        # A connection without the readers asked for is not what was asked: whatever refused the grant (our check,
        # GetResourcePolicy denied to the operator, throttling past retries), the secret this command made goes.
        why = str(error) if isinstance(error, AccessError) else f"AWS said: {error}"
        try:
            _undo_create(store, stored.arn, replicas)
        except (BotoCoreError, ClientError) as undo:
            raise CliError(
                f"{why}; the new secret could not be deleted again (AWS said: {undo}): delete {stored.arn} "
                "(aws secretsmanager delete-secret --force-delete-without-recovery) before adding it again"
            ) from None
        raise CliError(f"{why}; the new secret was deleted again, so nothing was created") from None
    out.write(f"created connection {name} ({connection.host}), status pending_authorization\n")
    if replicas:
        states = {
            r.get("Region"): r.get("Status")
            for r in store.client.describe_secret(SecretId=stored.arn).get("ReplicationStatus", [])
        }
        out.write(
            f"replicated to {', '.join(f'{r} ({states.get(r, "?")})' for r in replicas)} "
            "(read-only copies; only this region is written; make connections shows their status)\n"
        )
    if consumers:
        out.write(f"readers: {', '.join(sorted(set(readers)))}\n")
    if foreign:
        out.write(
            "readers in other accounts also need kms:Decrypt on the secret's key through Secrets Manager: the "
            "stack's key allows exactly its ConsumerPrincipals (docs/consumer-policies/other-account.json)\n"
        )
    if args.grant_type == "authorization_code":
        out.write(f"next: authorize it with `make authorize-url CONNECTION={name}`\n")
    elif args.grant_type == "jwt_bearer":
        out.write(
            f"next: `make refresh CONNECTION={name}` once ServiceNow has the certificate (make jwt-certificate)\n"
        )
    return 0


def _when(moment: datetime | None) -> str:
    return to_iso(moment) if moment else "-"


def cmd_list(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    """Health of every connection from ListSecrets alone (the stack's MonitoringPolicy suffices)."""
    store = _store(args)
    refresher = Refresher(store, ServiceNowClient(build_session()), clock=utc_now)
    rows = [
        (
            "CONNECTION",
            "INSTANCE",
            "STATUS",
            "ACCESS EXPIRES",
            "REFRESH EXPIRES",
            "LAST SUCCESS",
            "FAILING",
            "NEXT TRY",
            "OTHER READERS",
            "REPLICAS",
        )
    ]
    entries = list(Sweep(refresher).list_connection_secrets())
    access = ConnectionAccess(store.client)
    with ThreadPoolExecutor(max_workers=8) as pool:  # GetResourcePolicy + DescribeSecret each: never a value
        details = list(pool.map(lambda entry: _access_of(access, entry["ARN"]), entries))
    for entry, (who, replicas) in zip(entries, details, strict=True):
        health = Health.from_tags(entry.get("Tags"))
        failing = f"{health.failure_class} x{health.consecutive_failures}" if health.consecutive_failures else "-"
        if health.failure_class == "rejected":
            failing = "rejected"
        rows.append(
            (
                store.name_of(entry["Name"]) or entry["Name"],
                health.instance or "-",
                health.status or "not yet swept",
                _when(health.access_expires),
                _when(health.refresh_expires),
                _when(health.last_success),
                failing,
                _when(health.next_attempt),
                who,
                replicas,
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n")
    return 0


def _access_of(access: ConnectionAccess, arn: str) -> tuple[str, str]:
    """Who besides this account may read a connection, and where its replicas are (or why that is unknown)."""
    try:
        readers = ",".join(access.readers(arn)) or "-"
        replication = access.client.describe_secret(SecretId=arn).get("ReplicationStatus", [])
    except ClientError as error:  # e.g. a role without GetResourcePolicy: say so, keep listing
        unknown = f"? ({error.response.get('Error', {}).get('Code', 'error')})"
        return unknown, unknown
    return readers, ",".join(f"{r.get('Region')} ({r.get('Status', '?')})" for r in replication) or "-"


def cmd_stage_secret(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    """Client-secret rollover: stage the new secret before changing it in ServiceNow."""
    store = _store(args)
    name = validate_name(args.name)
    staged = _read_secret("New client secret: ", stdin)

    def stage(connection: Connection) -> Connection:
        return replace(connection, extra={**connection.extra, NEXT_CLIENT_SECRET: staged})

    store.update(name, stage)
    out.write(
        f"staged a new client secret for {name}; grants keep using the current one and switch over, "
        "in one write with new tokens, as soon as ServiceNow rejects the old one\n"
    )
    return 0


def _undo_create(store: ConnectionStore, arn: str, replicas: Mapping[str, str | None]) -> None:
    """Delete a secret this very command created (replicas first, as Secrets Manager requires)."""
    if replicas:
        store.client.remove_regions_from_replication(SecretId=arn, RemoveReplicaRegions=list(replicas))
    store.client.delete_secret(SecretId=arn, ForceDeleteWithoutRecovery=True)


def _split(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _consumers_and_replicas(
    args: argparse.Namespace, store: ConnectionStore, name: str
) -> tuple[list[str], dict[str, str | None]]:
    """The readers and replica regions for a new connection (options, else the stack's, else the environment),
    all parsed before anything is created."""
    outputs = _stack_outputs(args.stack) if getattr(args, "stack", None) else {}
    consumers = args.consumer or _split(
        outputs.get("ConsumerPrincipals") or os.environ.get("SERVICENOW_OAUTH_CONSUMERS")
    )
    regions = args.replica_region or _split(
        outputs.get("ReplicaRegions") or os.environ.get("SERVICENOW_OAUTH_REPLICA_REGIONS")
    )
    if outputs.get("SecretsKmsKeyArn") and not args.kms_key_id:
        args.kms_key_id = outputs["SecretsKmsKeyArn"]
    primary = store.client.meta.region_name
    known = boto3.session.Session().get_available_regions("secretsmanager")
    try:
        principals = [parse_principal(principal) for principal in consumers]
        keys = dict(item.split("=", 1) for item in (args.replica_kms_key or []) if "=" in item)
        stack_keys = _split(outputs.get("ReplicaKmsKeyArns"))
        if not keys and stack_keys and not args.replica_region:
            # The stack's, one per replica region, in order, each in its own region.
            if len(stack_keys) != len(regions) or any(
                k.split(":")[3] != r for r, k in zip(regions, stack_keys, strict=False)
            ):
                raise AccessError(
                    "the stack's ReplicaKmsKeyArns must name one key per ReplicaRegions entry, in the same order, "
                    "each in its replica's region"
                )
            keys = dict(zip(regions, stack_keys, strict=True))
        replicas: dict[str, str | None] = {
            parse_region(region, primary=primary, known=known): keys.get(region) for region in regions
        }
    except AccessError as error:
        raise CliError(f"connection {name!r}: {error}; nothing was created") from None
    unknown = set(keys) - set(replicas)
    if unknown or any("=" not in item for item in args.replica_kms_key or []):
        raise CliError(
            f"connection {name!r}: --replica-kms-key takes REGION=KEY for a --replica-region; nothing was created"
        )
    return principals, replicas


def cmd_grant(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    """Let a principal (an account id or a role ARN) read a connection's secret."""
    return _change_readers(args, out, revoke=False)


def cmd_revoke_access(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    return _change_readers(args, out, revoke=True)


def _change_readers(args: argparse.Namespace, out: TextIO, *, revoke: bool) -> int:
    store = _store(args)
    name = validate_name(args.name)
    access = ConnectionAccess(store.client)
    try:
        principal = args.principal.strip()
        if not revoke:
            principal = parse_principal(principal)  # refused before any call (a revoke may name a deleted role's id)
        arn = store.client.describe_secret(SecretId=store.secret_id(name))["ARN"]
        if revoke and principal not in access.readers(arn):  # a deleted role shows as its unique id: revocable
            principal = parse_principal(principal)
        readers = access.revoke(name, arn, principal) if revoke else access.grant(name, arn, principal)
    except AccessError as error:
        raise CliError(str(error)) from None
    except store.client.exceptions.ResourceNotFoundException:
        raise ConnectionNotFound(name, store.secret_id(name)) from None
    out.write(f"{name}: readers {', '.join(readers) or 'none but this account'}\n")
    return 0


def cmd_stage_jwt_key(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    """JWT key rollover: stage the next key before ServiceNow drops the current one's verifier map."""
    store = _store(args)
    name = validate_name(args.name)

    def stage(connection: Connection) -> Connection:
        if connection.grant_type != "jwt_bearer":
            raise CliError(f"connection {name!r} uses {connection.grant_type}, not jwt_bearer: no key to stage")
        staged = replace(connection, jwt_key_id_next=args.jwt_key_id, kms_key_id_next=args.jwt_kms_key)
        try:  # exactly what every reader will accept, or nothing is written
            parse_connection(name, staged.to_json(), store.allowed_hosts)
        except SecretFormatError as error:
            raise CliError(str(error)) from None
        return staged

    store.update(name, stage)
    out.write(
        f"staged key id {args.jwt_key_id} for {name}; assertions keep using the current key and switch over, in "
        "one write with a new token, as soon as ServiceNow refuses the current one\n"
    )
    return 0


def cmd_jwt_certificate(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    """The certificate to upload to ServiceNow's sys_certificate for a JWT connection's (current or next) key."""
    from admin.certificate import kms_certificate

    store = _store(args)
    connection = store.get(validate_name(args.name)).connection
    key = connection.jwt_key_next if args.next else connection.jwt_key
    if connection.grant_type != "jwt_bearer" or key is None:
        which = "a staged next key" if args.next else "a JWT signing key"
        raise CliError(f"connection {connection.name!r} has no {which} (grantType jwt_bearer, kmsKeyId)")
    try:
        pem = kms_certificate(boto3.client("kms"), key.kms_key_id, f"servicenow-oauth {connection.name}", utc_now())
    except ValueError as error:
        raise CliError(f"connection {connection.name!r}: {error}") from None
    out.write(pem)
    out.write(f"# key id (JWT Verifier Map 'Kid'): {key.key_id}\n")
    return 0


def cmd_authorize_url(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    store = _store(args)
    name = validate_name(args.name)
    store.get(name)  # refuse links for connections that do not exist
    api_url, key_id = args.api_url or os.environ.get("SERVICENOW_OAUTH_API_URL"), args.state_key_secret
    if args.stack:
        outputs = _stack_outputs(args.stack)
        api_url, key_id = api_url or outputs.get("ApiUrl"), key_id or outputs.get("StateKeySecretArn")
    if not api_url:
        raise CliError("the consent API's URL is unknown: pass --stack NAME or --api-url URL")
    key_id = key_id or load_settings().state_key_secret_id
    key = store.client.get_secret_value(SecretId=key_id, VersionStage="AWSCURRENT")["SecretString"].encode()
    ttl = timedelta(minutes=args.ttl_minutes)
    out.write(sign_authorize_link(key, api_url, name, datetime.now(UTC), ttl) + "\n")
    return 0


def _cli_refresher(store: ConnectionStore) -> Refresher:
    settings = load_settings()
    policy = RefreshPolicy.from_settings(settings)
    monitor = Monitor(store.client, boto3.client("events"), clock=utc_now, policy=policy, bus=settings.event_bus_name)
    return Refresher(
        store,
        ServiceNowClient(build_session()),
        clock=utc_now,
        policy=policy,
        monitor=monitor,
        signer=KmsSigner(boto3.client("kms")),
    )


def cmd_refresh(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    store = _store(args)
    refresher = _cli_refresher(store)
    read = store.get(validate_name(args.name))
    tags = store.client.describe_secret(SecretId=read.arn).get("Tags", [])
    health = Health.from_tags(tags)
    if not args.force and health.next_attempt and health.next_attempt > utc_now():
        out.write(
            f"{read.connection.name}: backing off after {health.consecutive_failures} failures "
            f"({health.failure_class}) until {to_iso(health.next_attempt)}; use --force to try now\n"
        )
        return EXIT_FAILED
    outcome = refresher.refresh(replace(read, tags={t["Key"]: t["Value"] for t in tags}), force=args.force)
    line = f"{outcome.connection}: {outcome.result}"
    if outcome.access_token_expires_at:
        line += f", access token valid until {to_iso(outcome.access_token_expires_at)}"
    if outcome.detail:
        line += f" ({outcome.detail})"
    out.write(line + "\n")
    return 0 if outcome.result in ("refreshed", "not_due") else EXIT_FAILED


def cmd_revoke(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    store = _store(args)
    stored = revoke_connection(store, ServiceNowClient(build_session()), validate_name(args.name), utc_now())
    out.write(f"revoked the tokens of {stored.connection.name}; status reauthorization_required\n")
    return 0


def cmd_smoke(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    from admin.smoke import Clients, smoke

    clients = Clients(
        cloudformation=boto3.client("cloudformation"),
        # One attempt that may take the sweep's whole 240 s: a retried read timeout would start a second sweep.
        lambda_client=boto3.client("lambda", config=Config(read_timeout=300, retries={"total_max_attempts": 1})),
        cloudwatch=boto3.client("cloudwatch"),
        sns=boto3.client("sns"),
        events=boto3.client("events"),
        secretsmanager=boto3.client("secretsmanager"),
        http=requests.Session(),  # one attempt per check (smoke's own timeouts)
    )
    return smoke(args.stack, clients, out=out)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="servicenow-oauth", description=__doc__.splitlines()[0])
    root.add_argument(
        "--prefix", help="connection secret prefix (default: $CONNECTION_SECRET_PREFIX or servicenow-oauth/)"
    )
    root.add_argument("--allowed-hosts", help="allowed instance host patterns (default: $SERVICENOW_ALLOWED_HOSTS)")
    commands = root.add_subparsers(dest="command", required=True)

    connections = commands.add_parser("connections", help="add or list connections").add_subparsers(
        dest="action", required=True
    )
    add = connections.add_parser("add", help="create a connection secret (client secret read from prompt/stdin)")
    add.add_argument("name")
    add.add_argument("--instance-url", required=True, help="https://<name>.service-now.com")
    add.add_argument("--client-id", required=True)
    add.add_argument(
        "--grant-type",
        default="authorization_code",
        choices=["authorization_code", "password", "client_credentials", "jwt_bearer"],
    )
    add.add_argument(
        "--jwt-subject", help="jwt_bearer: the ServiceNow user the token acts as (the verifier's User Field)"
    )
    add.add_argument("--jwt-key-id", help="jwt_bearer: the key id (kid) of the JWT Verifier Map")
    add.add_argument("--jwt-kms-key", help="jwt_bearer: the KMS signing key (the stack's JwtSigningKeyArn output)")
    add.add_argument("--username", help="password grant only (the password is read from prompt/stdin)")
    add.add_argument("--scope")
    add.add_argument("--expected-user", help="refuse consents given by any other ServiceNow user")
    add.add_argument(
        "--appflow-profile", action="append", help="AppFlow connector profile to keep updated (repeatable)"
    )
    add.add_argument("--kms-key-id", help="the stack's SecretsKmsKeyArn, if it has one (default: $SECRETS_KMS_KEY_ID)")
    add.add_argument(
        "--consumer", action="append", help="account id or role ARN that may read it (repeatable; default: the stack's)"
    )
    add.add_argument("--replica-region", action="append", help="keep a read-only copy there (repeatable)")
    add.add_argument("--replica-kms-key", action="append", help="REGION=KEY: the replica's KMS key (repeatable)")
    add.add_argument("--stack", help="read ConsumerPrincipals, ReplicaRegions and SecretsKmsKeyArn from this stack")
    add.set_defaults(run=cmd_add)
    listing = connections.add_parser("list", help="health of every connection (list permission only; never tokens)")
    listing.set_defaults(run=cmd_list)
    staging = connections.add_parser("stage-secret", help="stage a new client secret (read from prompt/stdin)")
    staging.add_argument("name")
    staging.set_defaults(run=cmd_stage_secret)
    grant = connections.add_parser("grant", help="let an account id or role ARN read the connection's secret")
    grant.add_argument("name")
    grant.add_argument("principal")
    grant.set_defaults(run=cmd_grant)
    revoke_access = connections.add_parser("revoke-access", help="take a reader's access away again")
    revoke_access.add_argument("name")
    revoke_access.add_argument("principal")
    revoke_access.set_defaults(run=cmd_revoke_access)
    key_staging = connections.add_parser("stage-jwt-key", help="stage the next JWT signing key (rollover)")
    key_staging.add_argument("name")
    key_staging.add_argument("--jwt-key-id", required=True, help="the new verifier map's key id (kid)")
    key_staging.add_argument("--jwt-kms-key", required=True, help="the new KMS signing key (id, ARN or alias)")
    key_staging.set_defaults(run=cmd_stage_jwt_key)

    certificate = commands.add_parser("jwt-certificate", help="print the certificate ServiceNow needs (PEM)")
    certificate.add_argument("name")
    certificate.add_argument("--next", action="store_true", help="for the staged next key")
    certificate.set_defaults(run=cmd_jwt_certificate)

    link = commands.add_parser("authorize-url", help="print a signed, short-lived consent link")
    link.add_argument("name")
    link.add_argument("--stack", help="CloudFormation stack to read ApiUrl and StateKeySecretArn from")
    link.add_argument("--api-url", help="the consent API's base URL (default: $SERVICENOW_OAUTH_API_URL)")
    link.add_argument("--state-key-secret", help="secret id of the signing key (default: $STATE_KEY_SECRET_ID)")
    link.add_argument("--ttl-minutes", type=int, default=15, choices=range(1, 61), metavar="1-60")
    link.set_defaults(run=cmd_authorize_url)

    refresh = commands.add_parser("refresh", help="refresh one connection now")
    refresh.add_argument("name")
    refresh.add_argument("--force", action="store_true", help="refresh now, even if not due or backing off")
    refresh.set_defaults(run=cmd_refresh)

    revoke = commands.add_parser("revoke", help="revoke the tokens at ServiceNow and clear them from the secret")
    revoke.add_argument("name")
    revoke.set_defaults(run=cmd_revoke)

    check = commands.add_parser("smoke", help="check a deployed stack (read-only toward connections)")
    check.add_argument("--stack", required=True)
    check.set_defaults(run=cmd_smoke)
    return root


def main(
    argv: Sequence[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr, stdin: TextIO = sys.stdin
) -> int:
    quiet_libraries()  # an operator's logging.basicConfig(level=DEBUG) must not print botocore's secret bodies
    args = parser().parse_args(argv)
    try:
        return int(args.run(args, out, stdin))
    except CliError as error:
        err.write(f"error: {error}\n")
        return error.code
    except (BotoCoreError, ClientError) as error:
        # No region, no credentials, no network, AccessDenied: AWS's own words, which carry no secret value.
        err.write(f"error: AWS said: {error}\n")
        return EXIT_FAILED
    except ServiceNowOAuthError as error:
        # Our errors' messages name the connection and what to do, and never carry secrets.
        err.write(f"error: {error}\n")
        return EXIT_BAD_INPUT if isinstance(error, BAD_INPUT) else EXIT_FAILED
