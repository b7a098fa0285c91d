"""Tenants and their API keys."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, select

from ipaas import auth, reasons
from ipaas.errors import InvalidArgument, NotFound, Unauthenticated
from ipaas.ids import new_id
from ipaas.pagination import Page, PageRequest
from ipaas.storage.db import Database
from ipaas.storage.tables import ApiKey, Tenant, utcnow

TIERS = ("free", "paid")


@dataclass(frozen=True)
class NewKey:
    key: ApiKey
    secret: str


# Built once: every call is authenticated with it, and building a statement (and its cache
# key) costs about as much as running it on SQLite.
_CALLER = (
    select(ApiKey.id, ApiKey.tenant_id, Tenant.tier)
    .join(Tenant, Tenant.id == ApiKey.tenant_id)
    .where(ApiKey.key_hash == bindparam("digest"), ApiKey.revoked_at.is_(None))
)


class TenantStore:
    def __init__(self, db: Database, admin_key: str) -> None:
        self.db = db
        self._admin_hash = auth.hash_key(admin_key)

    async def create_tenant(self, name: str, tier: str) -> Tenant:
        name = name.strip()
        tier = tier or "free"
        violations = []
        if not 1 <= len(name) <= 200:
            violations.append(("name", "must be 1 to 200 characters"))
        if tier not in TIERS:
            violations.append(("tier", f"must be one of {', '.join(TIERS)}"))
        if violations:
            raise InvalidArgument.many(violations)
        tenant = Tenant(id=new_id("tn"), name=name, tier=tier, created_at=utcnow())
        async with self.db.session() as s, s.begin():
            s.add(tenant)
        return tenant

    async def list_tenants(self, paging: PageRequest) -> Page[Tenant]:
        q = select(Tenant).order_by(Tenant.id.desc()).limit(paging.size + 1)
        if paging.after:
            q = q.where(Tenant.id < paging.after)
        async with self.db.session() as s:
            rows = list((await s.scalars(q)).all())
        return Page.of(rows, paging, key=lambda t: t.id)

    async def get_tenant(self, tenant_id: str) -> Tenant:
        async with self.db.session() as s:
            tenant = await s.get(Tenant, tenant_id)
        if tenant is None:
            raise NotFound(f"tenant {tenant_id} not found", reasons.TENANT_NOT_FOUND(tenantId=tenant_id))
        return tenant

    async def create_key(self, tenant_id: str, name: str) -> NewKey:
        await self.get_tenant(tenant_id)
        secret = auth.new_key()
        key = ApiKey(
            id=new_id("key"),
            tenant_id=tenant_id,
            name=(name or "").strip()[:200],
            prefix=secret[:8],
            key_hash=auth.hash_key(secret),
            created_at=utcnow(),
        )
        async with self.db.session() as s, s.begin():
            s.add(key)
        return NewKey(key=key, secret=secret)

    async def list_keys(self, tenant_id: str, paging: PageRequest) -> Page[ApiKey]:
        await self.get_tenant(tenant_id)
        q = select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.id.desc()).limit(paging.size + 1)
        if paging.after:
            q = q.where(ApiKey.id < paging.after)
        async with self.db.session() as s:
            rows = list((await s.scalars(q)).all())
        return Page.of(rows, paging, key=lambda k: k.id)

    async def revoke_key(self, key_id: str) -> ApiKey:
        async with self.db.session() as s, s.begin():
            key = await s.get(ApiKey, key_id)
            if key is None:
                raise NotFound(f"API key {key_id} not found", reasons.API_KEY_NOT_FOUND(keyId=key_id))
            if key.revoked_at is None:
                key.revoked_at = utcnow()
        return key

    async def authenticate(self, presented: str | None) -> auth.Caller:
        """The caller a bearer key belongs to. Looked up on every call, so revocation is immediate."""
        if not presented:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'", reasons.API_KEY_MISSING)
        digest = auth.hash_key(presented)
        if auth.keys_match(digest, self._admin_hash):
            return auth.ADMIN
        row = await self.db.read(lambda conn: conn.execute(_CALLER, {"digest": digest}).first())
        if row is None:
            raise Unauthenticated("invalid or revoked API key", reasons.API_KEY_INVALID)
        return auth.Caller(tenant_id=row.tenant_id, tier=row.tier, key_id=row.id)
