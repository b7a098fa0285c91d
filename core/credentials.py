"""Connector credentials, encrypted at rest. Secrets go in and never come out of the API:
only the engine decrypts them, for the step that uses them."""

from __future__ import annotations

from typing import Any, Callable

from cachetools import TTLCache
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ipaas import reasons
from ipaas.crypto import SecretBox
from ipaas.errors import AlreadyExists, InvalidArgument, NotFound
from ipaas.ids import new_id
from ipaas.pagination import Page, PageRequest
from ipaas.singleflight import SingleFlight
from ipaas.storage.db import Database
from ipaas.storage.tables import Credential, utcnow

# (connector, secrets) -> [(field path, description)]; empty when the secrets are valid.
SecretsValidator = Callable[[str, dict[str, Any]], list[tuple[str, str]]]


# Steps read their credential on every run; the encrypted row is kept this long (seconds).
# A delete through this replica applies at once, through another within the TTL.
ROW_TTL = 1.0


class CredentialStore:
    def __init__(self, db: Database, box: SecretBox, validate_secrets: SecretsValidator) -> None:
        self.db = db
        self.box = box
        self.validate_secrets = validate_secrets
        # Only ciphertext is cached: secrets are decrypted for each step and never kept.
        self._rows: TTLCache[str, Credential | None] = TTLCache(maxsize=10_000, ttl=ROW_TTL)
        self._loads: SingleFlight[str, Credential | None] = SingleFlight()
        self._generation = 0
        # Called after a delete, so other processes that cache rows (engine processes) drop it.
        self.on_deleted: Callable[[str], None] = lambda credential_id: None

    async def create(self, tenant_id: str, connector: str, name: str, secrets: dict[str, Any]) -> Credential:
        name = name.strip()
        problems: list[tuple[str, str]] = []
        if not 1 <= len(name) <= 200:
            problems.append(("name", "must be 1 to 200 characters"))
        if not connector:
            problems.append(("connector", "is required"))
        else:
            problems += self.validate_secrets(connector, secrets)
        if problems:
            raise InvalidArgument.many(problems)
        row = Credential(
            id=new_id("cred"),
            tenant_id=tenant_id,
            connector=connector,
            name=name,
            fields=sorted(secrets),
            ciphertext=self.box.encrypt(secrets),
            created_at=utcnow(),
        )
        try:
            async with self.db.session() as s, s.begin():
                s.add(row)
        except IntegrityError:
            raise AlreadyExists(f"a {connector} credential named {name!r} already exists", reasons.CREDENTIAL_ALREADY_EXISTS) from None
        return row

    async def list(self, tenant_id: str, connector: str, paging: PageRequest) -> Page[Credential]:
        q = select(Credential).where(Credential.tenant_id == tenant_id).order_by(Credential.id.desc()).limit(paging.size + 1)
        if connector:
            q = q.where(Credential.connector == connector)
        if paging.after:
            q = q.where(Credential.id < paging.after)
        async with self.db.session() as s:
            rows = list((await s.scalars(q)).all())
        return Page.of(rows, paging, key=lambda c: c.id)

    async def get(self, tenant_id: str, credential_id: str) -> Credential:
        async with self.db.session() as s:
            row = await s.get(Credential, credential_id)
        if row is None or row.tenant_id != tenant_id:
            raise NotFound(f"credential {credential_id} not found", reasons.CREDENTIAL_NOT_FOUND(credentialId=credential_id))
        return row

    async def delete(self, tenant_id: str, credential_id: str) -> None:
        async with self.db.session() as s, s.begin():
            row = await s.get(Credential, credential_id)
            if row is None or row.tenant_id != tenant_id:
                raise NotFound(f"credential {credential_id} not found", reasons.CREDENTIAL_NOT_FOUND(credentialId=credential_id))
            await s.delete(row)
        self.forget(credential_id)
        self.on_deleted(credential_id)

    def forget(self, credential_id: str) -> None:
        self._generation += 1
        self._rows.pop(credential_id, None)

    async def _load(self, credential_id: str) -> Credential | None:
        generation = self._generation
        async with self.db.session() as s:
            row = await s.get(Credential, credential_id)
        if generation == self._generation:  # not forgotten while it loaded
            self._rows[credential_id] = row
        return row

    async def connectors_of(self, tenant_id: str, ids: set[str]) -> dict[str, str]:
        """credential id → connector, for the tenant's credentials among ids."""
        if not ids:
            return {}
        async with self.db.session() as s:
            rows = await s.execute(
                select(Credential.id, Credential.connector).where(Credential.tenant_id == tenant_id, Credential.id.in_(ids))
            )
            return {r.id: r.connector for r in rows}

    async def secrets(self, tenant_id: str, credential_id: str) -> dict[str, Any]:
        try:
            row = self._rows[credential_id]
        except KeyError:
            # When the TTL lapses every worker running a step with this credential misses at
            # once: one of them loads the row, the rest wait for it.
            row = await self._loads.do(credential_id, lambda: self._load(credential_id))
        if row is None or row.tenant_id != tenant_id:
            raise NotFound(f"credential {credential_id} not found", reasons.CREDENTIAL_NOT_FOUND(credentialId=credential_id))
        value = self.box.decrypt(row.ciphertext)
        assert isinstance(value, dict)
        return value
