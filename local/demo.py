"""`make demo`: one connection's whole life on this machine, with no person and no AWS account.

It starts the local stack (moto + ServiceNow emulator + the real callback and refresh handlers),
walks the consent as a browser would, lets the scheduled refresher run, and prints a redacted
timeline. It exits non-zero if any step does not end as the product promises.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

import requests

from local.servicenow_emulator import press_consent
from local.stack import LocalStack

# ServiceNow's access token lives 1800 s; the consent's token gets 600 s (expires_in 599), inside the
# refresher's 600 s leeway as soon as it is issued, so the demo sees a refresh without waiting.
DEMO_ACCESS_LIFESPAN = 600


class Timeline:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def say(self, actor: str, text: str) -> None:
        print(f"{time.monotonic() - self.start:6.2f}s  {actor:<11} {text}", flush=True)


class DemoFailed(Exception):
    pass


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise DemoFailed(what)


def _admin(stack: LocalStack) -> tuple[str, str]:
    assert stack.emulator is not None
    return ("admin", stack.emulator.admin_password)


def set_access_lifespan(stack: LocalStack, client_id: str, seconds: int) -> None:
    """What an admin changes on the registry entry (Access Token Lifespan), through the Table API."""
    entries = f"{stack.instance_url}/api/now/table/oauth_entity"
    found = requests.get(entries, params={"sysparm_query": f"client_id={client_id}"}, auth=_admin(stack), timeout=10)
    sys_id = found.json()["result"][0]["sys_id"]
    changed = requests.patch(
        f"{entries}/{sys_id}", json={"access_token_lifespan": str(seconds)}, auth=_admin(stack), timeout=10
    )
    expect(changed.status_code == 200, f"the registry entry could not be changed ({changed.status_code})")


def run() -> int:
    timeline = Timeline()
    with LocalStack(refresh_interval=None, access_lifespan=DEMO_ACCESS_LIFESPAN) as stack:
        assert stack.emulator is not None
        timeline.say("stack", f"API {stack.api.url}, ServiceNow emulator {stack.emulator.url}, moto {stack.moto.url}")
        name = stack.connection
        for line in stack.registered[name].splitlines()[:-2]:  # the link comes next, from the operator
            servicenow = re.match(r"ServiceNow \([^)]*\): ", line)
            timeline.say("servicenow" if servicenow else "operator", line[servicenow.end() if servicenow else 0 :])
        document = json.loads(stack.read_secret()["SecretString"])
        timeline.say(
            "secret",
            f"{stack.secret_id()}: status {document['status']}, client id and secret from the registration "
            "(the secret made locally, never printed; the code exchange below proves ServiceNow holds it)",
        )

        link = stack.authorize_link()
        timeline.say("operator", f"signed authorize link for {name!r} (expires in 15 minutes)")
        answer = requests.get(link, allow_redirects=False, timeout=10)
        expect(answer.status_code == 302, f"authorize answered {answer.status_code}, expected a redirect")
        consent_url = answer.headers["Location"]
        timeline.say(
            "browser", f"302 to {urlsplit(consent_url).netloc}{urlsplit(consent_url).path} (state + PKCE S256)"
        )
        redirect = press_consent(consent_url, "allow")
        expect("code" in redirect, "ServiceNow did not redirect with a code")
        timeline.say("person", "pressed Allow; ServiceNow redirected the browser to /callback with code and state")
        page = requests.get(stack.callback_url, params=redirect, timeout=10)
        expect(page.status_code == 200 and "is authorized" in page.text, f"callback answered {page.status_code}")
        timeline.say("callback", f"200 'Connection {name} to {stack.emulator.url.split('//')[1]} is authorized'")

        consented = json.loads(stack.read_secret()["SecretString"])
        expect(consented["status"] == "active", "the secret is not active after the consent")
        expect(all(consented["accessToken"] not in text for text in (page.text, link)), "a token leaked into a page")
        timeline.say(
            "secret",
            f"status active; access token until {consented['accessTokenExpiresAt']}, "
            f"refresh token until {consented['refreshTokenExpiresAt']}",
        )

        # The registry entry now hands out ServiceNow's default 1800 s tokens; the one stored is due.
        set_access_lifespan(stack, document["clientId"], 1800)
        counts = stack.sweep()
        timeline.say("eventbridge", f"sweep 1: {counts} (the access token was inside the 600 s leeway)")
        expect(counts.get("refreshed") == 1, "the due connection was not refreshed")
        refreshed = json.loads(stack.read_secret()["SecretString"])
        expect(refreshed["accessTokenExpiresAt"] > consented["accessTokenExpiresAt"], "the expiry did not move out")
        expect(refreshed["refreshToken"] == consented["refreshToken"], "the refresh token changed")
        expect(refreshed["refreshTokenExpiresAt"] == consented["refreshTokenExpiresAt"], "refresh expiry moved")
        timeline.say(
            "secret",
            f"access token until {refreshed['accessTokenExpiresAt']}; same refresh token, its expiry unchanged "
            "(a refresh grant never extends it)",
        )
        versions = len(stack.secretsmanager.list_secret_version_ids(SecretId=stack.secret_id())["Versions"])
        counts = stack.sweep()
        after = len(stack.secretsmanager.list_secret_version_ids(SecretId=stack.secret_id())["Versions"])
        timeline.say("eventbridge", f"sweep 2: {counts}; secret versions {versions} -> {after} (no write)")
        expect(counts.get("not_due") == 1 and after == versions, "a not-due sweep wrote to the secret")

        # Machine-to-machine connections: no consent, no refresh token, the private key never outside KMS. One is
        # trusted through its JWKS URL (Zurich and later), the other through a certificate in a verifier map.
        for jwt_name, trust in (("jwt-demo", "jwks"), ("jwt-maps", "verifier_map")):
            key = stack.create_jwt_connection(jwt_name, trust=trust)
            how = (
                f"its JWKS URL {stack.api.url}/connections/{jwt_name}/jwks.json"
                if trust == "jwks"
                else "a certificate signed by kms:Sign and a verifier map"
            )
            timeline.say(
                "servicenow", f"registered {jwt_name!r} (KMS key {key.rsplit('/', 1)[1][:8]}...), trusted through {how}"
            )
        fetches = stack.emulator.jwks_fetches
        counts = stack.sweep()
        timeline.say("eventbridge", f"sweep 3: {counts} (assertions signed by kms:Sign, a fresh jti each)")
        expect(stack.emulator.jwks_fetches == fetches + 1, "ServiceNow did not fetch the JWKS URL once")
        for jwt_name in ("jwt-demo", "jwt-maps"):
            jwt = json.loads(stack.read_secret(jwt_name)["SecretString"])
            expect(jwt["status"] == "active" and "refreshToken" not in jwt, f"{jwt_name} did not get a token")
            timeline.say(
                "secret", f"{jwt_name}: access token until {jwt['accessTokenExpiresAt']}; no refresh token exists"
            )
        status = requests.get(f"{stack.api.url}/status", timeout=30)
        expect(status.status_code == 200 and "jwt-demo" in status.text, "the status page does not show the connections")
        expect(consented["refreshToken"] not in status.text, "a token reached the status page")
        timeline.say(
            "dashboard", f"{stack.api.url}/status: every connection's health (what the CloudWatch widget shows)"
        )
        timeline.say(
            "done", f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} connection {name!r} is live; no token was printed"
        )
    return 0


def main() -> int:
    # The handlers' structured INFO logs would drown the timeline; warnings and errors still show.
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")
    try:
        return run()
    except DemoFailed as failure:
        print(f"demo failed: {failure}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
