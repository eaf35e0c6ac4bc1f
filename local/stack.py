"""The whole system on one machine with no AWS account: `python -m local.stack` (what `make local` runs).

Why: a person (or a test, or a demo script) can walk the real consent flow in a browser against the real
callback handler: Secrets Manager is a `moto_server` process, ServiceNow is the in-process emulator (or a
real instance), and API Gateway is `local.api.LocalApi`. Nothing here prints a token, a code, a client
secret or the state key; the authorize link it prints is signed, which is what it is for.

Environment for a real ServiceNow instance instead of the emulator (all three, or none):
    SERVICENOW_INSTANCE       https://<name>.service-now.com (or just <name>)
    SERVICENOW_CLIENT_ID      the Application Registry entry's client id
    SERVICENOW_CLIENT_SECRET  its client secret
The printed callback URL must then be registered as that entry's Redirect URL.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import requests
from aws_lambda_powertools.utilities import parameters

from core.allowlist import DEFAULT_ALLOWED_HOSTS, normalize_instance_url
from core.config import DEFAULT_PREFIX, DEFAULT_STATE_KEY
from core.dashboard import page
from core.errors import InstanceNotAllowed
from core.pages import SECURITY_HEADERS
from core.secret import Connection
from core.signing import LINK_TTL, sign_authorize_link
from core.store import AWSCURRENT, ConnectionStore
from local.api import HttpAnswer, LocalApi, LocalLambdaContext
from local.servicenow_emulator import DEFAULT_SCOPE, ServiceNowEmulator

REGION = "us-east-1"
HOST = "127.0.0.1"
DEMO_CONNECTION = "demo"
EVENTS = Path(__file__).resolve().parent.parent / "events"
HANDLER_MODULE = "handlers.callback"
REFRESH_MODULE = "handlers.refresh"
DASHBOARD_MODULE = "handlers.dashboard"
REFRESH_INTERVAL = 60.0  # seconds between local sweeps (EventBridge's default in AWS is 5 minutes)
# A fixed port when a real instance is used: its registered Redirect URL must stay valid across runs.
REAL_INSTANCE_API_PORT = 8765
MOTO_START_TIMEOUT = 30.0
# Never reach a real AWS account: dummy credentials, and nothing that could select another endpoint or profile.
AWS_ENVIRONMENT: dict[str, str | None] = {
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_PROFILE": None,
    "AWS_ENDPOINT_URL_SECRETS_MANAGER": None,
}


def free_port(host: str = HOST) -> int:
    """A port nothing listens on right now (for processes that need a port number up front)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """A `moto_server` subprocess on loopback: Secrets Manager without an AWS account."""

    def __init__(self, host: str = HOST, port: int = 0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = MOTO_START_TIMEOUT) -> MotoServer:
        """Spawn the server and return once it answers (or raise with the reason it did not)."""
        # Its request log goes nowhere: the terminal is for the banner.
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(f"{self.url}/moto-api/", timeout=1).status_code < 500:
                    return self
            except requests.RequestException:
                pass
            if self._process.poll() is not None:
                self.stop()
                raise RuntimeError(
                    f"moto_server exited on port {self.port}; run `{sys.executable} -m moto.server -p {self.port}` "
                    "to see why (is moto[server] installed?)"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto_server did not answer on {self.url} within {timeout:.0f}s")
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """Terminate, then kill if it does not go within 10 seconds."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@dataclass(frozen=True)
class RealInstance:
    """A real ServiceNow instance and the Application Registry entry to use instead of the emulator."""

    url: str
    client_id: str
    client_secret: str = field(repr=False)


def instance_url_from(value: str) -> str:
    """Accept `https://<name>.service-now.com`, a bare host, or just `<name>`."""
    value = value.strip().rstrip("/")
    if "://" not in value:
        value = "https://" + (value if "." in value else f"{value}.service-now.com")
    return value


def instance_from_env(environ: Mapping[str, str] | None = None) -> RealInstance | None:
    """The real instance named by SERVICENOW_INSTANCE/_CLIENT_ID/_CLIENT_SECRET, or None for the emulator.

    Raises:
        ValueError: only some of the three are set (a half-configured run would silently use the emulator).
    """
    env = os.environ if environ is None else environ
    names = ("SERVICENOW_INSTANCE", "SERVICENOW_CLIENT_ID", "SERVICENOW_CLIENT_SECRET")
    values = {name: (env.get(name) or "").strip() for name in names}
    if not any(values.values()):
        return None
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise ValueError(f"a real ServiceNow instance needs all of {', '.join(names)}; missing: {', '.join(missing)}")
    return RealInstance(
        instance_url_from(values["SERVICENOW_INSTANCE"]),
        values["SERVICENOW_CLIENT_ID"],
        values["SERVICENOW_CLIENT_SECRET"],
    )


class LocalStack:
    """moto + ServiceNow (emulated or real) + the local HTTP API around the real callback handler.

    `start()` changes `os.environ` (the handler reads its settings and AWS endpoint from it, as in Lambda)
    and `stop()` puts every changed variable back, so it can run inside a test session.
    """

    def __init__(
        self,
        *,
        instance: RealInstance | None = None,
        api_port: int = 0,
        host: str = HOST,
        connection: str = DEMO_CONNECTION,
        refresh_interval: float | None = REFRESH_INTERVAL,
        access_lifespan: int = 1800,
    ) -> None:
        self.instance = instance
        self.refresh_interval = refresh_interval
        self.access_lifespan = access_lifespan
        self.refresher: ModuleType | None = None
        self.host = host
        self.connection = connection
        self.moto = MotoServer(host)
        self.api = LocalApi(self._invoke, host, api_port, local_pages={"/status": self.status_page})
        self.dashboard: ModuleType | None = None
        self.emulator: ServiceNowEmulator | None = None
        self.secretsmanager: Any = None
        self.store: ConnectionStore | None = None
        self.handler: ModuleType | None = None
        self._saved_environ: dict[str, str | None] = {}
        self.registered: dict[str, str] = {}  # connection -> what `servicenow-client` printed for it
        self._cleanup = contextlib.ExitStack()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LocalStack:
        """Bring everything up in dependency order; on any failure, whatever started is stopped again."""
        if self.instance is not None:
            # Refuse a URL the handler would refuse, before anything is started.
            normalize_instance_url(self.instance.url, self.allowed_hosts)
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(self._restore_environ)
            self.moto.start()
            cleanup.callback(self.moto.stop)
            self._set_environ({**AWS_ENVIRONMENT, "AWS_ENDPOINT_URL": self.moto.url})
            # A fresh default session, so no credentials cached before this point can reach the handler.
            boto3.DEFAULT_SESSION = None
            self.secretsmanager = boto3.client("secretsmanager", endpoint_url=self.moto.url, region_name=REGION)

            self.api.start()
            cleanup.callback(self.api.stop)
            if self.instance is None:
                # An empty instance: the client is registered through its Table API, as `make servicenow-client`.
                self.emulator = ServiceNowEmulator(self.host, access_lifespan=self.access_lifespan).start()
                cleanup.callback(self.emulator.stop)

            allowed = self.allowed_hosts
            self._set_environ(
                {
                    "CONNECTION_SECRET_PREFIX": DEFAULT_PREFIX,
                    "SERVICENOW_ALLOWED_HOSTS": ",".join(allowed),
                    "STATE_KEY_SECRET_ID": DEFAULT_STATE_KEY,
                    "CALLBACK_URL": self.callback_url,
                    "POWERTOOLS_SERVICE_NAME": "servicenow-oauth",
                    "POWERTOOLS_METRICS_NAMESPACE": "ServiceNowOAuth",
                    "POWERTOOLS_METRICS_DISABLED": "true",
                }
            )
            self.store = ConnectionStore(self.secretsmanager, prefix=DEFAULT_PREFIX, allowed_hosts=allowed)
            self.secretsmanager.create_secret(
                Name=DEFAULT_STATE_KEY,
                SecretString=secrets.token_urlsafe(48),  # 64 characters
                Description="HMAC key for signed authorize links and OAuth state (local stack)",
            )
            self.create_connection(self.connection)
            self.handler = self._load_handler()
            self.start_refresher(cleanup)
            self._cleanup = cleanup.pop_all()
        return self

    def stop(self) -> None:
        """Stop everything started, in reverse order, and restore the environment."""
        self._cleanup.close()
        for module in (self.handler, self.refresher, self.dashboard):
            # Metrics are off here (POWERTOOLS_METRICS_DISABLED), so never flushed: Powertools keeps them in a set
            # every Metrics shares, and the next handler to flush in this process would emit them as its own.
            if module is not None and hasattr(module, "metrics"):
                module.metrics.clear_metrics()
        self.handler = None
        self.dashboard = None
        self._forget_handler_caches()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start_refresher(self, cleanup: contextlib.ExitStack) -> None:
        """Load the real scheduled refresher and, unless disabled, run it every `refresh_interval` seconds.

        Called by `start()` once the handler, the secrets and the API are up; the thread stops with the stack.
        """
        already = REFRESH_MODULE in sys.modules
        module = importlib.import_module(REFRESH_MODULE)
        self.refresher = importlib.reload(module) if already else module
        if self.refresh_interval is None:
            return
        stopped = threading.Event()
        interval = self.refresh_interval

        def loop() -> None:
            while not stopped.wait(interval):
                with contextlib.suppress(Exception):  # the handler logs its own failures; keep sweeping
                    self.sweep()

        thread = threading.Thread(target=loop, name="local-refresher", daemon=True)
        thread.start()
        cleanup.callback(thread.join, 5)
        cleanup.callback(stopped.set)

    def status_page(self) -> HttpAnswer:
        """`/status` (local only): the dashboard widget's handler, invoked as the CloudWatch console would, in a
        page of its own with the consent pages' security headers."""
        if self.store is None:
            return HttpAnswer(503, [("Content-Type", "text/plain")], b"the local stack is still starting")
        if self.dashboard is None:
            already = DASHBOARD_MODULE in sys.modules
            module = importlib.import_module(DASHBOARD_MODULE)
            self.dashboard = importlib.reload(module) if already else module
        event = json.loads((EVENTS / "dashboard.json").read_text())
        context = LocalLambdaContext(function_name="dashboard", aws_request_id=str(uuid.uuid4()))
        fragment = self.dashboard.lambda_handler(event, context)
        headers = [("Content-Type", "text/html; charset=utf-8"), *SECURITY_HEADERS.items()]
        return HttpAnswer(200, headers, page(fragment).encode("utf-8"))

    def sweep(self) -> dict[str, int]:
        """One scheduled sweep, as EventBridge would trigger it: the refresh handler on a schedule event."""
        if self.refresher is None:
            raise RuntimeError("local stack not started")
        event = json.loads((EVENTS / "schedule.json").read_text())
        # The deployed RefreshFunction's timeout (template.yaml), so the sweep plans its time as in Lambda.
        context = LocalLambdaContext(function_name="refresh", aws_request_id=str(uuid.uuid4()), timeout_seconds=240)
        result: dict[str, int] = self.refresher.lambda_handler(event, context)
        return result

    # ------------------------------------------------------------------ what tests and demos use
    @property
    def callback_url(self) -> str:
        """The Redirect URL the OAuth application must have registered."""
        return f"{self.api.url}/callback"

    @property
    def instance_url(self) -> str:
        if self.instance is not None:
            return self.instance.url
        if self.emulator is None:
            raise RuntimeError("local stack not started")
        return self.emulator.url

    @property
    def allowed_hosts(self) -> tuple[str, ...]:
        """The ServiceNow defaults plus loopback (the emulator) and the real instance's host when there is one."""
        hosts = [*DEFAULT_ALLOWED_HOSTS, self.host]
        if self.instance is not None:
            hosts.append(_host_of(self.instance.url))
        return tuple(dict.fromkeys(hosts))

    def secret_id(self, name: str | None = None) -> str:
        return f"{DEFAULT_PREFIX}{name or self.connection}"

    def register(self, name: str, *options: str) -> None:
        """`make servicenow-client` for `name`, answered at its prompt by the emulator's admin: the registry
        entry, its client secret in the connection secret (both made without a person). Its output is kept in
        `registered`."""
        if self.emulator is None:
            raise RuntimeError("local stack not started (with the emulator)")
        argv = ["servicenow-client", name, "--instance-url", self.emulator.url, "--api-url", self.api.url, *options]
        code, out, err = self.admin(*argv, stdin=f"admin\n{self.emulator.admin_password}\n")
        if code != 0:
            raise RuntimeError(f"servicenow-client {name} failed: {err.strip()}")
        self.registered[name] = out

    def admin(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        """The operator's CLI (`python -m admin`, what `make` runs) against this stack: (exit code, out, err)."""
        from admin.cli import main as admin_cli

        out, err = io.StringIO(), io.StringIO()
        argv = ("--allowed-hosts", ",".join(self.allowed_hosts), *argv)
        code = admin_cli(list(argv), out=out, err=err, stdin=io.StringIO(stdin))
        return code, out.getvalue(), err.getvalue()

    def create_connection(self, name: str, *, scope: str | None = DEFAULT_SCOPE) -> None:
        """A new `pending_authorization` connection: registered in the emulator through the Table API, or for a
        real instance, with the client configured in the environment."""
        if self.store is None:
            raise RuntimeError("local stack not started")
        if self.instance is None:
            lifespan = ["--access-lifespan", str(self.access_lifespan)]
            self.register(name, *lifespan, *(["--scope", scope] if scope else []))
            return
        client_id, client_secret = self.instance.client_id, self.instance.client_secret
        connection = Connection(
            name=name,
            instance_url=normalize_instance_url(self.instance_url, self.allowed_hosts),
            client_id=client_id,
            client_secret=client_secret,
            redirect_uri=self.callback_url,
            scope=scope,
            status="pending_authorization",
        )
        self.store.create(connection, description=f"ServiceNow OAuth connection {name} (local stack)")

    def new_signing_key(self) -> str:
        """A fresh RSA signing key in moto's KMS (what JwtSigningKey=create makes in AWS); returns its ARN."""
        kms = boto3.client("kms", endpoint_url=self.moto.url, region_name=REGION)
        return str(kms.create_key(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"])

    def create_jwt_connection(
        self, name: str, *, subject: str = "svc.jwt", key_id: str = "local-key-1", trust: str = "jwks"
    ) -> str:
        """A jwt_bearer connection signed by a fresh KMS key (moto's), registered through the Table API: ServiceNow
        trusts its keys through the connection's JWKS URL (`trust="jwks"`) or a certificate in a verifier map
        (`"verifier_map"`). Returns the key's ARN."""
        if self.store is None or self.emulator is None:
            raise RuntimeError("local stack not started (with the emulator)")
        key = self.new_signing_key()
        self.emulator.add_user(subject, secrets.token_urlsafe(16))
        jwt = ["--jwt-subject", subject, "--jwt-key-id", key_id, "--jwt-kms-key", key, "--trust", trust]
        self.register(name, "--grant-type", "jwt_bearer", *jwt)
        return key

    def read_secret(self, name: str | None = None) -> dict[str, Any]:
        """The current version of a connection secret as Secrets Manager returns it (tests compare these)."""
        answer: dict[str, Any] = self.secretsmanager.get_secret_value(
            SecretId=self.secret_id(name), VersionStage=AWSCURRENT
        )
        return answer

    def authorize_link(self, name: str | None = None, ttl: timedelta = LINK_TTL) -> str:
        """A signed authorize link, signed with the key as stored in (and read back from) Secrets Manager."""
        key = self.secretsmanager.get_secret_value(SecretId=DEFAULT_STATE_KEY)["SecretString"].encode()
        return sign_authorize_link(key, self.api.url, name or self.connection, datetime.now(UTC), ttl)

    # ------------------------------------------------------------------ internals
    def _invoke(self, event: dict[str, Any], context: Any) -> Any:
        """What API Gateway's Lambda integration does: call the handler module loaded for this stack."""
        if self.handler is None:
            raise RuntimeError("the local stack is still starting")
        return self.handler.lambda_handler(event, context)

    def _load_handler(self) -> ModuleType:
        """Import the handler now that its environment is set (it reads settings and builds clients at import)."""
        # The handler builds its client from the environment, as in Lambda: make sure that means moto.
        endpoint = boto3.client("secretsmanager").meta.endpoint_url
        if endpoint != self.moto.url:
            raise RuntimeError(f"a Secrets Manager client built from the environment points at {endpoint}, not moto")
        self._forget_handler_caches()
        already = HANDLER_MODULE in sys.modules
        module = importlib.import_module(HANDLER_MODULE)
        return importlib.reload(module) if already else module

    @staticmethod
    def _forget_handler_caches() -> None:
        """Powertools keeps its Secrets Manager client and cached values across imports: drop both."""
        parameters.clear_caches()

    def _set_environ(self, values: Mapping[str, str | None]) -> None:
        for name, value in values.items():
            self._saved_environ.setdefault(name, os.environ.get(name))
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def _restore_environ(self) -> None:
        for name, value in self._saved_environ.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_environ = {}
        boto3.DEFAULT_SESSION = None


def _host_of(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0].lower()


def banner(stack: LocalStack, link: str, ttl: timedelta) -> str:
    """What the terminal shows: where everything is and the link to click; no secret values."""
    minutes = int(ttl.total_seconds() // 60)
    if stack.instance is None:
        servicenow = f"  ServiceNow emulator      {stack.instance_url}"
        register = (
            f"  OAuth client             registered through the Table API: 'servicenow-oauth {stack.connection}' "
            "(make servicenow-client; no hand step)\n"
        )
    else:
        servicenow = f"  ServiceNow instance      {stack.instance_url}"
        register = "  (register the callback URL as the Redirect URL of the OAuth application in ServiceNow)\n"
    return (
        "ServiceNow OAuth local stack: no AWS account, Secrets Manager is moto\n"
        f"  API                      {stack.api.url}\n"
        f"{servicenow}\n"
        f"  Secrets Manager (moto)   {stack.moto.url}\n"
        f"  Callback URL             {stack.callback_url}\n"
        f"  Connections' health      {stack.api.url}/status (local only; deployed: the CloudWatch dashboard)\n"
        f"{register}"
        f"  Connection secret        {stack.secret_id()}\n"
        "\n"
        f"Open this link to authorize connection {stack.connection!r} (valid {minutes} minutes):\n"
        f"  {link}\n"
        "\n"
        + (f"The refresher sweeps every {stack.refresh_interval:.0f} s. " if stack.refresh_interval else "")
        + "The admin CLI against this stack:\n"
        f"  export AWS_ENDPOINT_URL={stack.moto.url} AWS_DEFAULT_REGION={REGION} "
        "AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing\n"
        f"  export SERVICENOW_ALLOWED_HOSTS={','.join(stack.allowed_hosts)} SERVICENOW_OAUTH_API_URL={stack.api.url}\n"
        "  make connections\n"
        "\n"
        "Ctrl-C stops everything."
    )


def main(argv: list[str] | None = None) -> int:
    """Run until Ctrl-C or SIGTERM, then clean up (moto is killed, the environment restored)."""
    parser = argparse.ArgumentParser(description="Run the consent API locally against moto and a ServiceNow")
    parser.add_argument(
        "--api-port", type=int, help=f"default: any free port ({REAL_INSTANCE_API_PORT} with a real instance)"
    )
    parser.add_argument("--connection", default=DEMO_CONNECTION, help="name of the connection to create")
    parser.add_argument("--link-minutes", type=int, default=int(LINK_TTL.total_seconds() // 60))
    args = parser.parse_args(argv)
    try:
        instance = instance_from_env()
    except ValueError as exc:
        parser.error(str(exc))
    port = args.api_port if args.api_port is not None else (REAL_INSTANCE_API_PORT if instance else 0)
    ttl = timedelta(minutes=args.link_minutes)

    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    stack = LocalStack(instance=instance, api_port=port, connection=args.connection)
    try:
        stack.start()
        print(banner(stack, stack.authorize_link(ttl=ttl), ttl), flush=True)
        while not stopped.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    except (OSError, RuntimeError, InstanceNotAllowed) as exc:  # a busy port, moto missing, a refused instance
        print(f"local stack did not start: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
