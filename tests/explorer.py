"""Every interleaving of two writers on one connection, explored call by call (CHESS's preemption bounding).

The model (`tests/lifecycle_model.py`) runs whole actions one after another, so it almost never puts two
writers' calls in the order that breaks them. Here each writer (a sweep, the SQS worker, rotation, a callback,
the CLI's writes, a revoke) is the real code in its own thread, and one scheduler owns the order: every AWS call
and every ServiceNow request is a yield point, before it is sent and after it landed, and only the task the
scheduler picked runs. A schedule is the list of the scheduler's choices, so any finding replays exactly.

A choice at a yield point is to go on (the default), to switch to another writer (a preemption), or to fail the
call (a fault: timed out before landing, throttled, or landed with its answer lost; for ServiceNow, the
hibernation page or an answer lost after it processed the grant). `explore` enumerates every schedule whose
preemptions and faults stay within a bound (depth first; each schedule is named by the choices where it leaves
the default, in order). After each schedule the README's guarantees are checked, then the connection lives on
for a simulated day of sweeps with nothing failing: it must be healthy, or parked only where ServiceNow really
refuses what is stored; while failing it makes at most 40 token requests; no live refresh token is unknown.

AWS is moto in this process (`mock_aws`): the same backend and version-stage rules as the moto server, 3.2x
faster a call (benchmarks/RESULTS.md). ServiceNow is the emulator, a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ReadTimeoutError
from moto import mock_aws
from moto.core.config import default_user_config
from urllib3 import PoolManager

from core.consent import complete_consent, start_consent
from core.errors import ServiceNowOAuthError
from core.health import CANDIDATE, Health
from core.lifecycle import RefreshPolicy, State, plan, state_of
from core.monitor import Monitor
from core.refresh import Refresher
from core.revoke import revoke_connection
from core.rotation import Rotation
from core.secret import Connection, parse_connection
from core.servicenow import HEADERS, ServiceNowClient, retry_policy
from core.signing import sign_authorize_link
from core.store import ConnectionStore
from core.sweep import Sweep
from local.servicenow_emulator import ServiceNowEmulator, press_consent

REGION = "us-east-1"
PREFIX = "servicenow-oauth/"
NAME = "prod"
SECRET = PREFIX + NAME
CLIENT_ID = "7f3c0a7e9b2d4c6e8a0b1c2d3e4f5a6b"
REDIRECT = "http://127.0.0.1:9/callback"
STATE_KEY = b"explorer-state-key-0123456789abcd"
POLICY = RefreshPolicy()
START = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
DUE_AFTER = timedelta(minutes=25)  # the consented access token (30 min) is due for refresh (10 min leeway)
DAY = timedelta(days=1)
MAX_DAILY_REQUESTS = 40  # the README's bound for a failing connection
MODES = ("default", "rotating")

SM_READS = frozenset({"GetSecretValue", "BatchGetSecretValue", "DescribeSecret", "ListSecrets"})
SM_WRITES = frozenset({"PutSecretValue", "UpdateSecretVersionStage", "TagResource", "UntagResource"})
AWS_FAULTS = ("timeout", "throttle")  # before the call lands
LOST = "lost"  # a write that landed, its answer lost (for a read that is the same as a timeout: not explored)
SN_FAULTS = ("hibernate", "lost")  # ServiceNow: the hibernation page; the grant processed and its answer lost


class Violation(AssertionError):
    """A guarantee broken by one schedule."""


class Nondeterminism(RuntimeError):
    """A replayed prefix reached a different decision point: the run is not deterministic (a bug here)."""


# ---------------------------------------------------------------------------------------------- the scheduler
@dataclass(frozen=True)
class Point:
    """One decision: where it was taken, what could have been chosen (with its cost), and what was."""

    index: int
    task: str
    label: str
    options: tuple[tuple[str, int, int], ...]  # (choice, preemptions, faults); the first is the default
    chosen: str


@dataclass(frozen=True)
class Deviation:
    index: int
    choice: str
    preemptions: int
    faults: int


class Scheduler:
    """Runs the tasks one at a time: a task runs until its next yield point, where `decide` picks who goes on."""

    def __init__(self, deviations: tuple[Deviation, ...] = ()) -> None:
        self.deviations = {deviation.index: deviation.choice for deviation in deviations}
        self.points: list[Point] = []
        self.cond = threading.Condition()
        self.order: list[str] = []
        self.done: set[str] = set()
        self.current: str | None = None
        self.errors: dict[str, BaseException] = {}
        self.faults: list[tuple[str, str, str]] = []  # (task, call, fault) as injected

    def _decide(self, task: str, label: str, options: list[tuple[str, int, int]]) -> str:
        index = len(self.points)
        choice = self.deviations.get(index, options[0][0])
        if choice not in [option[0] for option in options]:
            raise Nondeterminism(f"decision {index} ({task}: {label}) has no option {choice!r}")
        self.points.append(Point(index, task, label, tuple(options), choice))
        return choice

    def point(self, label: str, faults: tuple[str, ...]) -> str:
        """A yield point of the running task: returns the fault to inject into its call ("ok" for none)."""
        with self.cond:
            me = self.current
            assert me is not None, "a yield point outside any task"
            others = [task for task in self.order if task != me and task not in self.done]
            options = [("ok", 0, 0)] + [(kind, 0, 1) for kind in faults] + [(task, 1, 0) for task in others]
            choice = self._decide(me, label, options)
            if choice in others:
                self.current = choice
                self.cond.notify_all()
                self._wait(me)
                # Resumed where it was preempted: its call may still fail.
                choice = self._decide(me, label + " (resumed)", [("ok", 0, 0)] + [(kind, 0, 1) for kind in faults])
            if choice != "ok":
                self.faults.append((me, label, choice))
            return choice

    def _wait(self, task: str) -> None:
        if not self.cond.wait_for(lambda: self.current == task, timeout=60):
            raise RuntimeError(f"task {task} waited a minute for its turn (a writer blocked outside a yield point)")

    def _finished(self, task: str) -> None:
        with self.cond:
            self.done.add(task)
            left = [name for name in self.order if name not in self.done]
            self.current = self._decide(task, "finished", [(name, 0, 0) for name in left]) if left else None
            self.cond.notify_all()

    def run(self, tasks: dict[str, Callable[[], Any]]) -> None:
        self.order = list(tasks)

        def body(name: str, function: Callable[[], Any]) -> None:
            with self.cond:
                self._wait(name)
            try:
                function()
            except BaseException as error:  # a failed invocation: Lambda reports it; judged by the checks
                self.errors[name] = error
            finally:
                self._finished(name)

        threads = [threading.Thread(target=body, args=item, name=f"task-{item[0]}", daemon=True) for item in tasks.items()]
        for thread in threads:
            thread.start()
        with self.cond:
            self.current = self._decide("-", "start", [(name, 0, 0) for name in self.order])
            self.cond.notify_all()
        for thread in threads:
            thread.join(timeout=120)
            if thread.is_alive():
                raise RuntimeError(f"{thread.name} did not finish")


# --------------------------------------------------------------------------------------------------- the world
class World:
    """One process's AWS (moto, in process) and hooked clients; a fresh ServiceNow and secret per schedule."""

    def __init__(self) -> None:
        self.scheduler: Scheduler | None = None
        self.now = START
        self.events: list[str] = []
        self.kms_denied: set[str] = set()  # KMS keys whose key policy does not let the refresher sign (a world fact)
        self._clients: dict[str, Any] = {}
        self.plain = boto3.client("secretsmanager", region_name=REGION)  # the explorer's eyes: no yields, no faults
        self.emulator: ServiceNowEmulator | None = None

    # ------------------------------------------------------------------ hooked clients (built once per process)
    def client(self, service: str) -> Any:
        if service not in self._clients:
            config = Config(retries={"mode": "standard", "max_attempts": 1})
            client = boto3.client(service, region_name=REGION, config=config)
            service_id = client.meta.service_model.service_id.hyphenize()
            client.meta.events.register(f"before-call.{service_id}.*", self._before)
            client.meta.events.register(f"after-call.{service_id}.*", self._after)
            if service == "events":
                client.meta.events.register("before-parameter-build.eventbridge.PutEvents", self._record_events)
            self._clients[service] = client
        return self._clients[service]

    def _before(self, model: Any, params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        name = model.name
        if name == "Sign" and params.get("KeyId") in self.kms_denied:
            return _error("AccessDeniedException", name)
        if self.scheduler is None or name not in SM_READS | SM_WRITES | {"PutEvents"}:
            return None
        fault = self.scheduler.point(f"{name} sent", AWS_FAULTS if name in SM_READS | SM_WRITES else ())
        if fault == "timeout":
            raise ReadTimeoutError(endpoint_url="https://secretsmanager.us-east-1.amazonaws.com/")
        if fault == "throttle":
            return _error("ThrottlingException", name)
        return None

    def _after(self, model: Any, http_response: Any = None, **_: Any) -> None:
        name = model.name
        if self.scheduler is None or name not in SM_READS | SM_WRITES | {"PutEvents"}:
            return
        if http_response is None or http_response.url == "http://explorer":
            return  # refused by `_before` itself: it never landed
        fault = self.scheduler.point(f"{name} landed", (LOST,) if name in SM_WRITES else ())
        if fault == LOST:
            raise ReadTimeoutError(endpoint_url="https://secretsmanager.us-east-1.amazonaws.com/")

    def _record_events(self, params: dict[str, Any], **_: Any) -> None:
        self.events.extend(json.loads(entry["Detail"])["change"] for entry in params.get("Entries", []))

    def servicenow_request(self, method: str, url: str) -> None:
        """A ServiceNow request's yield point: the fault chosen is queued in the emulator for this very request
        (the only one in flight: every other task waits at a yield point)."""
        if self.scheduler is None or self.emulator is None:
            return
        path = urlsplit(url).path
        fault = self.scheduler.point(f"ServiceNow {method} {path}", SN_FAULTS)
        if fault != "ok":
            self.emulator.inject(fault, path=path, count=1, retry_after=0)

    def servicenow_answered(self, method: str, url: str) -> None:
        if self.scheduler is not None:
            self.scheduler.point(f"ServiceNow {method} {urlsplit(url).path} answered", ())

    def clock(self) -> datetime:
        return self.now


def _error(code: str, operation: str) -> tuple[AWSResponse, dict[str, Any]]:
    parsed = {"Error": {"Code": code, "Message": f"{operation} refused by the explorer"}, "ResponseMetadata": {}}
    return AWSResponse("http://explorer", 400, {}, None), parsed


class _YieldingPool(PoolManager):
    """The ServiceNow client's session with a yield point before each request and after its answer."""

    def __init__(self, world: World, *, replay: bool) -> None:
        retries = retry_policy(replay=replay, backoff_factor=0.001, backoff_max=0.01)
        super().__init__(num_pools=4, maxsize=4, retries=retries, headers=HEADERS)
        self.world = world

    def urlopen(self, method: str, url: str, redirect: bool = True, **kw: Any) -> Any:  # type: ignore[override]
        self.world.servicenow_request(method, url)
        try:
            return super().urlopen(method, url, redirect=redirect, **kw)
        finally:
            self.world.servicenow_answered(method, url)


@dataclass
class Container:
    """One Lambda container (or the operator's CLI): its own store, ServiceNow client, health memory."""

    world: World
    store: ConnectionStore = field(init=False)
    client: ServiceNowClient = field(init=False)
    monitor: Monitor = field(init=False)
    refresher: Refresher = field(init=False)

    def __post_init__(self) -> None:
        world = self.world
        sm = world.client("secretsmanager")
        self.store = ConnectionStore(sm, prefix=PREFIX, allowed_hosts=("127.0.0.1",), sleep=lambda _: None)
        self.client = ServiceNowClient(
            _YieldingPool(world, replay=True),
            single_shot=_YieldingPool(world, replay=False),
            clock=world.clock,
            timeout=(2, 5),
        )
        self.monitor = Monitor(sm, world.client("events"), clock=world.clock, policy=POLICY)
        from core.jwt_bearer import KmsSigner

        self.refresher = Refresher(
            self.store,
            self.client,
            clock=world.clock,
            policy=POLICY,
            monitor=self.monitor,
            signer=KmsSigner(world.client("kms")),
        )


# ------------------------------------------------------------------------------------------------- the writers
@dataclass
class Setup:
    """What a scenario's writers share, prepared before the schedule starts (no yields)."""

    world: World
    mode: str
    kind: str  # "code" (authorization_code), "refused" (ServiceNow changed the client secret), "jwt"
    client_secret: str = "explorer-client-secret-A1"
    consent: dict[str, Any] = field(default_factory=dict)  # the authorize redirect the callbacks share
    codes: list[dict[str, str]] = field(default_factory=list)
    rotation_token: str | None = None
    operator_tokens: set[str] = field(default_factory=set)
    containers: list[Container] = field(default_factory=list)

    def container(self) -> Container:
        self.containers.append(Container(self.world))
        return self.containers[-1]


def sweep(setup: Setup) -> Callable[[], Any]:
    """EventBridge's scheduled sweep in its own container."""
    container = setup.container()
    return lambda: Sweep(container.refresher).run()


def worker(setup: Setup) -> Callable[[], Any]:
    """The SQS worker: re-reads the queued connection and refreshes it (handlers/worker.py)."""
    container = setup.container()
    return lambda: container.refresher.safe_refresh(container.store.get_latest(NAME))


def rotation(setup: Setup) -> Callable[[], Any]:
    """Secrets Manager's rotation: the four steps, as the service calls them, one after another."""
    container = setup.container()
    if setup.rotation_token is None:
        setup.rotation_token = _start_rotation(setup.world)
    token = setup.rotation_token

    def run() -> None:
        steps = Rotation(container.refresher, _Quiet())
        for step in ("createSecret", "setSecret", "testSecret", "finishSecret"):
            steps.run(step, SECRET, token)

    return run


def callback(setup: Setup) -> Callable[[], Any]:
    """ServiceNow's redirect to /callback with a code (two callbacks with one state: a double callback)."""
    container = setup.container()
    if not setup.consent:
        store = ConnectionStore(setup.world.plain, prefix=PREFIX, allowed_hosts=("127.0.0.1",))
        link = urlsplit(sign_authorize_link(STATE_KEY, "http://api", NAME, setup.world.now))
        query = {key: values[0] for key, values in parse_qs(link.query).items()}
        setup.consent["location"] = start_consent(
            store, STATE_KEY, NAME, expires=query["expires"], signature=query["signature"], callback_url=REDIRECT,
            now=setup.world.now,
        )
    redirect = press_consent(setup.consent["location"])
    setup.codes.append(redirect)

    def run() -> None:
        stored = complete_consent(
            container.store,
            container.client,
            STATE_KEY,
            state=redirect.get("state"),
            code=redirect.get("code"),
            error=None,
            callback_url=REDIRECT,
            now=setup.world.now,
        )
        container.monitor.after_consent(stored)

    return run


def stage_secret(setup: Setup) -> Callable[[], Any]:
    """`make stage-secret`: the next client secret staged (rollover), then changed in ServiceNow."""
    container = setup.container()
    new = f"explorer-client-secret-staged-{len(setup.containers)}"

    def run() -> None:
        container.store.update(NAME, lambda c: replace(c, extra={**c.extra, "clientSecretNext": new}))

    return run


def fix_secret(setup: Setup) -> Callable[[], Any]:
    """An operator writes the client secret ServiceNow now has (after ServiceNow's admin changed it)."""
    container = setup.container()
    return lambda: container.store.update(NAME, lambda c: replace(c, client_secret=setup.client_secret))


def paste(setup: Setup) -> Callable[[], Any]:
    """An operator pastes a refresh token minted by hand, then revokes the one the write replaced (README)."""
    container = setup.container()

    def run() -> None:
        app = Connection(NAME, setup.world.emulator.url, CLIENT_ID, setup.client_secret).app  # type: ignore[union-attr]
        token = container.client.password_grant(app, username="svc.integration", password="Pa55w0rd-explorer")
        setup.operator_tokens.add(token.refresh_token or "")
        replaced: list[str | None] = []

        def write(connection: Connection) -> Connection:
            replaced.append(connection.refresh_token)
            return connection.with_token(token, grant="password", now=setup.world.now)

        try:
            container.store.update(NAME, write)
        except (ServiceNowOAuthError, ClientError, BotoCoreError):
            with suppress(ServiceNowOAuthError):
                container.client.revoke(app, token.refresh_token or "")
            raise
        if replaced[-1]:
            with suppress(ServiceNowOAuthError):
                container.client.revoke(app, replaced[-1])

    return run


def revoke(setup: Setup) -> Callable[[], Any]:
    """`make revoke`: revoke in ServiceNow, then clear the tokens."""
    container = setup.container()
    return lambda: revoke_connection(container.store, container.client, NAME, setup.world.now)


WRITERS: dict[str, Callable[[Setup], Callable[[], Any]]] = {
    "sweep": sweep,
    "worker": worker,
    "rotation": rotation,
    "callback": callback,
    "stage_secret": stage_secret,
    "paste": paste,
    "revoke": revoke,
    "fix_secret": fix_secret,
}


class _Quiet:
    def info(self, *_: Any, **__: Any) -> None:
        pass

    warning = error = info


def _start_rotation(world: World) -> str:
    """Secrets Manager's part of `rotate-secret`: a rotation Lambda (moto registers it, never runs it) and the
    AWSPENDING version id; the writer then runs the real steps."""
    default_user_config["lambda"]["use_docker"] = False
    functions = boto3.client("lambda", region_name=REGION)
    try:
        arn = functions.get_function(FunctionName="rotation")["Configuration"]["FunctionArn"]
    except ClientError:
        role = boto3.client("iam", region_name=REGION).create_role(RoleName="rotation", AssumeRolePolicyDocument="{}")
        import io
        import zipfile

        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as zipped:
            zipped.writestr("handlers/rotation.py", "# stand-in: moto registers it, the explorer runs the real one\n")
        arn = functions.create_function(
            FunctionName="rotation",
            Runtime="python3.12",
            Role=role["Role"]["Arn"],
            Handler="handlers.rotation.lambda_handler",
            Code={"ZipFile": archive.getvalue()},
        )["FunctionArn"]
    token = "a0000000-0000-4000-8000-000000000001"
    world.plain.rotate_secret(
        SecretId=SECRET,
        RotationLambdaARN=arn,
        RotationRules={"AutomaticallyAfterDays": 1},
        RotateImmediately=True,
        ClientRequestToken=token,
    )
    return token


# ----------------------------------------------------------------------------------------------- the scenarios
@dataclass(frozen=True)
class Scenario:
    """A world and the writers that race in it."""

    kind: str
    writers: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.kind}:{'+'.join(self.writers)}"

    @classmethod
    def parse(cls, name: str) -> Scenario:
        kind, writers = name.split(":")
        return cls(kind, tuple(writers.split("+")))


CODE_WRITERS = ("sweep", "worker", "rotation", "callback", "stage_secret", "paste", "revoke")


def scenarios() -> list[Scenario]:
    """Every pair of writers of an authorization-code connection (two callbacks: a double callback), and the
    pairs around a refusal: ServiceNow's admin changed the client secret, so a refresher's 401 marks the
    connection while an operator fixes it, a consent lands, or another refresher runs."""
    pairs = [
        Scenario("code", (first, second))
        for n, first in enumerate(CODE_WRITERS)
        for second in CODE_WRITERS[n:]
        if not (first == second and first in ("rotation", "stage_secret"))
    ]
    refused = [Scenario("refused", ("sweep", other)) for other in ("fix_secret", "callback", "worker", "sweep")]
    return pairs + refused


# ------------------------------------------------------------------------------------------------ one schedule
@dataclass
class Run:
    """What one schedule did and what the checks found."""

    points: list[Point]
    problem: str | None
    errors: dict[str, str]


class Explorer:
    """Runs schedules in one process's moto; `with Explorer() as explorer: explorer.explore(...)`."""

    def __init__(self) -> None:
        self._mock = mock_aws()

    def __enter__(self) -> Explorer:
        self._mock.start()
        self.world = World()
        world = self.world
        self.emulator = ServiceNowEmulator(clock=lambda: world.now.timestamp()).__enter__()
        return self

    def __exit__(self, *_: Any) -> None:
        self.emulator.__exit__(None, None, None)
        self._mock.stop()

    @contextmanager
    def _fresh(self, scenario: Scenario, mode: str) -> Iterator[Setup]:
        from moto.backends import get_backend

        for service in ("secretsmanager", "events"):
            get_backend(service).reset()  # type: ignore[no-untyped-call]
        world = self.world
        world.now, world.events, world.scheduler = START, [], None
        emulator = self.emulator
        emulator.reset(rotate_refresh_tokens=mode == "rotating")
        world.emulator = emulator
        setup = Setup(world, mode, scenario.kind)
        emulator.register_client(CLIENT_ID, setup.client_secret, [REDIRECT])
        emulator.add_user("svc.integration", "Pa55w0rd-explorer")
        self._connect(setup)
        yield setup

    def _connect(self, setup: Setup) -> None:
        """The connection as it stands before the writers start: consented, its access token due."""
        world = setup.world
        document = {
            "instanceUrl": world.emulator.url,  # type: ignore[union-attr]
            "clientId": CLIENT_ID,
            "clientSecret": setup.client_secret,
            "redirectUri": REDIRECT,
            "status": "pending_authorization",
        }
        world.plain.create_secret(Name=SECRET, SecretString=json.dumps(document))
        consent = callback(setup)
        consent()
        setup.containers.clear()
        setup.consent.clear()
        setup.codes.clear()
        world.now += DUE_AFTER
        if setup.kind == "refused":
            setup.client_secret = "explorer-client-secret-changed-B2"
            world.emulator.set_client_secret(CLIENT_ID, setup.client_secret)  # type: ignore[union-attr]

    def run(self, scenario: Scenario, mode: str, deviations: tuple[Deviation, ...] = ()) -> Run:
        with self._fresh(scenario, mode) as setup:
            world = setup.world
            tasks = {f"{n}.{writer}": WRITERS[writer](setup) for n, writer in enumerate(scenario.writers, 1)}
            scheduler = Scheduler(deviations)
            world.scheduler = scheduler
            try:
                scheduler.run(tasks)
            finally:
                world.scheduler = None
            errors = {task: type(error).__name__ for task, error in scheduler.errors.items()}
            try:
                self._check(setup, scheduler)
                problem = None
            except Violation as violation:
                problem = str(violation)
            return Run(scheduler.points, problem, errors)

    # ------------------------------------------------------------------------------------------ the guarantees
    def _check(self, setup: Setup, scheduler: Scheduler) -> None:
        for task, error in scheduler.errors.items():
            if not isinstance(error, ServiceNowOAuthError | ClientError | BotoCoreError):
                raise Violation(f"{task} crashed with {type(error).__name__}")
        rotating = setup.mode == "rotating"
        # The README's two documented losses (rotating mode only): a refresh's answer lost after ServiceNow
        # rotated the token, and a write of the rotated token that timed out before it landed.
        documented = rotating and any(
            (fault == "lost" and "oauth_token.do" in label) or (fault == "timeout" and label == "PutSecretValue sent")
            for _, label, fault in scheduler.faults
        )
        self._no_unknown_live_token(setup, documented, "after the writers")
        self._a_day_later(setup, documented)
        self._no_unknown_live_token(setup, documented, "a day later")
        self._events_tell_the_truth(setup)

    def _stored(self) -> tuple[str, Connection, set[str | None]]:
        """AWSCURRENT (version, connection) and every refresh token stored: AWSCURRENT's and a candidate's."""
        plain = self.world.plain
        read = plain.get_secret_value(SecretId=SECRET, VersionStage="AWSCURRENT")
        current = parse_connection(NAME, read["SecretString"], ("127.0.0.1",))
        stored = {current.refresh_token}
        for version, labels in plain.describe_secret(SecretId=SECRET)["VersionIdsToStages"].items():
            if CANDIDATE in labels:
                value = plain.get_secret_value(SecretId=SECRET, VersionId=version)["SecretString"]
                stored.add(json.loads(value).get("refreshToken"))
        return read["VersionId"], current, stored

    def _no_unknown_live_token(self, setup: Setup, documented: bool, when: str) -> None:
        live = self.world.emulator.live_refresh_tokens(CLIENT_ID)  # type: ignore[union-attr]
        unknown = live - setup.operator_tokens - self._stored()[2]
        if unknown and not documented:
            raise Violation(f"{when}: {len(unknown)} live refresh token(s) stored nowhere")

    def _health(self) -> tuple[Health, dict[str, list[str]]]:
        described = self.world.plain.describe_secret(SecretId=SECRET)
        return Health.from_tags(described.get("Tags", [])), described["VersionIdsToStages"]

    def _verdict(self, setup: Setup) -> str:
        """"healthy", "parked" (ServiceNow refuses what is stored, and the tags say a person must act), or what
        is wrong."""
        version, connection, _ = self._stored()
        health, stages = self._health()
        state = state_of(health) if health.version == version else None
        live = connection.refresh_token in self.world.emulator.live_refresh_tokens(CLIENT_ID)  # type: ignore[union-attr]
        honoured = live and connection.client_secret == setup.client_secret
        expires = connection.access_token_expires_at
        if (
            connection.status == "active"
            and state is State.HEALTHY
            and honoured
            and expires is not None
            and expires > self.world.now
            and not any(CANDIDATE in labels and "AWSCURRENT" not in labels for labels in stages.values())
        ):
            return "healthy"
        if connection.status == "reauthorization_required" and state is State.REJECTED and not honoured:
            return "parked"
        return (
            f"status {connection.status}, health {state.value if state else 'for another version'}, "
            f"stored credential {'honoured' if honoured else 'refused'} by ServiceNow, access token "
            f"{'valid' if expires and expires > self.world.now else 'expired'}"
        )

    def _a_day_later(self, setup: Setup, documented: bool) -> None:
        """A simulated day of sweeps every 5 minutes, nothing failing: healthy again after a refresh, or parked
        only where ServiceNow refuses the stored credential; a failing stretch costs at most 40 token requests.
        Sweeps the listing settles (not due, backing off, needs a person) make no call: they are skipped."""
        world = setup.world
        emulator = world.emulator
        assert emulator is not None
        container = Container(world)  # another container: the writers' health memory is theirs
        before = emulator.token_requests()
        end = world.now + DAY
        entry = self._entry()
        refreshed = False
        while world.now < end:
            world.now += POLICY.interval
            if plan(entry, world.now, POLICY) != "read" and not container.monitor.unsaved(entry["ARN"]):
                continue
            outcomes = Sweep(container.refresher).run()
            refreshed = refreshed or any(outcome.result == "refreshed" for outcome in outcomes)
            entry = self._entry()
            if refreshed and self._verdict(setup) == "healthy":
                return
        verdict = self._verdict(setup)
        made = emulator.token_requests() - before
        if verdict not in ("healthy", "parked") and not (documented and "refused" in verdict):
            raise Violation(f"a day later: {verdict}")
        if verdict != "healthy" and made > MAX_DAILY_REQUESTS:
            raise Violation(f"a day later: {made} token requests in a day without getting healthy")

    def _entry(self) -> dict[str, Any]:
        listing = self.world.plain.list_secrets(Filters=[{"Key": "name", "Values": [SECRET]}])["SecretList"]
        return dict(listing[0])

    def _events_tell_the_truth(self, setup: Setup) -> None:
        """One event per change, and the last word is true: a healthy connection's last state event is not
        'reauthorization required' or 'failing' (an operator paged for nothing, never told it recovered)."""
        events = self.world.events
        for first, second in zip(events, events[1:], strict=False):
            if first == second and first in ("failing", "recovered", "reauthorization_required"):
                raise Violation(f"{first} announced twice")
        states = [kind for kind in events if kind in ("authorized", "recovered", "reauthorization_required", "failing")]
        if states and states[-1] in ("reauthorization_required", "failing") and self._verdict(setup) == "healthy":
            raise Violation(f"the connection is healthy, but the last event announced was {states[-1]!r}")

    # -------------------------------------------------------------------------------------------- exploration
    def explore(
        self,
        scenario: Scenario,
        mode: str,
        *,
        preemptions: int,
        faults: int,
        on_violation: Callable[[str], None] | None = None,
    ) -> tuple[int, list[str]]:
        """Every schedule with at most `preemptions` preemptions and `faults` faults (depth first: each schedule
        is its deviations from the default, in order). Returns (schedules run, findings)."""
        stack: list[tuple[Deviation, ...]] = [()]
        runs, findings = 0, []
        while stack:
            deviations = stack.pop()
            result = self.run(scenario, mode, deviations)
            runs += 1
            if result.problem is not None:
                finding = f"{scenario.name} {mode} {format_deviations(deviations)}  # {result.problem}"
                findings.append(finding)
                if on_violation:
                    on_violation(finding)
            used_p = sum(deviation.preemptions for deviation in deviations)
            used_f = sum(deviation.faults for deviation in deviations)
            start = deviations[-1].index + 1 if deviations else 0
            for point in result.points[start:]:
                for choice, p, f in point.options[1:]:
                    if used_p + p <= preemptions and used_f + f <= faults:
                        stack.append((*deviations, Deviation(point.index, choice, p, f)))
        return runs, findings

    def replay(self, finding: str) -> Run:
        scenario, mode, deviations = parse_finding(finding)
        return self.run(scenario, mode, deviations)


def format_deviations(deviations: tuple[Deviation, ...]) -> str:
    return " ".join(f"{d.index}={d.choice}" for d in deviations) or "-"


def parse_finding(finding: str) -> tuple[Scenario, str, tuple[Deviation, ...]]:
    """`code:sweep+worker rotating 7=2.worker 15=timeout  # what broke` -> its scenario, mode and deviations."""
    text = finding.split("#", 1)[0].split()
    scenario, mode, steps = Scenario.parse(text[0]), text[1], text[2:]
    deviations = []
    for step in steps:
        if step == "-":
            continue
        index, choice = step.split("=", 1)
        preempt = int("." in choice)  # a task's name ("2.worker"); a fault's has no dot
        deviations.append(Deviation(int(index), choice, preempt, 1 - preempt))
    return scenario, mode, tuple(deviations)


def describe(run: Run) -> str:
    """The schedule as it ran: each decision, marked where it left the default."""
    lines = []
    for point in run.points:
        mark = "*" if point.chosen != point.options[0][0] else " "
        lines.append(f"{mark} {point.index:3} {point.task:14} {point.label:45} -> {point.chosen}")
    return "\n".join(lines)
