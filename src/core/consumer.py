"""For the services that call ServiceNow: a `requests` auth that always sends the connection's current token.

    from core.consumer import servicenow_session
    session, base = servicenow_session("servicenow-oauth/prod")
    incidents = session.get(f"{base}/api/now/table/incident", params={"sysparm_limit": 10}).json()

Copy this module (and `servicenow.py` for the session) into your function, or import it from this
package. It calls `secretsmanager:GetSecretValue` only (the README's consumer policies allow exactly that).
The secret is read through Powertools' parameters utility with a short cache; on a 401 the
secret is fetched once more (the refresher may just have written a new token) and the request is
sent once more. Never twice, never a loop, and the token never reaches a log.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import requests
from aws_lambda_powertools.utilities import parameters
from requests.adapters import HTTPAdapter

from core.servicenow import HEADERS, retry_policy

DEFAULT_MAX_AGE = 60  # seconds; tokens are refreshed 10 minutes before they expire


class ServiceNowBearerAuth(requests.auth.AuthBase):
    """Adds `Authorization: Bearer <accessToken>` from the connection secret; refetches once on a 401."""

    def __init__(
        self, secret_id: str, *, max_age: int = DEFAULT_MAX_AGE, provider: Any = None, region: str | None = None
    ) -> None:
        self.secret_id = secret_id
        self.max_age = max_age
        if provider is None and region is not None:
            # A replica region's read-only copy (or any region's secret named by ARN): the same reads, there.
            import boto3

            provider = parameters.SecretsProvider(boto3_client=boto3.client("secretsmanager", region_name=region))
        self._provider = provider

    def document(self, *, force_fetch: bool = False) -> dict[str, Any]:
        if self._provider is not None:
            value = self._provider.get(self.secret_id, transform="json", max_age=self.max_age, force_fetch=force_fetch)
        else:
            value = parameters.get_secret(
                self.secret_id, transform="json", max_age=self.max_age, force_fetch=force_fetch
            )
        if not isinstance(value, dict) or not value.get("accessToken"):
            raise RuntimeError(f"secret {self.secret_id!r} holds no access token yet (status: {_status(value)})")
        return value

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        document = self.document()
        # The token goes to the connection's own instance and nowhere else (not to a mistyped or redirected host).
        if _host(request.url) != _host(document.get("instanceUrl")):
            raise ValueError(f"refusing to send the token for {self.secret_id!r} to another host than its instance")
        request.headers["Authorization"] = f"Bearer {document['accessToken']}"
        request.register_hook("response", self._retry_once_on_401)  # type: ignore[no-untyped-call]
        return request

    def _retry_once_on_401(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        if response.status_code != 401 or getattr(response.request, "_servicenow_retried", False):
            return response
        if _host(response.request.url) != _host(self.document().get("instanceUrl")):
            return response  # a redirect took us elsewhere: never hand that host a token
        fresh = self.document(force_fetch=True)["accessToken"]
        retry = response.request.copy()
        retry._servicenow_retried = True  # type: ignore[attr-defined]
        retry.headers["Authorization"] = f"Bearer {fresh}"
        response.content  # noqa: B018 - drain the first answer so its connection can be reused
        response.close()
        second = response.connection.send(retry, **kwargs)
        second.history.append(response)
        second.request = retry
        return second


def _host(url: Any) -> str:
    return urlsplit(str(url or "")).netloc.lower()


def _status(value: Any) -> str:
    return str(value.get("status", "unknown")) if isinstance(value, dict) else "unreadable"


def servicenow_session(
    secret_id: str, *, max_age: int = DEFAULT_MAX_AGE, provider: Any = None, region: str | None = None
) -> tuple[requests.Session, str]:
    """A pooled session with retries and the bearer auth, plus the instance's base URL. `region` reads the
    secret there (a replica, or a consumer in another region than the stack); `secret_id` may be a full ARN
    (a consumer in another account must name the secret by ARN)."""
    auth = ServiceNowBearerAuth(secret_id, max_age=max_age, provider=provider, region=region)
    # Retries for reads only: a Table API POST (create an incident) must not be sent twice.
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry_policy(retry_methods=("GET",)), pool_maxsize=16)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.headers.update(HEADERS)
    session.auth = auth
    return session, str(auth.document()["instanceUrl"])
