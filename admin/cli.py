"""`python -m admin` (or `make` targets): manage connections against AWS or the local stack.

Secrets are read from a prompt or standard input, never from argv (argv lands in shell history and
`ps`). Output never contains a token, client secret or password.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TextIO
from urllib.parse import urlsplit

import boto3
import requests
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from admin.access import AccessError, ConnectionAccess, account_of, parse_principal, parse_region, uses_default_key
from admin.registration import (
    JWKS,
    VERIFIER_MAPS,
    AdminCredentials,
    JwtTrust,
    Plan,
    Registered,
    RegistrationError,
    TableApi,
    admin_session,
    ensure_verifier_map,
    find_entry,
    register_client,
    remove_verifier_maps,
)
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
    _check_jwt_options(args, name)
    connection = _new_connection(args, name, instance, args.client_id, client_secret, password)
    _create_connection(args, out, store, connection)
    if args.grant_type == "authorization_code":
        out.write(f"next: authorize it with `make authorize-url CONNECTION={name}`\n")
    elif args.grant_type == "jwt_bearer":
        out.write(
            f"next: `make refresh CONNECTION={name}` once ServiceNow has the certificate (make jwt-certificate)\n"
        )
    return 0


def _check_jwt_options(args: argparse.Namespace, name: str) -> None:
    jwt_options = (args.jwt_subject, args.jwt_key_id, args.jwt_kms_key)
    if args.grant_type == "jwt_bearer" and not all(jwt_options):
        raise CliError(
            f"connection {name!r}: --jwt-subject, --jwt-key-id and --jwt-kms-key are required with --grant-type "
            "jwt_bearer (the ServiceNow user, the verifier map's key id, the stack's JwtSigningKeyArn output)"
        )
    if args.grant_type != "jwt_bearer" and any(jwt_options):
        raise CliError(f"connection {name!r}: --jwt-* options only apply to --grant-type jwt_bearer")


def _new_connection(
    args: argparse.Namespace,
    name: str,
    instance: str,
    client_id: str,
    client_secret: str,
    password: str | None,
    extra: Mapping[str, Any] | None = None,
) -> Connection:
    more: dict[str, Any] = {"expectedUser": args.expected_user} if args.expected_user else {}
    if args.appflow_profile:
        more[PROFILES_KEY] = list(args.appflow_profile)
    return Connection(
        name=name,
        instance_url=instance,
        client_id=client_id,
        client_secret=client_secret,
        grant_type=args.grant_type,
        username=getattr(args, "username", None),
        password=password,
        scope=args.scope,
        jwt_subject=args.jwt_subject,
        jwt_key_id=args.jwt_key_id,
        kms_key_id=args.jwt_kms_key,
        status="pending_authorization",
        updated_at=utc_now(),
        extra={**more, **(extra or {})},
    )


def _create_connection(
    args: argparse.Namespace,
    out: TextIO,
    store: ConnectionStore,
    connection: Connection,
    prepared: tuple[list[str], dict[str, str | None]] | None = None,
) -> int:
    """Create a new connection's secret with its readers and replicas (`prepared`: already parsed), or nothing."""
    name = connection.name
    consumers, replicas = prepared or _consumers_and_replicas(args, store, name)
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
    """JWT key rollover: stage the next key, and where ServiceNow trusts keys by verifier maps, add the staged
    key's (the admin's credentials are asked for first, so a refusal writes nothing in either system)."""
    store = _store(args)
    name = validate_name(args.name)
    known = store.get(name).connection
    staged_public: Any = None
    if known.grant_type == "jwt_bearer":
        try:  # the options' form first, then a key that cannot sign RS256: each refused before any write
            parse_connection(name, _staged_key(known, args).to_json(), store.allowed_hosts)
        except SecretFormatError as error:
            raise CliError(str(error)) from None
        staged_public = _check_signing_key(name, args.jwt_kms_key)
    api, entry = _map_entry(args, stdin, known)

    def stage(connection: Connection) -> Connection:
        if connection.grant_type != "jwt_bearer":
            raise CliError(f"connection {name!r} uses {connection.grant_type}, not jwt_bearer: no key to stage")
        staged = _staged_key(connection, args)
        try:  # exactly what every reader will accept, or nothing is written
            parse_connection(name, staged.to_json(), store.allowed_hosts)
        except SecretFormatError as error:
            raise CliError(str(error)) from None
        return staged

    store.update(name, stage)
    out.write(
        f"staged key id {args.jwt_key_id} for {name}; assertions keep using the current key and switch over, in "
        "one write with a new token, as soon as ServiceNow refuses the current one (make retire-jwt-key)\n"
    )
    trust = known.extra.get(TRUST_KEY)
    if api is not None and entry is not None:
        try:
            certificate = partial(_certificate, name, args.jwt_kms_key)  # made only if a map is missing
            lines = ensure_verifier_map(api, name, entry, args.jwt_key_id, certificate, staged_public)
        except RegistrationError as error:
            raise CliError(f"the key is staged, but {error}", EXIT_FAILED) from None
        for line in lines or [f"already trusts key id {args.jwt_key_id!r}"]:
            out.write(f"ServiceNow ({api.host}): {line}\n")
    elif trust == JWKS:
        out.write(f"ServiceNow fetches the staged key from {name}'s JWKS URL: nothing to upload\n")
    else:
        out.write(f"ServiceNow needs its certificate: make jwt-certificate CONNECTION={name} NEXT=1\n")
    return 0


def _staged_key(connection: Connection, args: argparse.Namespace) -> Connection:
    return replace(connection, jwt_key_id_next=args.jwt_key_id, kms_key_id_next=args.jwt_kms_key)


def _map_entry(
    args: argparse.Namespace, stdin: TextIO, connection: Connection
) -> tuple[TableApi, str] | tuple[None, None]:
    """For a connection ServiceNow trusts by verifier maps: the Table API (the admin asked for now, so a refusal
    comes before any write) and the sys_id of the entry `servicenow-client` recorded. Else nothing."""
    if connection.extra.get(TRUST_KEY) != VERIFIER_MAPS:
        return None, None
    api = _registration_api(args, stdin, connection.name, connection.instance_url)
    try:
        entry = find_entry(api, str(connection.extra.get(ENTRY_KEY)))
    except RegistrationError as error:
        raise CliError(str(error), EXIT_FAILED) from None
    return api, str(entry.get("sys_id"))


def cmd_retire_jwt_key(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    """The end of a JWT key rollover, on an explicit command: a token from the staged key makes it the current
    one, and where ServiceNow trusts keys by verifier maps, the maps of every other key are removed."""
    store = _store(args)
    name = validate_name(args.name)
    read = store.get(name)
    if read.connection.grant_type != "jwt_bearer":
        raise CliError(f"connection {name!r} uses {read.connection.grant_type}, not jwt_bearer: no key to retire")
    api, entry = _map_entry(args, stdin, read.connection)
    staged = read.connection.jwt_key_next
    if staged is not None:
        outcome = _cli_refresher(store).promote_staged_key(read)
        if outcome is None:
            raise CliError(
                f"connection {name!r}: ServiceNow refused an assertion signed by the staged key {staged.key_id!r}: it "
                "does not trust it yet (make stage-jwt-key adds its verifier map; a JWKS URL needs its cache to "
                "expire); nothing changed",
                EXIT_FAILED,
            )
        current = store.get(name).connection
        if not outcome.jwt_key_promoted or current.jwt_key != staged:
            # Claimed only from the value stored now: a concurrent write (a stage of yet another key) may have won.
            now_keys = f"current {current.jwt_key_id!r}, staged {current.jwt_key_id_next!r}"
            raise CliError(
                f"connection {name!r}: the staged key was not promoted (the connection changed meanwhile: {now_keys}"
                f"; {outcome.result}); no verifier map was removed: run make retire-jwt-key again",
                EXIT_FAILED,
            )
        out.write(f"{name}: key id {staged.key_id} is now the current key (a token from it is stored)\n")
    current = store.get(name).connection
    if api is not None and entry is not None:
        keep = {key.key_id for key in (current.jwt_key, current.jwt_key_next) if key is not None}
        try:
            removed = remove_verifier_maps(api, name, entry, keep)
            restored = _restore_maps(store, api, name, entry, set(removed))
        except RegistrationError as error:
            raise CliError(str(error), EXIT_FAILED) from None
        gone = [kid for kid in removed if kid not in restored]
        out.write(
            f"ServiceNow ({api.host}): removed the verifier maps of {', '.join(map(repr, gone))}\n"
            if gone
            else f"ServiceNow ({api.host}): no verifier map of another key is left\n"
        )
    elif staged is None:
        out.write(f"{name}: no staged key to promote; nothing changed\n")
    if read.connection.extra.get(TRUST_KEY) == JWKS:
        out.write(f"{name}'s JWKS URL now publishes only key id {current.jwt_key_id}\n")
    return 0


def _restore_maps(store: ConnectionStore, api: TableApi, name: str, entry: str, removed: set[str]) -> set[str]:
    """After removing maps, read the connection again: a key staged meanwhile whose map went with them gets it
    back (the list and the deletes are not atomic with a concurrent stage-jwt-key)."""
    connection = store.get(name).connection
    restored = set()
    for key in (connection.jwt_key, connection.jwt_key_next):
        if key is not None and key.key_id in removed:
            public = _check_signing_key(name, key.kms_key_id)
            certificate = partial(_certificate, name, key.kms_key_id)
            ensure_verifier_map(api, name, entry, key.key_id, certificate, public)
            restored.add(key.key_id)
    return restored


def cmd_jwt_certificate(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    """The certificate to upload to ServiceNow's sys_certificate for a JWT connection's (current or next) key."""
    store = _store(args)
    connection = store.get(validate_name(args.name)).connection
    key = connection.jwt_key_next if args.next else connection.jwt_key
    if connection.grant_type != "jwt_bearer" or key is None:
        which = "a staged next key" if args.next else "a JWT signing key"
        raise CliError(f"connection {connection.name!r} has no {which} (grantType jwt_bearer, kmsKeyId)")
    out.write(_certificate(connection.name, key.kms_key_id))
    out.write(f"# key id (JWT Verifier Map 'Kid'): {key.key_id}\n")
    return 0


def cmd_authorize_url(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    store = _store(args)
    name = validate_name(args.name)
    store.get(name)  # refuse links for connections that do not exist
    out.write(_authorize_link(args, store, name, _stack_outputs(args.stack) if args.stack else {}) + "\n")
    return 0


def _api_url(args: argparse.Namespace, outputs: Mapping[str, str]) -> str:
    api_url = args.api_url or os.environ.get("SERVICENOW_OAUTH_API_URL") or outputs.get("ApiUrl")
    if not api_url:
        raise CliError("the consent API's URL is unknown: pass --stack NAME or --api-url URL")
    return str(api_url).rstrip("/")


def _authorize_link(args: argparse.Namespace, store: ConnectionStore, name: str, outputs: Mapping[str, str]) -> str:
    key_id = args.state_key_secret or outputs.get("StateKeySecretArn") or load_settings().state_key_secret_id
    key = store.client.get_secret_value(SecretId=key_id, VersionStage="AWSCURRENT")["SecretString"].encode()
    ttl = timedelta(minutes=args.ttl_minutes)
    return sign_authorize_link(key, _api_url(args, outputs), name, datetime.now(UTC), ttl)


ENTRY_KEY = "servicenowEntry"  # the Application Registry entry `servicenow-client` made or adopted
TRUST_KEY = "servicenowTrust"  # jwt_bearer: how ServiceNow trusts the keys (jwks or verifier_map)
ENTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._()-]{0,79}")
LIFESPANS = {"--access-lifespan": (60, 86_400), "--refresh-lifespan": (3_600, 31_536_000)}


def _read_admin(args: argparse.Namespace, stdin: TextIO) -> AdminCredentials:
    """A ServiceNow admin for this run only: user and password at a prompt (or two lines of standard input)."""
    if stdin.isatty():
        username = args.admin_user or input("ServiceNow admin user: ").strip()
        password = getpass.getpass("ServiceNow admin password: ")
    else:
        username = args.admin_user or stdin.readline().strip()
        password = stdin.readline().rstrip("\n")
    if not username or not password:
        raise CliError("no ServiceNow admin user and password given (prompt or standard input); nothing was written")
    return AdminCredentials(username, password)


def _registration_api(args: argparse.Namespace, stdin: TextIO, connection: str, instance: str) -> TableApi:
    return TableApi(admin_session(), instance, _read_admin(args, stdin), connection)


def cmd_servicenow_client(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    """Register (or find) the connection's OAuth client in ServiceNow and keep its secret in the connection."""
    store = _store(args)
    name = validate_name(args.name)
    entry_name = args.adopt or args.entry_name or f"servicenow-oauth {name}"
    if not ENTRY_NAME.fullmatch(entry_name):
        raise CliError(f"connection {name!r}: entry name {entry_name!r} must be 1-80 letters, digits, spaces or ._()-")
    for option, (low, high) in LIFESPANS.items():
        value = getattr(args, option[2:].replace("-", "_"))
        if not low <= value <= high:
            raise CliError(f"connection {name!r}: {option} must be {low}-{high} seconds; nothing was written")
    outputs = _stack_outputs(args.stack) if args.stack else {}
    api_url = _api_url(args, outputs)
    callback_url = args.callback_url or outputs.get("CallbackUrl") or f"{api_url}/callback"
    try:
        existing: Connection | None = store.get(name).connection
    except ConnectionNotFound:
        existing = None
    try:
        instance = normalize_instance_url(
            args.instance_url or (existing.instance_url if existing else ""), store.allowed_hosts
        )
    except InstanceNotAllowed as error:
        raise CliError(f"connection {name!r}: {error}; nothing was written") from None
    if existing is not None:
        if existing.instance_url != instance:
            raise CliError(
                f"connection {name!r} is for {existing.host}, not {urlsplit(instance).hostname}; nothing was written"
            )
        if existing.grant_type != args.grant_type:
            raise CliError(
                f"connection {name!r} uses {existing.grant_type}, not {args.grant_type}: pass --grant-type "
                f"{existing.grant_type}; nothing was written"
            )
    # Everything that can refuse is asked before the first write in ServiceNow: the readers and replicas a new
    # connection gets, and the signing key a JWT connection's certificate needs.
    prepared = _consumers_and_replicas(args, store, name) if existing is None else None
    jwt = None
    if args.grant_type == "jwt_bearer":
        recorded = None
        if existing is not None:
            for option, held in (("jwt_key_id", existing.jwt_key_id), ("jwt_kms_key", existing.kms_key_id)):
                if getattr(args, option) not in (None, held):
                    raise CliError(
                        f"connection {name!r} signs with key id {existing.jwt_key_id!r} on another KMS key or id: "
                        "roll keys with make stage-jwt-key; nothing was written"
                    )
            args.jwt_subject = args.jwt_subject or existing.jwt_subject
            args.jwt_key_id, args.jwt_kms_key = existing.jwt_key_id, existing.kms_key_id
            recorded = existing.extra.get(TRUST_KEY) if args.trust == "auto" else None
        args.jwt_kms_key = args.jwt_kms_key or outputs.get("JwtSigningKeyArn")
        _check_jwt_options(args, name)
        public_key = _check_signing_key(name, args.jwt_kms_key)
        jwt = JwtTrust(
            key_id=args.jwt_key_id,
            user_field=args.jwt_user_field,
            jwks_url=f"{api_url}/connections/{name}/jwks.json",
            certificate=partial(_certificate, name, args.jwt_kms_key),
            public_key=public_key,
            mode=recorded if recorded in (JWKS, VERIFIER_MAPS) else args.trust,
            known=recorded in (JWKS, VERIFIER_MAPS),
        )
    plan = Plan(
        connection=name,
        entry_name=entry_name,
        callback_url=callback_url,
        access_lifespan=args.access_lifespan,
        refresh_lifespan=args.refresh_lifespan,
        adopt=bool(args.adopt),
        jwt=jwt,
    )
    holds = existing.client_id if existing else None
    tokens_of = holds if existing is not None and (existing.access_token or existing.refresh_token) else None
    api = _registration_api(args, stdin, name, instance)
    try:
        registered = register_client(api, plan, holds_client_id=holds, tokens_of=tokens_of)
    except RegistrationError as error:
        raise CliError(str(error), EXIT_FAILED) from None
    for line in registered.changes:
        out.write(f"ServiceNow ({api.host}): {line}\n")
    extra: dict[str, Any] = {ENTRY_KEY: entry_name}
    if registered.trust:
        extra[TRUST_KEY] = registered.trust
    finish = "ServiceNow is registered, but the connection secret was not written"
    try:
        if existing is None:
            assert registered.client_secret is not None  # a connection that did not exist held no client
            secret = registered.client_secret
            connection = _new_connection(args, name, instance, registered.client_id, secret, None, extra)
            _create_connection(args, out, store, connection, prepared)
        elif registered.client_secret is not None or any(existing.extra.get(k) != v for k, v in extra.items()):
            _take_client(store, name, holds, registered, extra)
            out.write(f"connection {name}: now holds the client of {entry_name!r}\n")
        elif not registered.changes:
            out.write(f"{name}: ServiceNow's entry {entry_name!r} and the connection already match; nothing changed\n")
    except CliError as error:
        raise CliError(f"{finish} ({error}): run the same command again to finish", error.code) from None
    except (BotoCoreError, ClientError) as error:
        raise CliError(f"{finish} (AWS said: {error}): run the same command again to finish", EXIT_FAILED) from None
    if args.grant_type == "authorization_code":
        out.write(f"authorize it (a signed link, valid {args.ttl_minutes} minutes):\n")
        out.write(_authorize_link(args, store, name, outputs) + "\n")
    else:
        out.write(f"next: `make refresh CONNECTION={name}` (ServiceNow trusts key id {args.jwt_key_id!r})\n")
    return 0


def _take_client(
    store: ConnectionStore, name: str, held: str | None, registered: Registered, extra: Mapping[str, Any]
) -> None:
    """Put the entry's client (and a secret set by this run) into the connection, in one conditional write."""

    def take(current: Connection) -> Connection:
        if current.client_id != held:
            raise CliError(f"connection {name!r} changed its client meanwhile; nothing was written to it")
        if current.client_id != registered.client_id and (current.access_token or current.refresh_token):
            # A consent landed while ServiceNow was being written: its tokens belong to the held client.
            raise CliError(
                f"connection {name!r} received tokens of its client {held and held[:8]}… meanwhile, which the "
                "new entry's client would orphan; the connection was not changed"
            )
        secret = registered.client_secret or current.client_secret
        return replace(current, client_id=registered.client_id, client_secret=secret, extra={**current.extra, **extra})

    store.update(name, take)


def _check_signing_key(name: str, kms_key: str) -> Any:
    """The key a certificate or an assertion needs, checked (kms:GetPublicKey) before anything is written;
    returns its public half."""
    from admin.certificate import check_signing_key

    try:
        return check_signing_key(boto3.client("kms"), kms_key)
    except ValueError as error:
        raise CliError(f"connection {name!r}: {error}; nothing was written") from None
    except (BotoCoreError, ClientError) as error:
        raise CliError(f"connection {name!r}: signing key unusable (AWS said: {error}); nothing was written") from None


def _certificate(name: str, kms_key: str) -> str:
    from admin.certificate import kms_certificate

    try:
        return kms_certificate(boto3.client("kms"), kms_key, f"servicenow-oauth {name}", utc_now())
    except ValueError as error:
        raise CliError(f"connection {name!r}: {error}") from None


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


def _connection_options(command: argparse.ArgumentParser) -> None:
    """What a new connection's secret is made with (connections add, servicenow-client)."""
    command.add_argument("--scope")
    command.add_argument("--expected-user", help="refuse consents given by any other ServiceNow user")
    command.add_argument(
        "--appflow-profile", action="append", help="AppFlow connector profile to keep updated (repeatable)"
    )
    command.add_argument(
        "--kms-key-id", help="the stack's SecretsKmsKeyArn, if it has one (default: $SECRETS_KMS_KEY_ID)"
    )
    command.add_argument(
        "--consumer", action="append", help="account id or role ARN that may read it (repeatable; default: the stack's)"
    )
    command.add_argument("--replica-region", action="append", help="keep a read-only copy there (repeatable)")
    command.add_argument("--replica-kms-key", action="append", help="REGION=KEY: the replica's KMS key (repeatable)")
    command.add_argument(
        "--stack", help="read ConsumerPrincipals, ReplicaRegions, SecretsKmsKeyArn (and ApiUrl) from this stack"
    )


def _admin_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--admin-user", help="the ServiceNow admin (default: asked; the password always is)")


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
    _connection_options(add)
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
    _admin_options(key_staging)
    key_staging.set_defaults(run=cmd_stage_jwt_key)
    retire = connections.add_parser(
        "retire-jwt-key", help="promote the staged JWT key now and remove the other keys' verifier maps"
    )
    retire.add_argument("name")
    _admin_options(retire)
    retire.set_defaults(run=cmd_retire_jwt_key)

    client = commands.add_parser(
        "servicenow-client", help="register the connection's OAuth client in ServiceNow (admin asked at a prompt)"
    )
    client.add_argument("name")
    client.add_argument("--instance-url", help="https://<name>.service-now.com (default: the connection's)")
    client.add_argument(
        "--grant-type", default="authorization_code", choices=["authorization_code", "jwt_bearer"], help="the client"
    )
    client.add_argument("--entry-name", help="Application Registry entry name (default: servicenow-oauth <name>)")
    client.add_argument("--adopt", metavar="NAME", help="use this existing entry, which this tool did not create")
    client.add_argument("--access-lifespan", type=int, default=1800, help="seconds (default 1800)")
    client.add_argument("--refresh-lifespan", type=int, default=8_640_000, help="seconds (default 100 days)")
    client.add_argument("--api-url", help="the consent API (default: $SERVICENOW_OAUTH_API_URL, the stack's)")
    client.add_argument("--callback-url", help="redirect URL (default: the stack's CallbackUrl, else API + /callback)")
    client.add_argument("--state-key-secret", help="secret id of the link signing key (default: the stack's)")
    client.add_argument("--ttl-minutes", type=int, default=15, choices=range(1, 61), metavar="1-60")
    client.add_argument("--jwt-subject", help="jwt_bearer: the ServiceNow user the token acts as")
    client.add_argument("--jwt-key-id", help="jwt_bearer: the key id (kid) the assertions carry")
    client.add_argument("--jwt-kms-key", help="jwt_bearer: the KMS signing key (default: the stack's JwtSigningKeyArn)")
    client.add_argument("--jwt-user-field", default="user_name", choices=["user_name", "email", "sys_id"])
    client.add_argument(
        "--trust", default="auto", choices=["auto", JWKS, VERIFIER_MAPS], help="jwt_bearer: how ServiceNow trusts keys"
    )
    _admin_options(client)
    _connection_options(client)
    client.set_defaults(run=cmd_servicenow_client)

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
    except Exception as error:  # a bug: its type only, since a library's message or repr may hold what it was given
        err.write(f"error: unexpected {type(error).__name__}; nothing more is shown, as it may hold a secret\n")
        return EXIT_FAILED
