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

import contextlib
import itertools
import json
import os
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

from core.bounded import watched
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
from local.servicenow_emulator import ConsentForm, ServiceNowEmulator

try:
    from permissions import OPERATOR, acting_as
    from permissions import WRITERS as ROLES  # the function each writer stands for
except ImportError:  # make explore imports tests.explorer: nothing checks permissions there
    OPERATOR, ROLES = "operator", {}
    acting_as = lambda _actor: contextlib.nullcontext()  # noqa: E731

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
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
LOST = "lost"  # a write that landed, its answer lost (for a read that is the same as a timeout: not explored)
# Faults before a call lands, as the code tells them apart: a write retries a throttled call (ClientError) and
# not a timeout (BotoCoreError); reads and tag writes handle both alike, so one of them is explored.
FAULTS: dict[str, tuple[str, ...]] = {
    **{name: ("timeout",) for name in SM_READS},
    "PutSecretValue": ("timeout", "throttle"),
    "UpdateSecretVersionStage": ("timeout", "throttle"),
    "TagResource": ("throttle",),
    "UntagResource": ("throttle",),
}
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
    nth: int = 1  # the how-manieth time this task reached this label: with task and label, the point's name

    @property
    def key(self) -> tuple[str, str, int]:
        return self.task, self.label, self.nth


@dataclass(frozen=True)
class Deviation:
    """A choice other than the default at one decision point, named by task, label and occurrence (so a
    recorded schedule still replays when a writer makes calls elsewhere); `index` orders the search."""

    key: tuple[str, str, int]
    choice: str
    preemptions: int
    faults: int
    index: int = 0

    def __str__(self) -> str:
        task, label, nth = self.key
        return f"{task}:{label}@{nth}={self.choice}"


class Scheduler:
    """Runs the tasks one at a time: a task runs until its next yield point, where `decide` picks who goes on."""

    def __init__(self, deviations: tuple[Deviation, ...] = ()) -> None:
        self.deviations = {deviation.key: deviation.choice for deviation in deviations}
        self.reached: dict[tuple[str, str], int] = {}
        self.points: list[Point] = []
        self.cond = threading.Condition()
        self.order: list[str] = []
        self.done: set[str] = set()
        self.current: str | None = None
        self.errors: dict[str, BaseException] = {}
        self.faults: list[tuple[str, str, str]] = []  # (task, call, fault) as injected

    def _decide(self, task: str, label: str, options: list[tuple[str, int, int]]) -> str:
        nth = self.reached[(task, label)] = self.reached.get((task, label), 0) + 1
        choice = self.deviations.get((task, label, nth), options[0][0])
        if choice not in [option[0] for option in options]:
            raise Nondeterminism(f"{task} at {label!r} (the {nth}th time) has no option {choice!r}")
        self.points.append(Point(len(self.points), task, label, tuple(options), choice, nth))
        return choice

    def point(self, label: str, faults: tuple[str, ...], *, preemptible: bool = True) -> str:
        """A yield point of the running task: returns the fault to inject into its call ("ok" for none).

        After a call landed (`preemptible=False`) only a fault is chosen: until its next call the task computes on
        an answer already decided, so a switch there orders the shared calls exactly as one at its next call."""
        with self.cond:
            me = self.current
            assert me is not None, "a yield point outside any task"
            others = [task for task in self.order if task != me and task not in self.done] if preemptible else []
            if not faults and not others:
                return "ok"
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
                with acting_as(ROLES.get(name.split(".", 1)[-1], OPERATOR)):
                    function()
            except BaseException as error:  # a failed invocation: Lambda reports it; judged by the checks
                self.errors[name] = error
            finally:
                self._finished(name)

        threads = [
            threading.Thread(target=body, args=item, name=f"task-{item[0]}", daemon=True) for item in tasks.items()
        ]
        for thread in threads:
            thread.start()
        with self.cond:
            self.current = self._decide("-", "start", [(name, 0, 0) for name in self.order])
            self.cond.notify_all()
        for thread in threads:
            thread.join(timeout=120)
            if thread.is_alive():
                raise RuntimeError(f"{thread.name} did not finish")


@dataclass(frozen=True)
class Step:
    """One step of a schedule written by hand: `task` runs until it reaches yield point `until` for the `nth` time
    (to its end when None); when it next resumes, its call fails with `fault`."""

    task: str
    until: str | None = None
    nth: int = 1
    fault: str = "ok"


class Script(Scheduler):
    """A schedule written by hand as steps (the plain regression tests): readable, and independent of how many
    calls each writer makes elsewhere."""

    def __init__(self, *steps: Step) -> None:
        super().__init__()
        self.steps = list(steps)
        self.seen: dict[tuple[str, str], int] = {}
        self.fault_on_resume: dict[str, str] = {}

    def _decide(self, task: str, label: str, options: list[tuple[str, int, int]]) -> str:
        names = [option[0] for option in options]
        if label == "finished" and self.steps and self.steps[0] == Step(task):
            self.steps.pop(0)  # ran to its end, as the step said
        if label in ("start", "finished"):
            choice = self.steps[0].task if self.steps and self.steps[0].task in names else names[0]
        elif label.endswith(" (resumed)"):
            choice = self.fault_on_resume.pop(task, "ok")
        else:
            self.seen[(task, label)] = self.seen.get((task, label), 0) + 1
            step = self.steps[0] if self.steps else None
            choice = "ok"
            if step is not None and step.task == task and step.until == label and self.seen[(task, label)] == step.nth:
                self.steps.pop(0)
                if step.fault != "ok":
                    self.fault_on_resume[task] = step.fault
                following = self.steps[0].task if self.steps else None
                if following not in (None, task) and following not in names:
                    raise AssertionError(f"{task} cannot be preempted at {label!r} (after a call lands: use the next)")
                choice = following if following in names else (self.fault_on_resume.pop(task, "ok"))
        self.points.append(Point(len(self.points), task, label, tuple(options), choice))
        return choice


# --------------------------------------------------------------------------------------------------- the world
class World:
    """One process's AWS (moto, in process) and hooked clients; a fresh ServiceNow and secret per schedule."""

    def __init__(self) -> None:
        self.scheduler: Scheduler | None = None
        self.now = START
        self.events: list[str] = []
        self.kms_denied: set[str] = set()  # KMS keys whose key policy does not let the refresher sign (a world fact)
        self._clients: dict[str, Any] = {}
        # The README's documented losses: refresh tokens ServiceNow issued in an answer that was lost, and a rotated
        # token whose write timed out before it landed. Tokens each task obtained by a refresh grant, to tell which.
        self.unseen: set[str] = set()
        self.unrevoked: set[str] = set()
        self.rotated: dict[str, set[str]] = {}
        self.consented: dict[str, set[str]] = {}  # refresh tokens each task's code exchange obtained
        self.replacing: dict[str, set[str]] = {}  # refresh tokens a consent's writes were about to replace
        self._asked: dict[str, tuple[set[str], str, str | None]] = {}
        self.plain = boto3.client("secretsmanager", region_name=REGION)  # the explorer's eyes: no yields, no faults
        self.emulator: ServiceNowEmulator | None = None
        self.interrupts: list[tuple[str, Callable[[], Any]]] = []  # plain tests: (yield point, run this there)
        self.kms_keys: list[str] = []  # two RSA signing keys (KMS is never reset): the current and the next
        self.certificates: dict[str, str] = {}

    def jwt_keys(self) -> None:
        if self.kms_keys:
            return
        from admin.certificate import kms_certificate

        kms = boto3.client("kms", region_name=REGION)
        for _ in range(2):
            arn = kms.create_key(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
            self.kms_keys.append(arn)
            self.certificates[arn] = kms_certificate(kms, arn, "servicenow-oauth explorer", START)

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
        if name == "Sign" and json.loads(params.get("body") or b"{}").get("KeyId") in self.kms_denied:  # KMS is JSON
            return _error("AccessDeniedException", name)
        if self.scheduler is None:
            self._interrupted(f"{name} sent")
        if self.scheduler is None or name not in SM_READS | SM_WRITES | {"PutEvents"}:
            return None
        if name == "PutSecretValue" and (self.scheduler.current or "").endswith(".callback"):
            # What a consent's write replaces (its to revoke once stored), read before the write is sent.
            current = self.plain.get_secret_value(SecretId=SECRET, VersionStage="AWSCURRENT")["SecretString"]
            self.replacing.setdefault(self.scheduler.current or "", set()).add(json.loads(current).get("refreshToken"))
        fault = self.scheduler.point(f"{name} sent", FAULTS.get(name, ()))
        if fault == "timeout" and name == "PutSecretValue":
            self.unseen |= self.rotated.get(self.scheduler.current or "", set())
        if fault == "timeout":
            raise ReadTimeoutError(endpoint_url="https://secretsmanager.us-east-1.amazonaws.com/")
        if fault == "throttle":
            return _error("ThrottlingException", name)
        return None

    def _after(self, model: Any, http_response: Any = None, **_: Any) -> None:
        name = model.name
        if self.scheduler is None:
            self._interrupted(f"{name} landed")
        if self.scheduler is None or name not in SM_READS | SM_WRITES | {"PutEvents"}:
            return
        if http_response is None or http_response.url == "http://explorer":
            return  # refused by `_before` itself: it never landed
        fault = self.scheduler.point(f"{name} landed", (LOST,) if name in SM_WRITES else (), preemptible=False)
        if fault == LOST:
            raise ReadTimeoutError(endpoint_url="https://secretsmanager.us-east-1.amazonaws.com/")

    def _record_events(self, params: dict[str, Any], **_: Any) -> None:
        self.events.extend(json.loads(entry["Detail"])["change"] for entry in params.get("Entries", []))

    def servicenow_request(self, method: str, url: str, body: Any) -> None:
        """A ServiceNow request's yield point: the fault chosen is queued in the emulator for this very request
        (the only one in flight: every other task waits at a yield point)."""
        path = urlsplit(url).path
        if self.scheduler is None:
            self._interrupted(f"ServiceNow {method} {path}")
        if self.scheduler is None or self.emulator is None:
            return
        fault = self.scheduler.point(f"ServiceNow {method} {path}", SN_FAULTS)
        if fault != "ok":
            self.emulator.inject(fault, path=path, count=1, retry_after=0)
        form = parse_qs(body.decode() if isinstance(body, bytes) else "")
        grant = form.get("grant_type", [None])[0]
        task = self.scheduler.current or ""
        if fault != "ok" and path.endswith("revoke_token.do") and task.split(".")[-1] != "revoke":
            # The README's documented limit: a token nobody will store (the one a consent or a paste replaced, a
            # refresh's that lost its race) is revoked once, best effort; while ServiceNow cannot take it, it stays
            # live until it expires. (`make revoke` stops instead, and the secret keeps its tokens.)
            self.unrevoked.update(form.get("token", []))
        self._asked[self.scheduler.current or ""] = (self.emulator.live_refresh_tokens(CLIENT_ID), fault, grant)

    def servicenow_answered(self, method: str, url: str) -> None:
        if self.scheduler is None or self.emulator is None:
            return
        task = self.scheduler.current or ""
        before, fault, grant = self._asked.pop(task, (set(), "ok", None))
        issued = self.emulator.live_refresh_tokens(CLIENT_ID) - before
        if fault == LOST:
            self.unseen |= issued  # issued in an answer nobody saw: stored nowhere, by nobody's fault
        if grant == "refresh_token":
            self.rotated.setdefault(task, set()).update(issued)
        if grant == "authorization_code":
            self.consented.setdefault(task, set()).update(issued)

    def clock(self) -> datetime:
        return self.now

    def interrupt(self, label: str, run: Callable[[], Any]) -> None:
        """A plain test's interleaving without the scheduler: the next time any writer reaches the yield point
        `label` (say "PutSecretValue sent"), `run` runs there to its end first, once."""
        self.interrupts.append((label, run))

    def _interrupted(self, label: str) -> None:
        for n, (wanted, run) in enumerate(self.interrupts):
            if wanted == label:
                del self.interrupts[n]
                run()
                return


def _error(code: str, operation: str) -> tuple[AWSResponse, dict[str, Any]]:
    parsed = {"Error": {"Code": code, "Message": f"{operation} refused by the explorer"}, "ResponseMetadata": {}}
    return AWSResponse("http://explorer", 400, {}, None), parsed


class _YieldingPool(PoolManager):
    """The ServiceNow client's session with a yield point before each request and after its answer."""

    def __init__(self, world: World, *, replay: bool) -> None:
        retries = retry_policy(replay=replay, backoff_factor=0.001, backoff_max=0.01)
        super().__init__(num_pools=4, maxsize=4, retries=retries, headers=HEADERS)
        watched(self)  # as build_session: its connections obey each request's deadline
        self.world = world

    def urlopen(self, method: str, url: str, redirect: bool = True, **kw: Any) -> Any:  # type: ignore[override]
        self.world.servicenow_request(method, url, kw.get("body"))
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
            store,
            STATE_KEY,
            NAME,
            expires=query["expires"],
            signature=query["signature"],
            callback_url=REDIRECT,
            now=setup.world.now,
        )
    redirect = _press_consent(setup.consent["location"])
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
            # The operator saw the paste fail (its write may have landed unseen): the token it replaced is theirs to
            # check and revoke, as the README's procedure says.
            setup.operator_tokens.update(old for old in replaced if old)
            raise
        if replaced[-1]:
            try:
                container.client.revoke(app, replaced[-1])
            except ServiceNowOAuthError:
                setup.operator_tokens.add(replaced[-1])  # the operator saw it fail: theirs to revoke again

    return run


def revoke(setup: Setup) -> Callable[[], Any]:
    """`make revoke`: revoke in ServiceNow, then clear the tokens."""
    container = setup.container()
    return lambda: revoke_connection(container.store, container.client, NAME, setup.world.now)


def stage_jwt_key(setup: Setup) -> Callable[[], Any]:
    """`make stage-jwt-key`: the next signing key staged (rollover), its certificate trusted in ServiceNow."""
    container = setup.container()
    key = setup.world.kms_keys[1]

    def stage(connection: Connection) -> Connection:
        return replace(connection, jwt_key_id_next="key-2", kms_key_id_next=key)

    return lambda: container.store.update(NAME, stage)


WRITERS: dict[str, Callable[[Setup], Callable[[], Any]]] = {
    "sweep": sweep,
    "worker": worker,
    "rotation": rotation,
    "callback": callback,
    "stage_secret": stage_secret,
    "paste": paste,
    "revoke": revoke,
    "fix_secret": fix_secret,
    "stage_jwt_key": stage_jwt_key,
}


_BROWSER = PoolManager()


def _press_consent(authorize_url: str) -> dict[str, str]:
    """A person pressing Allow (the emulator's `press_consent` over urllib3: `requests` goes through moto's
    in-process mock, 40 ms a request)."""
    page = _BROWSER.request("GET", authorize_url)
    form = ConsentForm()
    form.feed(page.data.decode())
    base = urlsplit(authorize_url)
    answer = _BROWSER.request(
        "POST",
        f"{base.scheme}://{base.netloc}{form.action}",
        fields={**form.fields, "action": form.buttons["allow"]["value"]},
        encode_multipart=False,
        redirect=False,
    )
    return {key: values[0] for key, values in parse_qs(urlsplit(answer.headers["Location"]).query).items()}


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

    @property
    def modes(self) -> tuple[str, ...]:
        """ServiceNow's refresh-token modes that matter: a JWT connection has no refresh token."""
        return ("default",) if self.kind.startswith("jwt") else MODES

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
    jwt = [Scenario("jwt", ("sweep", other)) for other in ("sweep", "worker", "stage_jwt_key", "stage_secret")]
    # A rollover gone wrong, one writer: ServiceNow refuses the current key, the staged client secret is not live
    # yet and the staged key cannot sign (its key policy not updated): what it costs over the forward day.
    return pairs + refused + jwt + [Scenario("jwt_refused", ("sweep",))]


# ------------------------------------------------------------------------------------------------ one schedule
@dataclass
class Run:
    """What one schedule did and what the checks found."""

    points: list[Point]
    problem: str | None
    errors: dict[str, str]


@dataclass(frozen=True)
class Look:
    version: str
    connection: Connection
    refresh_tokens: set[str | None]  # AWSCURRENT's and a waiting candidate's
    health: Health
    stages: dict[str, list[str]]


class Explorer:
    """Runs schedules in one process's moto; `with Explorer() as explorer: explorer.explore(...)`."""

    def __init__(self) -> None:
        self._mock = mock_aws()

    def __enter__(self) -> Explorer:
        # moto in process answers only AWS's own endpoints: the test session's moto server URL must not apply here.
        self._endpoint = os.environ.pop("AWS_ENDPOINT_URL", None)
        self._mock.start()
        self.world = World()
        world = self.world
        self.emulator = ServiceNowEmulator(clock=lambda: world.now.timestamp()).__enter__()
        return self

    def __exit__(self, *_: Any) -> None:
        self.emulator.__exit__(None, None, None)
        self._mock.stop()
        if self._endpoint is not None:
            os.environ["AWS_ENDPOINT_URL"] = self._endpoint

    @contextmanager
    def fresh(self, scenario: Scenario, mode: str) -> Iterator[Setup]:
        """A new world for one schedule: empty AWS and ServiceNow, then the scenario's connection."""
        from moto.backends import get_backend

        for service in ("secretsmanager", "events"):  # this region's only: a BackendDict's reset would clear KMS too
            get_backend(service)[ACCOUNT][REGION].reset()
        world = self.world
        world.now, world.events, world.scheduler = START, [], None
        world.unseen, world.rotated, world.kms_denied, world.interrupts = set(), {}, set(), []
        world.unrevoked, world.consented, world.replacing = set(), {}, {}
        emulator = self.emulator
        emulator.reset(rotate_refresh_tokens=mode == "rotating")
        world.emulator = emulator
        setup = Setup(world, mode, scenario.kind)
        emulator.register_client(CLIENT_ID, setup.client_secret, [REDIRECT])
        emulator.add_user("svc.integration", "Pa55w0rd-explorer")
        self._connect(setup)
        yield setup

    def _connect(self, setup: Setup) -> None:
        """The connection as it stands before the writers start: consented (or its first JWT token taken by a
        sweep), its access token due."""
        world = setup.world
        if setup.kind.startswith("jwt"):
            self._connect_jwt(setup)
            return
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
            # Refreshed once first: a refresh's promoted candidate keeps its label, which the mark must not revive.
            Sweep(Container(world).refresher).run()
            world.now += DUE_AFTER
            setup.client_secret = "explorer-client-secret-changed-B2"
            world.emulator.set_client_secret(CLIENT_ID, setup.client_secret)  # type: ignore[union-attr]

    def _connect_jwt(self, setup: Setup) -> None:
        world, emulator = setup.world, setup.world.emulator
        assert emulator is not None
        world.jwt_keys()
        current, staged = world.kms_keys
        emulator.add_user("svc.jwt", "Pa55w0rd-jwt-user")
        emulator.add_jwt_verifier(CLIENT_ID, "key-1", world.certificates[current])
        document = {
            "instanceUrl": emulator.url,
            "clientId": CLIENT_ID,
            "clientSecret": setup.client_secret,
            "grantType": "jwt_bearer",
            "jwtSubject": "svc.jwt",
            "jwtKeyId": "key-1",
            "kmsKeyId": current,
            "status": "pending_authorization",
        }
        if setup.kind == "jwt_refused":
            document |= {"clientSecretNext": "explorer-client-secret-next-C3", "jwtKeyIdNext": "key-2"}
            document |= {"kmsKeyIdNext": staged}
        world.plain.create_secret(Name=SECRET, SecretString=json.dumps(document))
        Sweep(Container(world).refresher).run()  # the first token
        world.now += DUE_AFTER
        if setup.kind == "jwt":
            emulator.add_jwt_verifier(CLIENT_ID, "key-2", world.certificates[staged])  # trusted before it is staged
        else:
            emulator.remove_jwt_verifier(CLIENT_ID, "key-1")  # the old map dropped too early
            world.kms_denied = {staged}

    def run(
        self, scenario: Scenario, mode: str, deviations: tuple[Deviation, ...] = (), *, script: Script | None = None
    ) -> Run:
        """One schedule (its deviations from the default, or a `script`), then every check."""
        with self.fresh(scenario, mode) as setup:
            world = setup.world
            tasks = {f"{n}.{writer}": WRITERS[writer](setup) for n, writer in enumerate(scenario.writers, 1)}
            scheduler = script or Scheduler(deviations)
            world.scheduler = scheduler
            try:
                scheduler.run(tasks)
            finally:
                world.scheduler = None
            missed = [step for step in script.steps if step != Step(step.task)] if script is not None else []
            if missed:
                raise AssertionError(f"the schedule never reached {missed[0]} (a call renamed or removed?)")
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
        for task in scheduler.errors:
            if task.endswith(".callback") and _could_not_tell(scheduler, task):
                # The README's documented choice: a callback whose write failed and that then could not read
                # whether it landed keeps its tokens alive, and the ones it would replace (revoked, either might be
                # the only stored credential).
                self.world.unseen |= self.world.consented.get(task, set()) | self.world.replacing.get(task, set())
        look = self.look()
        self.no_unknown_live_token(setup, "after the writers", look)
        if self.a_day_later(setup, documented=bool(self.world.unseen), look=look):
            look = self.look()
            self.no_unknown_live_token(setup, "a day later", look)
        # The README's documented limit: health a refused tag write left in one container's memory is not another's,
        # so that other container (the forward day's) may announce the change again.
        forgetful = any(label.startswith("TagResource") for _, label, _ in scheduler.faults)
        self.events_tell_the_truth(setup, repeats_allowed=forgetful, look=look)

    def look(self) -> Look:
        """The secret as it stands (one DescribeSecret, AWSCURRENT, and a waiting candidate's value)."""
        plain = self.world.plain
        described = plain.describe_secret(SecretId=SECRET)
        read = plain.get_secret_value(SecretId=SECRET, VersionStage="AWSCURRENT")
        current = parse_connection(NAME, read["SecretString"], ("127.0.0.1",))
        stages = described["VersionIdsToStages"]
        stored = {current.refresh_token}
        for version, labels in stages.items():
            if CANDIDATE in labels and "AWSCURRENT" not in labels:
                value = plain.get_secret_value(SecretId=SECRET, VersionId=version)["SecretString"]
                stored.add(json.loads(value).get("refreshToken"))
        health = Health.from_tags(described.get("Tags", []))
        return Look(read["VersionId"], current, stored, health, stages)

    def no_unknown_live_token(self, setup: Setup, when: str, look: Look | None = None) -> None:
        live = self.world.emulator.live_refresh_tokens(CLIENT_ID)  # type: ignore[union-attr]
        unknown = live - setup.operator_tokens - self.world.unseen - self.world.unrevoked
        unknown -= (look or self.look()).refresh_tokens
        if unknown:
            raise Violation(f"{when}: {len(unknown)} live refresh token(s) stored nowhere")

    def _verdict(self, setup: Setup, look: Look | None = None) -> str:
        """ "healthy", "parked" (ServiceNow refuses what is stored, and the tags say a person must act), or what
        is wrong."""
        look = look or self.look()
        connection = look.connection
        state = state_of(look.health) if look.health.version == look.version else None
        honoured = self._honoured(setup, connection)
        expires = connection.access_token_expires_at
        live = connection.access_token in self.world.emulator.live_access_tokens(CLIENT_ID)  # type: ignore[union-attr]
        if (
            connection.status == "active"
            and state is State.HEALTHY
            and honoured
            and live  # the access token a service reads works (not an older one under a newer expiry)
            and expires is not None
            and expires > self.world.now
            and not any(CANDIDATE in labels and "AWSCURRENT" not in labels for labels in look.stages.values())
        ):
            return "healthy"
        if connection.status == "reauthorization_required" and state is State.REJECTED and not honoured:
            return "parked"
        return (
            f"status {connection.status}, health {state.value if state else 'for another version'}, "
            f"stored credential {'honoured' if honoured else 'refused'} by ServiceNow, access token "
            f"{'valid' if expires and expires > self.world.now else 'expired'}"
        )

    def _honoured(self, setup: Setup, connection: Connection) -> bool:
        """Whether ServiceNow would give a token for what is stored (never asking it: no request is counted)."""
        emulator = self.world.emulator
        assert emulator is not None
        if connection.client_secret != setup.client_secret:
            return False
        if connection.grant_type == "jwt_bearer":
            key = connection.jwt_key
            return (
                key is not None
                and key.key_id in emulator.jwt_key_ids(CLIENT_ID)
                and (key.kms_key_id not in self.world.kms_denied)
            )
        return connection.refresh_token in emulator.live_refresh_tokens(CLIENT_ID)

    def a_day_later(self, setup: Setup, documented: bool = False, look: Look | None = None) -> bool:
        """A simulated day of sweeps every 5 minutes, nothing failing: healthy again after a refresh, or parked
        only where ServiceNow refuses the stored credential; a failing stretch costs at most 40 token requests.
        Sweeps the listing settles (not due, backing off, needs a person) make no call: they are skipped."""
        world = setup.world
        emulator = world.emulator
        assert emulator is not None
        if self._verdict(setup, look) == "healthy":
            return False  # as every schedule starts (a clean healthy connection): its day is the one explored
        container = Container(world)  # another container: the writers' health memory is theirs
        before = emulator.token_requests()
        end = world.now + DAY
        entry = self._entry()
        refreshed = False
        while world.now < end:
            world.now += POLICY.interval
            if plan(entry, world.now, POLICY) != "read" and not container.monitor.unsaved(entry["ARN"]):
                continue
            # Only the stack writes from here on: a mark that stands is never asked again (bounded cost).
            look = self.look()
            marked = look.connection.status == "reauthorization_required" and look.connection.marked_version
            asked = emulator.token_requests()
            outcomes = Sweep(container.refresher).run()
            if marked == look.version and emulator.token_requests() > asked:
                raise Violation("a day later: a refused credential was retried before its secret changed")
            refreshed = refreshed or any(outcome.result == "refreshed" for outcome in outcomes)
            entry = self._entry()
            if refreshed and self._verdict(setup) == "healthy":
                return True
        verdict = self._verdict(setup)
        made = emulator.token_requests() - before
        if verdict != "healthy" and made > MAX_DAILY_REQUESTS:
            raise Violation(f"a day later: {made} token requests in a day without getting healthy ({verdict})")
        if verdict not in ("healthy", "parked") and not (documented and "refused" in verdict):
            raise Violation(f"a day later: {verdict}")
        return True

    def _entry(self) -> dict[str, Any]:
        listing = self.world.plain.list_secrets(Filters=[{"Key": "name", "Values": [SECRET]}])["SecretList"]
        return dict(listing[0])

    def events_tell_the_truth(self, setup: Setup, *, repeats_allowed: bool = False, look: Look | None = None) -> None:
        """One event per change, and the last word is true: a healthy connection's last state event is not
        'reauthorization required' or 'failing' (an operator paged for nothing, never told it recovered)."""
        events = self.world.events
        for first, second in itertools.pairwise(events):
            if (
                first == second
                and first in ("failing", "recovered", "reauthorization_required")
                and not repeats_allowed
            ):
                raise Violation(f"{first} announced twice")
        states = [kind for kind in events if kind in ("authorized", "recovered", "reauthorization_required", "failing")]
        if states and states[-1] in ("reauthorization_required", "failing") and self._verdict(setup, look) == "healthy":
            raise Violation(f"the connection is healthy, but the last event announced was {states[-1]!r}")

    # -------------------------------------------------------------------------------------------- exploration
    def explore(
        self, scenario: Scenario, mode: str, *, bound: int, on_violation: Callable[[str], None] | None = None
    ) -> tuple[int, list[str]]:
        """Every schedule with at most `bound` deviations from the default, a preemption or a fault each (depth
        first: a schedule is its deviations, in order). Returns (schedules run, findings)."""
        stack: list[tuple[Deviation, ...]] = [()]
        runs, findings = 0, []
        while stack:
            deviations = stack.pop()
            result = self.run(scenario, mode, deviations)
            runs += 1
            if result.problem is not None:
                finding = f"{scenario.name} {mode}{format_deviations(deviations)}  # {result.problem}"
                findings.append(finding)
                if on_violation:
                    on_violation(finding)
            used = sum(deviation.preemptions + deviation.faults for deviation in deviations)
            start = deviations[-1].index + 1 if deviations else 0
            for point in result.points[start:]:
                for choice, p, f in point.options[1:]:
                    if used + p + f <= bound:
                        stack.append((*deviations, Deviation(point.key, choice, p, f, point.index)))
        return runs, findings

    def replay(self, finding: str) -> Run:
        scenario, mode, deviations = parse_finding(finding)
        return self.run(scenario, mode, deviations)


def _could_not_tell(scheduler: Scheduler, task: str) -> bool:
    """Whether `task` read the secret after its last write attempt and that read failed."""
    points = [point for point in scheduler.points if point.task == task]
    writes = [
        n for n, point in enumerate(points) if point.label.startswith(("PutSecretValue", "UpdateSecretVersionStage"))
    ]
    return bool(writes) and any(
        point.label.startswith("GetSecretValue sent") and point.chosen != "ok" for point in points[writes[-1] + 1 :]
    )


def format_deviations(deviations: tuple[Deviation, ...]) -> str:
    return "".join(f" | {deviation}" for deviation in deviations)


def parse_finding(finding: str) -> tuple[Scenario, str, tuple[Deviation, ...]]:
    """`code:sweep+worker rotating | 1.sweep:PutSecretValue sent@1=2.worker  # what broke` -> its scenario, mode
    and deviations (each: task, yield point and occurrence, then the choice: another task or a fault)."""
    head, *steps = finding.split("#", 1)[0].split(" | ")
    name, mode = head.split()
    deviations = []
    for step in (step.strip() for step in steps):
        where, choice = step.rsplit("=", 1)
        task, rest = where.split(":", 1)
        label, nth = rest.rsplit("@", 1)
        preempt = int("." in choice)  # a task's name ("2.worker"); a fault's has no dot
        deviations.append(Deviation((task, label, int(nth)), choice, preempt, 1 - preempt))
    return Scenario.parse(name), mode, tuple(deviations)


def describe(run: Run) -> str:
    """The schedule as it ran: each decision, marked where it left the default."""
    lines = []
    for point in run.points:
        mark = "*" if point.chosen != point.options[0][0] else " "
        lines.append(f"{mark} {point.index:3} {point.task:14} {point.label:45} -> {point.chosen}")
    return "\n".join(lines)
