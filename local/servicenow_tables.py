"""The emulator's admin side of ServiceNow's Table API: what a tool writes to register an OAuth client.

Why: `make servicenow-client` creates the Application Registry entry, the certificate and the JWT verifier map
through `/api/now/table/...`, authenticated as an admin with Basic auth. The emulator must refuse it the way an
instance does (401 for wrong credentials, 403 without the admin or oauth_admin role), answer in ServiceNow's
shapes (`{"result": ...}`, every value a string, references as `{"link", "value"}`), and then *honour* what was
written: the entry's client id, secret, redirect URLs and lifespans at the token endpoint, the verifier map's
certificate, or the JWKS URL it fetches keys from. Table and field names: docs/servicenow-tables.md.
"""

from __future__ import annotations

import base64
import json
import secrets
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from local.servicenow_emulator import ServiceNowEmulator

OAUTH_ENTITY = "oauth_entity"
JWT_ENTITY = "oauth_jwt"  # a child table of oauth_entity: its rows answer queries of oauth_entity too
CERTIFICATE = "sys_certificate"
VERIFIER_MAP = "jwt_verifier_map"
MAP_ENTRY = "oauth_jwt"  # the verifier map's reference to its JWT entry
DICTIONARY = "sys_dictionary"
# The JWKS URL field of a JWT entry: Zurich and later only (a field older releases do not have).
JWKS_URL_FIELD = "jwks_url"
CLIENT_TYPE = "client"  # "OAuth API endpoint for external clients"
ADMIN_TABLES = frozenset({OAUTH_ENTITY, JWT_ENTITY, CERTIFICATE, VERIFIER_MAP, DICTIONARY})
ENTITIES = (OAUTH_ENTITY, JWT_ENTITY)
OPERATIONS = {"GET": "Read", "POST": "Insert", "PATCH": "Update", "PUT": "Update", "DELETE": "Delete"}
ADMIN_ROLES = frozenset({"admin", "oauth_admin"})
ENCRYPTED = "password2"  # what the Table API shows of a stored client secret: never the value itself

NOT_AUTHENTICATED = {
    "error": {"message": "User Not Authenticated", "detail": "Required to provide Auth information"},
    "status": "failure",
}
NOT_FOUND = {
    "error": {"message": "No Record found", "detail": "Record doesn't exist or ACL restricts the record retrieval"},
    "status": "failure",
}


def _not_authorized(operation: str) -> dict[str, Any]:
    return {
        "error": {
            "message": "Operation Failed",
            "detail": f"ACL Exception {operation} Failed due to security constraints",
        },
        "status": "failure",
    }


def _invalid(error: ValueError) -> dict[str, Any]:
    return {"error": {"message": "Invalid value", "detail": str(error)}, "status": "failure"}


@dataclass
class TableReply:
    status: int
    payload: Any = None


def _as_string(value: Any) -> str:
    """The Table API answers every value as a string (booleans as "true"/"false")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def parse_query(sysparm_query: str) -> list[tuple[str, str]]:
    """`a=b^c=d` into [(a, b), (c, d)]; only the equality conjunctions a registration tool sends."""
    terms = []
    for term in filter(None, sysparm_query.split("^")):
        if term.startswith("ORDERBY"):
            continue  # ordering: every answer here is in insertion order anyway
        field, equals, value = term.partition("=")
        if not equals:
            raise ValueError(term)
        terms.append((field, value))
    return terms


class AdminTables:
    """Rows of the admin tables, kept in step with the emulator's live OAuth configuration."""

    def __init__(self, emulator: ServiceNowEmulator, base_url: Callable[[], str]) -> None:
        self.emulator = emulator
        self.base_url = base_url
        self.rows: dict[str, dict[str, dict[str, str]]] = {table: {} for table in ADMIN_TABLES - {DICTIONARY}}
        self._secrets: dict[str, str] = {}  # oauth_entity sys_id -> client secret (never answered)

    # -------------------------------------------------------------- entry point (caller holds the lock)
    def handle(
        self, method: str, table: str, sys_id: str | None, query: dict[str, list[str]], body: bytes, user: str | None
    ) -> TableReply:
        """One Table API request to an admin table; `user` is the Basic-authenticated user or None."""
        if user is None:
            return TableReply(401, NOT_AUTHENTICATED)
        operation = OPERATIONS.get(method)
        if operation is None:
            return TableReply(405, {"error": {"message": "Method not Supported", "detail": None}, "status": "failure"})
        if not self.emulator.roles_of(user) & ADMIN_ROLES:
            return TableReply(403, _not_authorized(operation))
        if table == DICTIONARY:
            if method != "GET":
                return TableReply(403, _not_authorized(operation))
            try:
                return TableReply(200, {"result": self._dictionary(query)})
            except ValueError:
                return TableReply(400, {"error": {"message": "Invalid query", "detail": None}, "status": "failure"})
        rows = self.rows[table]
        if table == OAUTH_ENTITY and sys_id is not None and sys_id in self.rows[JWT_ENTITY]:
            table, rows = JWT_ENTITY, self.rows[JWT_ENTITY]  # a child row reached through its parent table
        if method == "GET":
            if sys_id is not None:
                row = rows.get(sys_id)
                return TableReply(200, {"result": self._show(table, row)}) if row else TableReply(404, NOT_FOUND)
            try:
                terms = parse_query((query.get("sysparm_query") or [""])[0])
            except ValueError:
                return TableReply(400, {"error": {"message": "Invalid query", "detail": None}, "status": "failure"})
            every = [*rows.values(), *(self.rows[JWT_ENTITY].values() if table == OAUTH_ENTITY else ())]
            found = [self._show(row["sys_class_name"], row) for row in every if all(row.get(f) == v for f, v in terms)]
            return TableReply(200, {"result": found})
        if method == "DELETE":
            if sys_id is None or sys_id not in rows:
                return TableReply(404, NOT_FOUND)
            self._delete(table, rows.pop(sys_id))
            return TableReply(204)
        try:
            fields = json.loads(body or b"{}")
            if not isinstance(fields, dict):
                raise ValueError
        except ValueError:
            return TableReply(400, {"error": {"message": "Exception while reading request", "detail": None}})
        if method == "POST":
            if sys_id is not None:
                return TableReply(405, {"error": {"message": "Method not Supported", "detail": None}})
            try:
                row = self._insert(table, fields, user)
            except ValueError as error:
                return TableReply(400, _invalid(error))
            return TableReply(201, {"result": self._show(table, row)})
        if sys_id is None or sys_id not in rows:
            return TableReply(404, NOT_FOUND)
        try:
            row = self._update(table, rows[sys_id], fields)
        except ValueError as error:
            return TableReply(400, _invalid(error))
        return TableReply(200, {"result": self._show(table, row)})

    # -------------------------------------------------------------- shapes
    def _reference(self, table: str, sys_id: str) -> dict[str, str]:
        return {"link": f"{self.base_url()}/api/now/table/{table}/{sys_id}", "value": sys_id}

    def _show(self, table: str, row: dict[str, str] | None) -> dict[str, Any]:
        shown: dict[str, Any] = dict(row or {})
        if table in ENTITIES and "sys_id" in shown:
            # Stored encrypted: the Table API shows ciphertext, never the secret (hence a locally made one).
            shown["client_secret"] = ENCRYPTED + ":" + base64.b64encode(secrets.token_bytes(24)).decode()
        if table == VERIFIER_MAP:
            for name, target in (("sys_certificate", CERTIFICATE), (MAP_ENTRY, JWT_ENTITY)):
                if shown.get(name):
                    shown[name] = self._reference(target, shown[name])
        return shown

    def _dictionary(self, query: dict[str, list[str]]) -> list[dict[str, str]]:
        """Which fields exist: how a tool tells a release with JWKS URLs from an older one."""
        terms = dict(parse_query((query.get("sysparm_query") or [""])[0]))
        fields = {(OAUTH_ENTITY, "redirect_url"), (OAUTH_ENTITY, "client_id"), (JWT_ENTITY, "user_field")}
        if self.emulator.supports_jwks:
            fields.add((JWT_ENTITY, JWKS_URL_FIELD))
        return [
            {"name": table, "element": element, "sys_id": f"{table}.{element}"}
            for table, element in sorted(fields)
            if terms.get("name", table) == table and terms.get("element", element) == element
        ]

    # -------------------------------------------------------------- writes and their effects
    @staticmethod
    def _reference_value(value: Any) -> str:
        return str(value.get("value", "")) if isinstance(value, dict) else _as_string(value)

    def _insert(self, table: str, fields: dict[str, Any], user: str) -> dict[str, str]:
        row = {name: self._reference_value(value) for name, value in fields.items()}
        row["sys_id"] = secrets.token_hex(16)
        row["sys_created_by"] = user
        row["sys_class_name"] = table
        if table in ENTITIES:
            row.setdefault("active", "true")
            row.setdefault("type", CLIENT_TYPE)
            if not row.get("client_id"):
                row["client_id"] = secrets.token_hex(16)  # the field's default: ServiceNow makes the id
            clients = [other.get("client_id") for entity in ENTITIES for other in self.rows[entity].values()]
            if row["client_id"] in clients:
                raise ValueError("client_id must be unique")
            self._secrets[row["sys_id"]] = row.pop("client_secret", "") or secrets.token_urlsafe(24)
            self._apply_entity(row)
        elif table == CERTIFICATE:
            self.emulator.parse_certificate(row.get("pem_certificate", ""))
        elif table == VERIFIER_MAP:
            self._apply_map(row, add=True)
        self.rows[table][row["sys_id"]] = row
        return row

    def _update(self, table: str, row: dict[str, str], fields: dict[str, Any]) -> dict[str, str]:
        changed = {
            name: self._reference_value(value)
            for name, value in fields.items()
            if name not in ("sys_id", "sys_class_name")
        }
        if table == VERIFIER_MAP:
            self._apply_map(row, add=False)
            row.update(changed)
            self._apply_map(row, add=True)
            return row
        if table in ENTITIES:
            if "client_id" in changed and changed["client_id"] != row["client_id"]:
                raise ValueError("client_id cannot change")  # refused whole: nothing of the request is kept
            if "client_secret" in changed:
                self._secrets[row["sys_id"]] = changed.pop("client_secret")
        if table == CERTIFICATE and "pem_certificate" in changed:
            self.emulator.parse_certificate(changed["pem_certificate"])
        if table == CERTIFICATE:
            maps = self._maps_of(row["sys_id"])
            for mapping in maps:
                self._apply_map(mapping, add=False)
            row.update(changed)
            for mapping in maps:  # a replaced or deactivated certificate is what its maps trust from now on
                self._apply_map(mapping, add=True)
            return row
        row.update(changed)
        if table in ENTITIES:
            self._apply_entity(row)
        return row

    def _maps_of(self, certificate_id: str) -> list[dict[str, str]]:
        return [m for m in self.rows[VERIFIER_MAP].values() if m.get("sys_certificate") == certificate_id]

    def _delete(self, table: str, row: dict[str, str]) -> None:
        if table in ENTITIES:
            self.emulator.unregister_client(row["client_id"])
            self._secrets.pop(row["sys_id"], None)
        elif table == VERIFIER_MAP:
            self._apply_map(row, add=False)
        elif table == CERTIFICATE:
            for mapping in self._maps_of(row["sys_id"]):  # a map whose certificate is gone trusts nothing
                self._apply_map(mapping, add=False)

    def _apply_entity(self, row: dict[str, str]) -> None:
        """What the token and authorize endpoints see of an entry: only an active one exists for them."""
        if row.get("active") != "true":
            self.emulator.unregister_client(row["client_id"])
            return

        def lifespan(name: str) -> int | None:
            value = row.get(name, "")
            return int(value) if value.isdigit() else None

        self.emulator.configure_client(
            row["client_id"],
            self._secrets[row["sys_id"]],
            [url.strip() for url in row.get("redirect_url", "").split(",") if url.strip()],
            access_lifespan=lifespan("access_token_lifespan"),
            refresh_lifespan=lifespan("refresh_token_lifespan"),
            user_field=row.get("user_field") or None,
            jwks_url=(row.get(JWKS_URL_FIELD) or None) if self.emulator.supports_jwks else None,
            jti_verification=row.get("enable_jti_verification", "true") != "false",
            clock_skew=lifespan("clock_skew"),
            jwks_cache_minutes=lifespan("jwks_cache_lifespan"),
        )
        for mapping in self.rows[VERIFIER_MAP].values():
            if mapping.get(MAP_ENTRY) == row["sys_id"]:
                self._apply_map(mapping, add=True)

    def _apply_map(self, row: dict[str, str], *, add: bool) -> None:
        """A verifier map trusts its certificate for its kid on its entry (while both exist and it is active)."""
        entity = self.rows[JWT_ENTITY].get(row.get(MAP_ENTRY, ""))
        certificate = self.rows[CERTIFICATE].get(row.get("sys_certificate", ""))
        if entity is None or entity.get("active") != "true" or not row.get("kid"):
            return
        trusted = certificate is not None and certificate.get("active", "true") == "true"
        if add and trusted and certificate is not None and row.get("active", "true") == "true":
            self.emulator.add_jwt_verifier(entity["client_id"], row["kid"], certificate.get("pem_certificate", ""))
        elif not add:
            self.emulator.remove_jwt_verifier(entity["client_id"], row["kid"])


def basic_user(authorization: str, check: Callable[[str, str], bool]) -> str | None:
    """The user a Basic Authorization header proves, or None."""
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        username, colon, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return username if colon and check(username, password) else None


def split_table_path(path: str, prefix: str) -> tuple[str, str | None] | None:
    """`/api/now/table/<table>[/<sys_id>]` into (table, sys_id)."""
    parts = path[len(prefix) :].split("/")
    if not parts[0] or len(parts) > 2 or (len(parts) == 2 and not parts[1]):
        return None
    return urllib.parse.unquote(parts[0]), (urllib.parse.unquote(parts[1]) if len(parts) == 2 else None)
