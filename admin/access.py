"""Who may read a connection: the secret's resource policy, for consumers in other accounts, and replica regions.

A connection's readers are exactly the principals in one statement of its secret's resource policy
(`secretsmanager:GetSecretValue` and `DescribeSecret`). Principals are parsed here, never copied from input:
an AWS account id (its root, i.e. whatever that account's IAM allows) or an IAM role ARN; a wildcard, a
user, a service or anything that does not parse is refused before any call. Every policy is checked by
Secrets Manager's `ValidateResourcePolicy` and put with `BlockPublicPolicy`. Another account can decrypt the
secret only if it is encrypted with a customer-managed key: the AWS managed `aws/secretsmanager` key cannot
be shared, so such a grant is refused with what to do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from botocore.exceptions import ClientError

from core.errors import ServiceNowOAuthError

STATEMENT_ID = "ServiceNowOAuthConsumers"
READ_ACTIONS = ("secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret")
DEFAULT_KEY_ALIAS = "alias/aws/secretsmanager"
# ASCII only: `\d` and `\w` would take other scripts' digits and letters, which IAM refuses.
_ACCOUNT = re.compile(r"^[0-9]{12}$")
_ROLE_ARN = re.compile(r"^arn:(aws|aws-cn|aws-us-gov):iam::([0-9]{12}):role/([A-Za-z0-9_+=,.@/-]{1,512})$")
_ROOT_ARN = re.compile(r"^arn:(aws|aws-cn|aws-us-gov):iam::([0-9]{12}):root$")
_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-[0-9]{1,2}$")


class AccessError(ServiceNowOAuthError):
    """A principal or region that cannot be used, or a grant the secret's encryption cannot honour."""


def parse_principal(text: str, *, partition: str = "aws") -> str:
    """An account id or IAM role ARN, as the ARN a policy names (an account id becomes its root)."""
    value = text.strip()
    if _ACCOUNT.match(value):
        return f"arn:{partition}:iam::{value}:root"
    if _ROLE_ARN.match(value) or _ROOT_ARN.match(value):
        return value
    raise AccessError(
        f"{value!r} is not an AWS account id (12 digits) or an IAM role ARN (arn:aws:iam::123456789012:role/name); "
        "wildcards, users and services are refused"
    )


def account_of(principal: str) -> str:
    return principal.split(":")[4]


def account_of_secret(secret_arn: str) -> str:
    return secret_arn.split(":")[4]


def parse_region(text: str, *, primary: str, known: Iterable[str]) -> str:
    """A replica region: well formed, one AWS knows for Secrets Manager, and not the primary."""
    value = text.strip()
    if not _REGION.match(value) or value not in set(known):
        raise AccessError(f"{value!r} is not a region Secrets Manager offers (for example eu-west-1)")
    if value == primary:
        raise AccessError(f"{value!r} is the primary region: a replica must be in another one")
    return value


def policy_document(principals: Iterable[str]) -> dict[str, Any]:
    """The resource policy naming exactly these readers."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": STATEMENT_ID,
                "Effect": "Allow",
                "Principal": {"AWS": sorted(set(principals))},
                "Action": list(READ_ACTIONS),
                "Resource": "*",
            }
        ],
    }


def _statements(policy: str | None) -> list[Any]:
    if not policy:
        return []
    try:
        document = json.loads(policy)
    except ValueError:
        return []
    statements = document.get("Statement", []) if isinstance(document, dict) else []
    return statements if isinstance(statements, list) else [statements]


def readers(policy: str | None) -> list[str]:
    """The principals our statement names in a resource policy (others' statements are not ours to show)."""
    for statement in _statements(policy):
        if isinstance(statement, dict) and statement.get("Sid") == STATEMENT_ID:
            principal = statement.get("Principal", {})
            names = principal.get("AWS", []) if isinstance(principal, dict) else []
            return sorted([names] if isinstance(names, str) else [str(name) for name in names])
    return []


def with_readers(policy: str | None, principals: Iterable[str]) -> dict[str, Any] | None:
    """The resource policy with our statement naming exactly `principals` and everyone else's statements kept
    as they are (a guardrail Deny, a backup account's read); None when nothing is left to put."""
    others = [s for s in _statements(policy) if not (isinstance(s, dict) and s.get("Sid") == STATEMENT_ID)]
    ours = policy_document(principals)["Statement"] if list(principals) else []
    if not others and not ours:
        return None
    return {"Version": "2012-10-17", "Statement": others + ours}


class ConnectionAccess:
    """Reads and changes a connection secret's readers through an injected Secrets Manager client."""

    def __init__(self, secretsmanager: Any) -> None:
        self.client = secretsmanager

    def check(self, connection: str, principals: list[str]) -> None:
        """Ask Secrets Manager to validate the policy a new connection will get, before it exists."""
        self._validate(connection, json.dumps(policy_document(principals)))

    def _validate(self, connection: str, policy: str, **secret: str) -> None:
        answer = self.client.validate_resource_policy(ResourcePolicy=policy, **secret)
        if not answer.get("PolicyValidationPassed", False):
            problems = "; ".join(str(e.get("ErrorMessage", "")) for e in answer.get("ValidationErrors", []))
            raise AccessError(
                f"connection {connection!r}: Secrets Manager refused the policy ({problems}); nothing was changed"
            )

    def _policy(self, secret_id: str) -> str | None:
        policy: str | None = self.client.get_resource_policy(SecretId=secret_id).get("ResourcePolicy")
        return policy

    def readers(self, secret_id: str) -> list[str]:
        return readers(self._policy(secret_id))

    def grant(self, connection: str, secret_id: str, principal: str) -> list[str]:
        """Add a reader; refuses another account's reader while the secret uses the AWS managed key."""
        described = self.client.describe_secret(SecretId=secret_id)
        if account_of(principal) != account_of_secret(described["ARN"]) and uses_default_key(described):
            raise AccessError(
                f"connection {connection!r}: its secret is encrypted with the AWS managed key aws/secretsmanager, "
                "which other accounts cannot use. Deploy the stack with SecretsKmsKeyArn=create (or your own "
                "customer-managed key), re-encrypt the secret with `aws secretsmanager "
                "update-secret --secret-id <secret> --kms-key-id <the stack's SecretsKmsKeyArn output>`, and grant "
                "again; nothing was changed"
            )
        policy = self._policy(secret_id)
        current = readers(policy)
        if principal in current:
            return current
        return self._put(connection, secret_id, policy, [*current, principal])

    def revoke(self, connection: str, secret_id: str, principal: str) -> list[str]:
        """Remove a reader (also one AWS now shows by its unique id, because its role was deleted)."""
        policy = self._policy(secret_id)
        current = readers(policy)
        if principal not in current:
            raise AccessError(f"connection {connection!r}: {principal} is not one of its readers; nothing was changed")
        return self._put(connection, secret_id, policy, [name for name in current if name != principal])

    def _put(self, connection: str, secret_id: str, policy: str | None, principals: list[str]) -> list[str]:
        document = with_readers(policy, principals)
        if document is None:
            self.client.delete_resource_policy(SecretId=secret_id)
            return []
        text = json.dumps(document)
        self._validate(connection, text, SecretId=secret_id)
        try:
            self.client.put_resource_policy(SecretId=secret_id, ResourcePolicy=text, BlockPublicPolicy=True)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "ClientError")
            raise AccessError(
                f"connection {connection!r}: the policy was not put ({code}); nothing was changed"
            ) from None
        return sorted(set(principals))


def uses_default_key(described: Mapping[str, Any]) -> bool:
    """Whether a secret (DescribeSecret's answer) is encrypted with the AWS managed key."""
    key = described.get("KmsKeyId")
    return not key or str(key).endswith(DEFAULT_KEY_ALIAS)
