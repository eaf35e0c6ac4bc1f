"""Found by review: a staged key whose public half KMS refuses to the stack made the JWKS route fail the whole set,
so ServiceNow, refetching, stopped trusting the current key too. The current key is now always published."""

from __future__ import annotations

import json
from typing import Any

import pytest
from botocore.exceptions import ClientError

import local.servicenow_emulator as emulator_module
from local.stack import LocalStack


class RefusingKms:
    """The stack's KMS client, except that kms:GetPublicKey is refused for one key (its key policy does not name
    the stack's role yet, as for a key made outside the stack)."""

    def __init__(self, real: Any, refused_key: str) -> None:
        self.real = real
        self.refused_key = refused_key

    def get_public_key(self, **kwargs: Any) -> Any:
        if kwargs.get("KeyId") == self.refused_key:
            raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "GetPublicKey")
        return self.real.get_public_key(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_staging_a_key_kms_refuses_keeps_the_current_jwks_key_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guarantee (a): staging a next key whose public key KMS refuses to the stack must not cost the current key
    its trust. The JWKS route fails the whole set when the staged key fails, so once ServiceNow refetches the
    JWKS (its cache expires), it trusts nothing: the connection can no longer get a token with its current key,
    the secret still names the old (previously trusted) key, and rerunning stage-jwt-key does not fix it."""
    with LocalStack(refresh_interval=None) as stack:
        assert stack.emulator is not None and stack.handler is not None
        stack.create_jwt_connection("machine", key_id="key-1", trust="jwks")
        # ServiceNow's JWKS cache has expired every time it verifies (as after its hour); the stack's own cache too.
        monkeypatch.setattr(emulator_module, "JWKS_CACHE_SECONDS", 0)
        monkeypatch.setattr(stack.handler.publisher, "max_age", 0)

        code, out, err = stack.admin("refresh", "machine", "--force")
        assert (code, err) == (0, "") and "refreshed" in out, (out, err)  # the current key is trusted

        new = stack.new_signing_key()
        monkeypatch.setattr(stack.handler.publisher, "kms", RefusingKms(stack.handler.publisher.kms, new))
        stage = ["connections", "stage-jwt-key", "machine", "--jwt-key-id", "key-2", "--jwt-kms-key", new]
        code, out, err = stack.admin(*stage)
        assert (code, err) == (0, ""), err
        document = json.loads(stack.read_secret("machine")["SecretString"])
        assert document["jwtKeyId"] == "key-1" and document["jwtKeyIdNext"] == "key-2"

        # A rerun of the staging is what the guarantee allows as the fix.
        code, out, err = stack.admin(*stage)
        assert (code, err) == (0, ""), err

        # The secret still uses key-1, which ServiceNow trusted a moment ago: a token must still be had with it.
        code, out, err = stack.admin("refresh", "machine", "--force")
        assert (code, err) == (0, "") and "refreshed" in out, (
            "after staging a key KMS refuses, the current key-1 is no longer trusted through the JWKS URL",
            code,
            out,
            err,
        )
