"""The model-based life-cycle test's machine: the real code against moto and the emulator, under generated
histories of faults, concurrency and operator actions, with the README's guarantees checked after every step.

Shared by `tests/test_lifecycle_model.py` (derandomized, in `make test`) and `benchmarks/soak.py`
(`make soak`, 100,000+ steps). Faults are real: the emulator's (hibernation HTML, 429, 500, a dropped
connection, an answer lost after ServiceNow processed the grant), and AWS errors raised by botocore
itself from a `before-call` hook on real clients (moto cannot throttle; moto has no AppFlow at all).
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import threading
import uuid
from collections import Counter
from contextlib import suppress
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import requests
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ReadTimeoutError
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from core.appflow import AppFlowSync
from core.consent import complete_consent, start_consent
from core.errors import ServiceNowOAuthError
from core.health import CANDIDATE, Health
from core.lifecycle import RefreshPolicy
from core.monitor import Monitor
from core.refresh import Refresher
from core.revoke import revoke_connection
from core.rotation import Rotation
from core.secret import Connection, parse_connection
from core.servicenow import ServiceNowClient, build_session
from core.signing import sign_authorize_link
from core.store import ConnectionStore
from core.sweep import Sweep
from local.servicenow_emulator import ServiceNowEmulator, press_consent
from tests.conftest import register_rotation_lambda

REGION = "us-east-1"
REPLICA_REGION = "eu-west-1"  # a read-only replica some histories have: nothing may ever be written there
PREFIX = "servicenow-oauth/"
NAME = "prod"
SECRET = PREFIX + NAME
CLIENT_ID = "9a1c0a7e9b2d4c6e8a0b1c2d3e4f5a6b"
REDIRECT = "http://127.0.0.1:9/callback"
STATE_KEY = b"model-state-key-0123456789abcdef"
POLICY = RefreshPolicy()
SWEEP = POLICY.interval.total_seconds()
DAY = 86_400
OUTAGE = 6 * 3600  # one `hours_of_outage` step; chained steps cover a day (the bound is per 24 h window)
MAX_DAILY_REQUESTS = 40  # the README's bound for a failing connection
SM_GROUPS = {
    "read": ("GetSecretValue", "BatchGetSecretValue", "DescribeSecret"),
    "write": ("PutSecretValue", "UpdateSecretVersionStage"),
    "tags": ("TagResource", "UntagResource"),
}
DOWN_FAULTS = ("hibernate", "server_error", "rate_limit")
BLIPS = ("hibernate", "server_error", "rate_limit", "drop", "lost")
log = logging.getLogger("servicenow-oauth.model")


class Stats:
    """What a run covered: steps, invariant checks, violations (the soak reports these)."""

    steps = 0
    checks = 0
    rules: Counter[str] = Counter()
    history: list[str] = []  # the current example's rules, for a violation's report


# Rules that only set the world's condition for later steps: no code runs, no token or secret changes.
CONDITIONS = frozenset(
    {
        "servicenow_changes_client_secret",
        "instance_goes_down",
        "instance_recovers",
        "blip_on_next_attempt",
        "secrets_manager_throttles",
        "secrets_manager_times_out",
        "secrets_manager_recovers",
        "eventbridge",
        "appflow",
        "container_recycled",
    }
)


def recorded(function: Any) -> Any:
    """Counts a rule and notes it in the current example's history (what a soak violation reports); after a
    rule that ran code, the invariants look at the world afresh."""

    @functools.wraps(function)
    def step(self: Any, **arguments: Any) -> Any:
        Stats.rules[function.__name__] += 1
        shown = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
        Stats.history.append(f"{function.__name__}({shown})")
        self.ran_code = function.__name__ not in CONDITIONS
        self.seen = None if self.ran_code else self.seen
        return function(self, **arguments)

    return step


def _error(code: str, operation: str) -> tuple[AWSResponse, dict[str, Any]]:
    parsed = {"Error": {"Code": code, "Message": f"{operation} refused by the model"}, "ResponseMetadata": {}}
    return AWSResponse("http://model", 400, {}, None), parsed


class AwsFaults:
    """Makes a real botocore client fail chosen operations, as AWS does once its own retries are spent."""

    def __init__(self) -> None:
        self.pending: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # operations refused so far, by name
        # group -> whether it lands: the group's next call times out (a reset or a hung socket once botocore's
        # retries are spent), before it reached Secrets Manager or after it landed with its answer lost.
        self.time_out: dict[str, bool] = {}
        self.timed_out: Counter[tuple[str, bool]] = Counter()  # (operation, landed) so far
        self.events_down = False
        self.appflow_down = False
        self.write_regions: set[str] = set()  # where the code under test wrote (only ever the primary)
        self.lock = threading.Lock()

    def hook(self, model: Any, context: Any = None, **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        name = model.name
        with self.lock:
            if name in SM_GROUPS["write"] + SM_GROUPS["tags"]:
                self.write_regions.add((context or {}).get("client_region", "?"))
            if name == "PutEvents" and self.events_down:
                return _error("InternalException", name)
            if name == "UpdateConnectorProfile":
                if self.appflow_down:
                    return _error("AccessDeniedException", name)
                return AWSResponse("http://model", 200, {}, None), {"connectorProfileArn": "arn:model"}
            self._time_out(name, landed=False)
            for group, operations in SM_GROUPS.items():
                if name in operations and self.pending[group] > 0:
                    self.pending[group] -= 1
                    self.refused[name] += 1
                    return _error("ThrottlingException", name)
        return None

    def landed(self, model: Any, http_response: Any = None, **_: Any) -> None:
        """after-call: a call that landed, whose answer is lost on the way back (botocore emits after-call for a
        call `hook` answered itself too: that one never reached Secrets Manager, so it did not land)."""
        name = model.name
        if http_response is None or http_response.url == "http://model" or http_response.status_code >= 300:
            return
        with self.lock:
            self._time_out(name, landed=True)

    def _time_out(self, name: str, *, landed: bool) -> None:
        """Raise the timeout set for `name`'s group, before the call (`landed=False`) or after it (under the lock)."""
        for group, operations in SM_GROUPS.items():
            if name in operations and self.time_out.get(group) is landed:
                del self.time_out[group]
                self.timed_out[(name, landed)] += 1
                raise ReadTimeoutError(endpoint_url="https://secretsmanager.us-east-1.amazonaws.com/")


class LifecycleModel(RuleBasedStateMachine):
    """One authorization-code connection's life; `moto_url` is set by the test before the run."""

    moto_url: str = ""

    def __init__(self) -> None:
        super().__init__()
        Stats.history = []
        requests.post(f"{self.moto_url}/moto-api/reset", timeout=60).raise_for_status()  # a loaded machine is slow
        self.now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
        self.emulator = ServiceNowEmulator(clock=lambda: self.now.timestamp()).__enter__()
        self.client_secret = "model-client-secret-A1"
        self.emulator.register_client(CLIENT_ID, self.client_secret, [REDIRECT])
        self.emulator.add_user("svc.integration", "Pa55w0rd-model")
        self.faults = AwsFaults()
        config = Config(retries={"mode": "standard", "max_attempts": 1})
        clients = {}
        for service in ("secretsmanager", "events", "appflow"):
            client = boto3.client(service, endpoint_url=self.moto_url, region_name=REGION, config=config)
            client.meta.events.register(
                f"before-call.{client.meta.service_model.service_id.hyphenize()}.*", self.faults.hook
            )
            if service == "secretsmanager":
                client.meta.events.register("after-call.secrets-manager.*", self.faults.landed)
            clients[service] = client
        self.sm = clients["secretsmanager"]  # what the code under test uses: faults apply
        self.plain = boto3.client("secretsmanager", endpoint_url=self.moto_url, region_name=REGION)  # the model's eyes
        self.events: list[str] = []
        clients["events"].meta.events.register("before-parameter-build.eventbridge.PutEvents", self._record_events)
        self.store = ConnectionStore(self.sm, prefix=PREFIX, allowed_hosts=("127.0.0.1",), sleep=lambda _: None)
        self.client = ServiceNowClient(
            build_session(backoff_factor=0.001, backoff_max=0.01),
            single_shot=build_session(replay=False, backoff_factor=0.001, backoff_max=0.01),
            clock=lambda: self.now,
            timeout=(2, 5),
        )
        self.monitor = Monitor(self.sm, clients["events"], clock=lambda: self.now, policy=POLICY)
        self.appflow = AppFlowSync(clients["appflow"], self.sm)
        self.rotation_arn = register_rotation_lambda(self.moto_url)
        self.rotating = False
        self.created = False
        # What the model knows about the world (never the code's own view):
        self.down: str | None = None  # a persistent outage of the instance
        self.blip: str | None = None  # one fault on the next attempt only
        self.unseen = False  # a rotated refresh token was lost in a lost answer: the one documented loss
        self.parked_version: str | None = None  # the version ServiceNow definitively refused (a 401 seen)
        self.down_requests: list[tuple[datetime, int]] = []
        self.operator_tokens: set[str] = set()
        self.unseen_tokens: set[str] = set()
        # Transient failures (ServiceNow's or AWS's) since the stored access token was last renewed:
        self.faults_since_renewal = 0
        self.waiting_since: datetime | None = None  # since when a usable credential waits for an attempt
        self.aws_refused = False  # Secrets Manager refused a read or write during the last action
        # Positions in `events` where a container was recycled while it held health its tag writes could not
        # store: the documented limit, one change may be announced again across each such boundary.
        self.memory_lost_at: list[int] = []
        self.seen: tuple[str, Connection] | None = None  # AWSCURRENT as the invariants last read it
        self.ran_code = True

    def teardown(self) -> None:
        self.emulator.__exit__(None, None, None)

    def _record_events(self, params: dict[str, Any], **_: Any) -> None:
        """The change events the code published and EventBridge accepted ("lost" where it refused them: events
        are sent at most once, so the next one may repeat the last one seen)."""
        if self.faults.events_down:
            self.events.append("lost")
        else:
            self.events.extend(json.loads(entry["Detail"])["change"] for entry in params.get("Entries", []))

    def refresher(self) -> Refresher:
        return Refresher(
            self.store, self.client, clock=lambda: self.now, policy=POLICY, appflow=self.appflow, monitor=self.monitor
        )

    # ------------------------------------------------------------------ the world's state
    def current(self) -> tuple[str, Connection]:
        read = self.plain.get_secret_value(SecretId=SECRET, VersionStage="AWSCURRENT")
        return read["VersionId"], parse_connection(NAME, read["SecretString"], ("127.0.0.1",))

    def look(self) -> tuple[str, Connection]:
        """`current()`, read once per step for the invariants."""
        if self.seen is None:
            self.seen = self.current()
        return self.seen

    def stages(self) -> dict[str, list[str]]:
        return dict(self.plain.describe_secret(SecretId=SECRET)["VersionIdsToStages"])

    def tags(self) -> Health:
        return Health.from_tags(self.plain.describe_secret(SecretId=SECRET).get("Tags", []))

    def stored_refresh_tokens(self) -> set[str | None]:
        """AWSCURRENT's refresh token and a candidate's (which the next run adopts)."""
        stored = {self.look()[1].refresh_token}
        for version, labels in self.stages().items():
            if CANDIDATE in labels:
                value = self.plain.get_secret_value(SecretId=SECRET, VersionId=version)["SecretString"]
                stored.add(json.loads(value).get("refreshToken"))
        return stored

    # ------------------------------------------------------------------ running an action under faults
    def act(self, action: Any, *, scheduled: bool = False) -> int:
        """Run an action with the instance's condition applied; returns the token requests it made. Requests of
        `scheduled` actions (sweeps) count toward the daily bound; an operator's forced refresh or a rotation
        asks for its attempt and is not bounded."""
        self.emulator.clear_faults()
        if self.down:
            self.emulator.inject(self.down, count=10_000, retry_after=0)
        elif self.blip:
            self.emulator.inject(self.blip, count=1, retry_after=0)
        log_before = len(self.emulator.requests_log)
        before = self.emulator.token_requests()
        puts_refused = self.faults.refused["PutSecretValue"]
        writes_timed_out = self._writes_timed_out()
        refused_before = self._aws_refusals()
        connection_before = self.current()[1]
        try:
            action()
        except (ServiceNowOAuthError, ClientError, BotoCoreError):
            pass  # a failed invocation (Lambda reports it; the next run starts over)
        finally:
            self.emulator.clear_faults()
        made = self.emulator.token_requests() - before
        self.aws_refused = self._aws_refusals() > refused_before
        answers = [entry for entry in self.emulator.requests_log[log_before:] if entry["path"] == "/oauth_token.do"]
        if self.blip == "lost" and self.rotating and any(a["grant_type"] == "refresh_token" for a in answers[:1]):
            # The documented limit: ServiceNow rotated the token in an answer that never arrived.
            self.unseen = True
            self.unseen_tokens |= self.emulator.live_refresh_tokens(CLIENT_ID) - self.stored_refresh_tokens()
        exhausted = self.faults.refused["PutSecretValue"] - puts_refused >= self.store.write_attempts
        if self.rotating and (exhausted or self._writes_timed_out() > writes_timed_out):
            # The other documented limit: Secrets Manager refused every write of the refresh, or a write timed out
            # before it landed, so the rotated refresh token could be stored nowhere (the write_failed alarm
            # fires; the README says so). A write that landed unseen is adopted: it loses nothing.
            lost = self.emulator.live_refresh_tokens(CLIENT_ID) - self.operator_tokens - self.stored_refresh_tokens()
            if lost:
                self.unseen = True
                self.unseen_tokens |= lost
        self.blip = None
        if self.down and scheduled:
            self.down_requests.append((self.now, made))
        refused = any(a["status"] == 401 and a["grant_type"] == "refresh_token" for a in answers)
        version, connection = self.current()
        if refused and connection.status == "reauthorization_required":
            self.parked_version = version
        self._note_renewal(connection_before, connection)
        self.seen = None  # the rule may go on changing things
        return made

    def _aws_refusals(self) -> int:
        """Reads and writes Secrets Manager refused or timed out so far (tag refusals do not stop an attempt)."""
        names = SM_GROUPS["read"] + SM_GROUPS["write"]
        timed_out = sum(count for (name, _), count in self.faults.timed_out.items() if name in names)
        return sum(self.faults.refused[name] for name in names) + timed_out

    def _writes_timed_out(self) -> int:
        """New versions whose write timed out before it landed: the rotated refresh token it carried is stored
        nowhere (a stage move that never landed leaves its candidate, which loses nothing)."""
        return self.faults.timed_out[("PutSecretValue", False)]

    def _renewed_by_a_person(self) -> None:
        """A consent or an operator's new token ended any failing stretch: the daily bound starts over."""
        self.down_requests.clear()

    def _note_renewal(self, before: Connection, after: Connection) -> None:
        renewed = after.access_token_expires_at and (
            before.access_token_expires_at is None or after.access_token_expires_at > before.access_token_expires_at
        )
        if after.status == "active" and renewed:
            self.faults_since_renewal = 0

    # ------------------------------------------------------------------ rules
    @initialize(rotating=st.booleans(), appflow=st.booleans(), replica=st.booleans())
    @recorded
    def create(self, rotating: bool, appflow: bool, replica: bool) -> None:
        self.rotating = rotating
        self.emulator.rotate_refresh_tokens = rotating
        document = {
            "instanceUrl": self.emulator.url,
            "clientId": CLIENT_ID,
            "clientSecret": self.client_secret,
            "redirectUri": REDIRECT,
            "status": "pending_authorization",
        }
        if appflow:
            document["appflowConnectorProfiles"] = ["model-profile"]
        replicas = {"AddReplicaRegions": [{"Region": REPLICA_REGION}]} if replica else {}
        self.plain.create_secret(Name=SECRET, SecretString=json.dumps(document), **replicas)
        self.created = True
        self._consent(twice=False)

    def _consent(self, *, twice: bool) -> None:
        link = urlsplit(sign_authorize_link(STATE_KEY, "http://api", NAME, self.now))
        query = {key: values[0] for key, values in parse_qs(link.query).items()}
        try:
            location = start_consent(
                self.store,
                STATE_KEY,
                NAME,
                expires=query["expires"],
                signature=query["signature"],
                callback_url=REDIRECT,
                now=self.now,
            )
        except (ServiceNowOAuthError, ClientError, BotoCoreError):
            return  # the authorize page said so; nothing was issued
        redirects = [press_consent(location) for _ in range(2 if twice else 1)]
        for redirect in redirects:
            with suppress(ServiceNowOAuthError, ClientError, BotoCoreError):
                stored = complete_consent(
                    self.store,
                    self.client,
                    STATE_KEY,
                    state=redirect.get("state"),
                    code=redirect.get("code"),
                    error=None,
                    callback_url=REDIRECT,
                    now=self.now,
                )
                self.monitor.after_consent(stored)
                self._renewed_by_a_person()
                self.unseen = False
                self.parked_version = None
                # A consent renews the tokens, but an outage still under way is still more than one blip.
                self.faults_since_renewal = 2 if self.down else 0

    @rule()
    @recorded
    def sweep(self) -> None:
        self.now += timedelta(seconds=SWEEP)
        version, connection = self.current()
        health = self.tags()
        parked = self.parked_version == version
        quiet = (
            not parked
            and connection.access_token_expires_at is not None
            and connection.access_token_expires_at - self.now > POLICY.leeway
            and health.version == version
            and not health.appflow_pending
            and CANDIDATE not in {label for labels in self.stages().values() for label in labels}
            and not (health.refresh_expires and health.refresh_expires - self.now <= POLICY.refresh_warning)
        )
        made = self.act(lambda: Sweep(self.refresher()).run(), scheduled=True)
        Stats.checks += 1
        if parked:
            assert made == 0, "a refused credential was retried before its secret changed"
        if quiet:
            assert self.current()[0] == version, "a sweep wrote a connection that was not due"
        self._check_liveness(made)

    def _check_liveness(self, made: int) -> None:
        """Never parked by a blip: a connection with a credential that was not refused gets an attempt within
        the backoff cap (plus two sweeps) once the instance is healthy and Secrets Manager answers."""
        version, connection = self.current()
        if self.aws_refused:
            self.waiting_since = None  # Secrets Manager refused a read or write: the wait starts when it answers
            return
        stuck = (
            self.down is None
            and not self.unseen
            and self.parked_version != version
            and connection.refresh_token is not None
            and (
                connection.status == "reauthorization_required"
                or connection.access_token_expires_at is None
                or connection.access_token_expires_at - self.now <= POLICY.leeway
            )
        )
        if not stuck or made:
            self.waiting_since = None
            return
        self.waiting_since = self.waiting_since or self.now
        Stats.checks += 1
        assert self.now - self.waiting_since <= POLICY.backoff_cap + 2 * POLICY.interval, (
            "a connection with a usable credential was not retried (parked by a blip?)"
        )

    @rule()
    @recorded
    def force_refresh(self) -> None:
        self.act(lambda: self.refresher().refresh(self.store.get_latest(NAME), force=True))

    @rule()
    @recorded
    def concurrent_sweeps(self) -> None:
        self.now += timedelta(seconds=SWEEP)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                Sweep(self.refresher()).run()
            except BaseException as error:
                errors.append(error)

        def both() -> None:
            threads = [threading.Thread(target=run) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        first = len(self.events)
        if self.monitor.unsaved(self.plain.describe_secret(SecretId=SECRET)["ARN"]):
            # The overlapping invocation is another container in Lambda: it does not share the health this one
            # holds in memory, and may announce the change again (the README's documented limit).
            self.memory_lost_at.append(first)
        made = self.act(both, scheduled=True)
        assert not errors, errors
        self._check_liveness(made)
        # Overlapping invocations each announce the change they observed (the README says so): one per sweep.
        announced = self.events[first:]
        self.events[first:] = [kind for n, kind in enumerate(announced) if kind not in announced[:n]]

    @rule(interleave=st.booleans(), break_test=st.booleans())
    @recorded
    def rotate(self, interleave: bool, break_test: bool) -> None:
        """Secrets Manager's rotation, steps as the service calls them, with a sweep between create and finish."""
        token = str(uuid.uuid4())
        for version, labels in self.stages().items():
            if "AWSPENDING" in labels:  # Secrets Manager clears it when a rotation ends (or is given up)
                self.plain.update_secret_version_stage(
                    SecretId=SECRET, VersionStage="AWSPENDING", RemoveFromVersionId=version
                )
        self.plain.rotate_secret(
            SecretId=SECRET,
            RotationLambdaARN=self.rotation_arn,
            RotationRules={"AutomaticallyAfterDays": 1},
            RotateImmediately=True,
            ClientRequestToken=token,
        )
        rotation = Rotation(self.refresher(), log)

        def steps() -> None:
            rotation.run("createSecret", SECRET, token)
            rotation.run("setSecret", SECRET, token)
            if interleave:
                Sweep(self.refresher()).run()
            if break_test:
                self.emulator.inject("server_error", path="*", count=3)
            rotation.run("testSecret", SECRET, token)
            rotation.run("finishSecret", SECRET, token)

        self.act(steps)

    @rule(twice=st.booleans())
    @recorded
    def consent(self, twice: bool) -> None:
        self._consent(twice=twice)

    @rule()
    @recorded
    def revoke(self) -> None:
        def run() -> None:
            revoke_connection(self.store, self.client, NAME, self.now)

        self.act(run)

    @rule()
    @recorded
    def servicenow_changes_client_secret(self) -> None:
        """A ServiceNow admin rotates the client secret without telling the stack: the next refresh is refused."""
        self.client_secret = f"model-client-secret-{len(self.events)}-{self.now.timestamp():.0f}"
        self.emulator.set_client_secret(CLIENT_ID, self.client_secret)

    @rule()
    @recorded
    def operator_fixes_client_secret(self) -> None:
        with suppress(ServiceNowOAuthError, ClientError, BotoCoreError):  # a failed CLI call: nothing changed
            self.store.update(NAME, lambda c: replace(c, client_secret=self.client_secret))

    @rule()
    @recorded
    def operator_stages_client_secret(self) -> None:
        """The documented rollover: stage the new secret, then change it in ServiceNow."""
        new = f"model-client-secret-staged-{self.now.timestamp():.0f}"
        with suppress(ServiceNowOAuthError, ClientError, BotoCoreError):
            self.store.update(NAME, lambda c: replace(c, extra={**c.extra, "clientSecretNext": new}))
            self.client_secret = new
            self.emulator.set_client_secret(CLIENT_ID, new)

    @rule()
    @recorded
    def operator_sets_new_refresh_token(self) -> None:
        """An operator pastes a refresh token minted by hand (revoking the stored one, as the README says)."""
        app = Connection(NAME, self.emulator.url, CLIENT_ID, self.client_secret).app
        try:
            token = self.client.password_grant(app, username="svc.integration", password="Pa55w0rd-model")
        except ServiceNowOAuthError:
            return
        self.operator_tokens.add(token.refresh_token or "")
        replaced: list[str | None] = []  # the refresh token the write replaced (a candidate's, once adopted)

        def paste(connection: Connection) -> Connection:
            replaced.append(connection.refresh_token)
            return connection.with_token(token, grant="password", now=self.now)

        try:
            self.store.update(NAME, paste)
        except (ServiceNowOAuthError, ClientError, BotoCoreError):  # a failed paste: the operator revokes it
            with suppress(ServiceNowOAuthError):
                self.client.revoke(app, token.refresh_token or "")
            return
        old = replaced[-1]
        if old:
            with suppress(ServiceNowOAuthError):
                self.client.revoke(app, old)
        self._renewed_by_a_person()
        self.unseen = False

    @rule(fault=st.sampled_from(DOWN_FAULTS))
    @recorded
    def instance_goes_down(self, fault: str) -> None:
        self.down = fault
        self.faults_since_renewal += 2  # an outage is more than one blip

    @rule()
    @recorded
    def instance_recovers(self) -> None:
        self.down = None

    @rule(fault=st.sampled_from(BLIPS))
    @recorded
    def blip_on_next_attempt(self, fault: str) -> None:
        self.blip = fault
        self.faults_since_renewal += 1

    @rule(group=st.sampled_from(tuple(SM_GROUPS)), count=st.integers(1, 12))
    @recorded
    def secrets_manager_throttles(self, group: str, count: int) -> None:
        self.faults.pending[group] += count
        self.faults_since_renewal += count  # each refused call is one failure, as AWS's retries are spent

    @rule(group=st.sampled_from(tuple(SM_GROUPS)), landed=st.booleans())
    @recorded
    def secrets_manager_times_out(self, group: str, landed: bool) -> None:
        self.faults.time_out[group] = landed
        self.faults_since_renewal += 1

    @rule()
    @recorded
    def secrets_manager_recovers(self) -> None:
        self.faults.pending.clear()
        self.faults.time_out.clear()

    @rule()
    @recorded
    def container_recycled(self) -> None:
        """Lambda starts a new container: whatever the old one kept in memory (health whose tag write failed)
        is gone; the next run starts from the tags."""
        arn = self.plain.describe_secret(SecretId=SECRET)["ARN"]
        if self.monitor.unsaved(arn):
            self.memory_lost_at.append(len(self.events))
        self.monitor = Monitor(self.sm, self.monitor.events, clock=lambda: self.now, policy=POLICY)

    @rule(down=st.booleans())
    @recorded
    def eventbridge(self, down: bool) -> None:
        self.faults.events_down = down

    @rule(down=st.booleans())
    @recorded
    def appflow(self, down: bool) -> None:
        self.faults.appflow_down = down

    @precondition(lambda self: self.down is not None)
    @rule()
    @recorded
    def hours_of_outage(self) -> None:
        """Six hours of sweeps against a down instance, whatever else is pending (AppFlow, warnings): the
        model's checks run once at the end, the request count of every sweep goes to `bounded_cost`."""
        version = self.current()[0]
        parked = self.parked_version == version
        made_total = 0
        for _ in range(int(OUTAGE / SWEEP)):
            self.now += timedelta(seconds=SWEEP)
            self.emulator.clear_faults()
            self.emulator.inject(self.down or "hibernate", count=10_000, retry_after=0)
            before = self.emulator.token_requests()
            with suppress(ServiceNowOAuthError, ClientError, BotoCoreError):
                Sweep(self.refresher()).run()
            made = self.emulator.token_requests() - before
            self.down_requests.append((self.now, made))
            made_total += made
        self.emulator.clear_faults()
        self.waiting_since = None  # the instance was down all along: the wait for an attempt starts at recovery
        Stats.checks += 1
        if parked and self.current()[0] == version:
            assert made_total == 0, "a refused credential was retried before its secret changed"

    # ------------------------------------------------------------------ invariants
    @invariant()
    def no_lost_credential_and_no_unknown_live_token(self) -> None:
        """The refresh token ServiceNow honours is stored (AWSCURRENT, or a candidate the next run adopts),
        and every refresh token the stack was issued is stored or revoked."""
        Stats.steps += 1  # invariants run after every step
        if not self.created or not self.ran_code:
            return  # nothing ran (and no time passed) since the last look
        Stats.checks += 1
        unknown = self.emulator.live_refresh_tokens(CLIENT_ID) - self.operator_tokens - self.stored_refresh_tokens()
        assert not (unknown - self.unseen_tokens), f"{len(unknown)} live refresh token(s) are stored nowhere"

    @invariant()
    def writes_only_in_the_primary(self) -> None:
        """With or without a replica region, every write and tag write goes to the primary region."""
        Stats.checks += 1
        assert self.faults.write_regions <= {REGION}, f"wrote in {sorted(self.faults.write_regions - {REGION})}"

    @invariant()
    def bounded_cost(self) -> None:
        """A failing connection makes at most 40 token requests in any 24 hours of failing (a consent or an
        operator's new token renews it: the count starts over)."""
        Stats.checks += 1
        window = [made for when, made in self.down_requests if self.now - when < timedelta(days=1)]
        assert sum(window) <= MAX_DAILY_REQUESTS, f"{sum(window)} token requests in 24 h while the instance was down"

    @invariant()
    def one_event_per_change(self) -> None:
        """Exactly one event per state change: never the same alert twice without a change in between, except
        across a container recycled while its tag writes were refused (the README's documented limit)."""
        Stats.checks += 1
        for n, (first, second) in enumerate(zip(self.events, self.events[1:], strict=False)):
            forgotten = any(n < boundary <= n + 1 for boundary in self.memory_lost_at)
            assert forgotten or not (first == second and first in ("failing", "recovered")), f"{first} announced twice"

    @invariant()
    def no_expiry_from_one_blip(self) -> None:
        """With default settings one transient failure never lets the stored access token expire while the
        instance is healthy again."""
        if self.down or self.unseen or self.faults_since_renewal > 1 or not self.created or not self.ran_code:
            return
        version, connection = self.look()
        if connection.status != "active" or self.parked_version == version or not connection.access_token:
            return
        if sum(self.faults.pending.values()) or self.faults.time_out:
            return  # Secrets Manager refusing writes is its own failure, counted by write_failed
        Stats.checks += 1
        expires = connection.access_token_expires_at
        assert expires is None or expires > self.now, "the access token expired after a single blip"


def replay_history(history: str, echo: Any = None) -> str | None:
    """Run one recorded history (`rule(arg=value) → ...`, as the soak reports a violation) with every invariant
    after each step; returns the first violation, or None. Makes a soak finding a plain, repeatable case."""
    model = LifecycleModel()
    cls = type(model)
    marked = [name for name in dir(cls) if getattr(getattr(cls, name), "hypothesis_stateful_invariant", None)]
    checks = [getattr(model, name) for name in marked]
    try:
        for step in (part.strip() for part in history.split("→")):
            call = ast.parse(step, mode="eval").body
            assert isinstance(call, ast.Call) and isinstance(call.func, ast.Name), f"not a rule call: {step}"
            arguments = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
            if echo:
                echo(step)
            try:
                getattr(cls, call.func.id)(model, **arguments)  # by class: `appflow` is also an attribute
                for check in checks:
                    check()
            except AssertionError as violation:
                return f"{violation} (at {step})"
        return None
    finally:
        model.teardown()
