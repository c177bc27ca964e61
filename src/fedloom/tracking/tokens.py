"""Client tokens of a deployment: who may join, kept hashed in the run directory's database.

``fedloom token create NAME --run-dir DIR`` makes a token for the site ``NAME`` and prints it once; the store
keeps only its SHA-256 (``credentials`` table of ``DIR/run.db``). A site presents its token when it connects;
the server maps it back to the site's name, so a client cannot pose as another. Revoking a token shuts its
site out from the next connection or round on. Tokens are 256 random bits (``secrets``), prefixed so that a
token pasted in the wrong place is recognisable.

>>> tokens = TokenStore("runs/hospitals")                   # doctest: +SKIP
>>> token = tokens.create("hospital-a")                     # show it once, to hospital-a's operator
>>> tokens.authenticate(token)                              # doctest: +SKIP
'hospital-a'
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from fedloom.core.errors import ConfigError, RunStoreError
from fedloom.core.validation import check_client_name
from fedloom.tracking.failures import store_error
from fedloom.tracking.schema import connection, credentials, metadata, sqlite_engine, transaction
from fedloom.tracking.store import DB_NAME, utc

__all__ = ["TOKEN_PREFIX", "TokenInfo", "TokenStore"]

TOKEN_PREFIX = "flt_"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    """A token as listed: whose it is, when it was made, and when it was revoked (``None`` while it is valid)."""

    client_name: str
    created_at: datetime
    revoked_at: datetime | None


class TokenStore:
    """The tokens in the run directory ``run_dir`` (created, with its database, on first use).

    Safe to use from several threads and processes at once (SQLite serialises the writes): the server checks
    tokens while ``fedloom token revoke`` runs beside it. Every method raises :class:`RunStoreError` when the
    database cannot be read or written.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self._run_dir = Path(run_dir)
        self._db_path = self._run_dir / DB_NAME
        self._engine: Engine | None = None

    def _absent(self) -> bool:
        """Whether this run directory holds no token store yet (reading it then makes nothing)."""
        return self._engine is None and not (self._run_dir / DB_NAME).exists()

    def _db(self) -> Engine:
        if self._engine is None:
            try:
                self._run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RunStoreError(f"cannot create the run directory {self._run_dir}: {exc.strerror or exc}") from None
            engine = sqlite_engine(self._run_dir / DB_NAME)
            try:
                metadata.create_all(engine)
            except SQLAlchemyError as exc:
                engine.dispose()
                raise store_error(f"cannot open the run database in {self._run_dir}", exc, self._db_path) from None
            self._engine = engine
        return self._engine

    def create(self, client_name: str) -> str:
        """A new token for ``client_name``, returned once and stored hashed. Raises :class:`ConfigError` for a bad
        name or one that holds a valid token already (revoke it first)."""
        check_client_name(client_name)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        try:
            with transaction(self._db()) as conn:
                valid = conn.execute(
                    select(credentials.c.token_sha256).where(
                        credentials.c.client_name == client_name, credentials.c.revoked_at.is_(None)
                    )
                ).first()
                if valid is not None:
                    raise ConfigError(
                        f"client {client_name!r} has a valid token already; revoke it first "
                        f"(fedloom token revoke {client_name} --run-dir {self._run_dir})"
                    )
                conn.execute(
                    insert(credentials).values(
                        token_sha256=_digest(token), client_name=client_name, created_at=datetime.now(timezone.utc)
                    )
                )
        except SQLAlchemyError as exc:
            raise store_error(f"cannot store a token in {self._run_dir}", exc, self._db_path) from None
        return token

    def revoke(self, client_name: str) -> None:
        """Revoke the valid token of ``client_name``; :class:`ConfigError` if it has none."""
        if self._absent():
            raise ConfigError(f"client {client_name!r} has no valid token in {self._run_dir} (it holds no tokens)")
        try:
            with transaction(self._db()) as conn:
                done = conn.execute(
                    update(credentials)
                    .where(credentials.c.client_name == client_name, credentials.c.revoked_at.is_(None))
                    .values(revoked_at=datetime.now(timezone.utc))
                ).rowcount
        except SQLAlchemyError as exc:
            raise store_error(f"cannot revoke a token in {self._run_dir}", exc, self._db_path) from None
        if not done:
            raise ConfigError(f"client {client_name!r} has no valid token in {self._run_dir}")

    def list(self) -> list[TokenInfo]:
        """Every token ever made here, oldest first (the tokens themselves are not stored, so not shown)."""
        if self._absent():
            return []
        try:
            with connection(self._db()) as conn:
                rows = conn.execute(select(credentials).order_by(credentials.c.created_at)).all()
        except SQLAlchemyError as exc:
            raise store_error(f"cannot read the tokens in {self._run_dir}", exc, self._db_path) from None
        return [TokenInfo(r.client_name, utc(r.created_at) or r.created_at, utc(r.revoked_at)) for r in rows]

    def count_valid(self) -> int:
        """How many tokens are valid (not revoked)."""
        return sum(1 for info in self.list() if info.revoked_at is None)

    def authenticate(self, token: str) -> str | None:
        """The name of the client that holds ``token``, or ``None`` if it is unknown or revoked."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 256 or self._absent():
            return None
        digest = _digest(token)
        try:
            with connection(self._db()) as conn:
                # Looked up by the token's hash, so the lookup's timing says nothing about the token itself.
                name = conn.execute(
                    select(credentials.c.client_name).where(
                        credentials.c.token_sha256 == digest, credentials.c.revoked_at.is_(None)
                    )
                ).scalar()
        except SQLAlchemyError as exc:
            raise store_error(f"cannot read the tokens in {self._run_dir}", exc, self._db_path) from None
        return None if name is None else str(name)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
