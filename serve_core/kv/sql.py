"""The SQLAlchemy Core KV store: one table keyed by (namespace, key), SQLite or PostgreSQL.

Shaped after APScheduler's SQLAlchemy job store: it accepts a URL or an ``Engine``,
creates its table on first use (never in the constructor), runs every operation in one
``engine.begin()`` transaction, maps driver errors to :class:`~serve_core.errors.StoreError`
naming the URL (password hidden) and disposes the engine it created on :meth:`close`.
No SQL text is built from strings: statements come from the ``Table`` object.

SQLite engines created here run in WAL mode with a busy timeout, so several processes can
share one file (readers never block the writer; a writer waits for another instead of
failing). A plain ``postgresql://`` URL uses psycopg 3 (the ``postgres`` extra).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Engine, MetaData, String, Table, Text, create_engine, event, func, select
from sqlalchemy import delete as sql_delete
from sqlalchemy import update as sql_update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, ProgrammingError, SQLAlchemyError
from sqlalchemy.schema import CreateTable

from ..errors import StoreError
from .base import (
    MAX_KEY_LENGTH,
    MAX_NAMESPACE_LENGTH,
    UpdateBased,
    check_cas,
    check_key,
    check_namespace,
    decode_value,
    encode_items,
    encode_value,
)

log = logging.getLogger("serve_core")

DEFAULT_TABLE = "serve_core_kv"
SQLITE_BUSY_TIMEOUT_MS = 10_000  # a writer waits this long for another process's transaction
NOTIFY_CHANNEL = "serve_core_kv"  # PostgreSQL: compare_and_update notifies it with the namespace
LISTEN_WAKE_S = 0.5  # how often the listener looks up from its socket to see whether it must stop
LISTEN_RETRY_S = 5.0  # after a lost LISTEN connection, the wait before connecting again


def _table(name: str) -> Table:
    return Table(
        name,
        MetaData(),
        # 100: namespaces are short fixed names chosen by code ("registry", test names).
        Column("namespace", String(MAX_NAMESPACE_LENGTH), primary_key=True),
        # 255: a kind prefix plus an endpoint name or backend tag; (100 + 255) characters keep
        # the primary key within every database's index limit (MySQL: 3072 bytes in utf8mb4).
        Column("key", String(MAX_KEY_LENGTH), primary_key=True),
        # Unbounded: JSON text; a backend stored as a signed pickle can be large.
        Column("value", Text, nullable=False),
    )


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # The busy timeout first: switching to WAL takes a lock another process may hold.
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS:d}")  # an int constant, not input
        cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()


def to_url(url_or_path: str | URL) -> URL:
    """A SQLAlchemy URL from a URL or a file path (a path becomes a SQLite file URL).

    Raises:
        StoreError: the URL cannot be parsed.
    """
    if isinstance(url_or_path, URL):
        url = url_or_path
    elif "://" in str(url_or_path):
        try:
            url = make_url(str(url_or_path))
        except SQLAlchemyError as exc:
            raise StoreError(f"not a valid SQLAlchemy URL for the KV store: {exc}") from exc
    else:
        url = URL.create("sqlite", database=str(Path(url_or_path).expanduser().resolve()))
    if url.drivername == "postgresql":  # the driver we ship with (extra "postgres")
        url = url.set(drivername="postgresql+psycopg")
    return url


class SQLKVStore(UpdateBased):
    """A :class:`~serve_core.kv.base.KVStore` in a SQL database.

    Args:
        url_or_engine: a SQLAlchemy URL (``sqlite:///path``, ``postgresql+psycopg://…``),
            a SQLite file path, or an ``Engine`` (then owned by the caller: :meth:`close`
            leaves it alone, and its SQLite pragmas are the caller's business).
        namespace: the namespace this store reads and writes.
        table_name: the table shared by every namespace.

    Raises:
        StoreError: the URL is invalid or names an unknown driver.
    """

    def __init__(
        self, url_or_engine: str | URL | Engine, namespace: str, table_name: str = DEFAULT_TABLE
    ) -> None:
        self.namespace = check_namespace(namespace)
        self._owns_engine = not isinstance(url_or_engine, Engine)
        if isinstance(url_or_engine, Engine):
            self.engine = url_or_engine
        else:
            self.engine = self._create_engine(to_url(url_or_engine))
        self.url = self.engine.url.render_as_string(hide_password=True)
        self.table = _table(table_name)
        self._opened = False
        self._open_lock = threading.Lock()

    def _create_engine(self, url: URL) -> Engine:
        try:
            if url.get_backend_name() == "sqlite":
                engine = create_engine(url)
                event.listen(engine, "connect", _sqlite_pragmas)
                return engine
            return create_engine(url, pool_pre_ping=True)
        except SQLAlchemyError as exc:
            shown = url.render_as_string(hide_password=True)
            raise StoreError(f"KV store {shown}: cannot create an engine: {exc}") from exc
        except ImportError as exc:  # the dialect's driver is not installed
            shown = url.render_as_string(hide_password=True)
            extra = "pip install 'serve-core[postgres]'" if url.get_backend_name() == "postgresql" else (
                f"install the {url.get_backend_name()} driver {url.get_driver_name()!r}"
            )
            raise StoreError(f"KV store {shown}: its database driver is not installed ({exc}); {extra}") from exc

    @property
    def sqlite_path(self) -> Path | None:
        """The database file of a SQLite store, ``None`` for other databases."""
        database = self.engine.url.database
        if self.engine.url.get_backend_name() != "sqlite" or not database or database == ":memory:":
            return None
        return Path(database)

    # ------------------------------------------------------------ lifecycle
    def open(self) -> SQLKVStore:
        """Create the table if it is missing (done on first use anyway). Idempotent.

        Raises:
            StoreError: the database cannot be reached or the table not created.
        """
        with self._open_lock:
            if self._opened:
                return self
            try:
                self._create_table()
            except SQLAlchemyError as exc:
                raise self._error("cannot create the KV table", exc) from exc
            self._opened = True
        return self

    def _create_table(self) -> None:
        # IF NOT EXISTS, not a check then a CREATE: other processes may open the same store.
        # PostgreSQL can still fail two concurrent creators on its catalogue, with a unique
        # violation or "type ... already exists" (a ProgrammingError); the loser finds the table
        # there on its second try (any other error is raised by that try again).
        for attempt in range(2):
            try:
                with self.engine.begin() as conn:
                    conn.execute(CreateTable(self.table, if_not_exists=True))
                return
            except (IntegrityError, ProgrammingError):
                if attempt:
                    raise

    def close(self) -> None:
        """Dispose the engine's connections (only if this store created the engine)."""
        if self._owns_engine:
            self.engine.dispose()

    # ----------------------------------------------------------- operations
    def get(self, key: str, default: Any = None) -> Any:
        query = select(self.table.c.value).where(*self._where(check_key(key)))
        with self._begin("read", key) as conn:
            text = conn.execute(query).scalar_one_or_none()
        return default if text is None else decode_value(text)

    def as_dict(self) -> dict[str, Any]:
        query = select(self.table.c.key, self.table.c.value).where(self.table.c.namespace == self.namespace)
        with self._begin("read", "*") as conn:
            rows = conn.execute(query).all()
        return {key: decode_value(text) for key, text in rows}

    def update(self, items: Mapping[str, Any], delete: Iterable[str] = ()) -> None:
        encoded, deletes = encode_items(items, delete)
        if not encoded and not deletes:
            return
        with self._begin("write", ", ".join([*encoded, *deletes])) as conn:
            for key in deletes:
                conn.execute(sql_delete(self.table).where(*self._where(key)))
            self._upsert(conn, encoded)

    def compare_and_update(
        self, key: str, expected: Any, items: Mapping[str, Any], delete: Iterable[str] = ()
    ) -> bool:
        check_cas(key, items)
        encoded, deletes = encode_items(items, delete)
        if not self._opened:
            self.open()
        try:
            with self.engine.begin() as conn:
                # The swap is the transaction's first statement, a write: it takes the write lock
                # (SQLite) or the row lock (PostgreSQL) before anything is read, so a concurrent
                # writer either commits first and makes it miss, or waits for this one.
                if not self._swap(conn, key, expected, encoded[key]):
                    return False
                for name in deletes:
                    conn.execute(sql_delete(self.table).where(*self._where(name)))
                self._upsert(conn, {name: text for name, text in encoded.items() if name != key})
                if conn.dialect.name == "postgresql":
                    conn.execute(select(func.pg_notify(NOTIFY_CHANNEL, self.namespace)))
        except IntegrityError:  # the key was inserted by another writer first
            return False
        except SQLAlchemyError as exc:
            raise self._error(f"cannot write {key!r}", exc) from exc
        return True

    def _swap(self, conn: Connection, key: str, expected: Any, text: str) -> bool:
        if expected is None:
            conn.execute(self.table.insert().values(namespace=self.namespace, key=key, value=text))
            return True  # a row already there raised IntegrityError
        stmt = (
            sql_update(self.table)
            .where(*self._where(key), self.table.c.value == encode_value(key, expected))
            .values(value=text)
        )
        return bool(conn.execute(stmt).rowcount == 1)

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None] | None:
        """PostgreSQL: call ``callback()`` on every change committed to this namespace by any
        process (``LISTEN``/``NOTIFY`` on a connection of its own); other databases: ``None``."""
        if self.engine.dialect.name != "postgresql":
            return None
        listener = _Listener(self.engine, self.namespace, callback, self.url)
        listener.start()
        return listener.stop

    # -------------------------------------------------------------- helpers
    def _where(self, key: str) -> tuple[Any, ...]:
        return (self.table.c.namespace == self.namespace, self.table.c.key == key)

    def _upsert(self, conn: Connection, texts: Mapping[str, str]) -> None:
        """Insert or replace every key of ``texts``: one statement, executed for all rows at once."""
        if not texts:
            return
        rows = [{"namespace": self.namespace, "key": key, "value": text} for key, text in texts.items()]
        dialect = conn.dialect.name
        if dialect in ("sqlite", "postgresql"):
            insert = (sqlite.insert if dialect == "sqlite" else postgresql.insert)(self.table)
            conflict = ["namespace", "key"]
            upsert = insert.on_conflict_do_update(index_elements=conflict, set_={"value": insert.excluded.value})
            conn.execute(upsert, rows)
            return
        for key in texts:  # portable fallback
            conn.execute(sql_delete(self.table).where(*self._where(key)))
        conn.execute(self.table.insert(), rows)

    @contextlib.contextmanager
    def _begin(self, action: str, keys: str) -> Iterator[Connection]:
        """One transaction; driver errors become :class:`StoreError`."""
        if not self._opened:
            self.open()
        try:
            with self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise self._error(f"cannot {action} {keys[:200]!r}", exc) from exc

    def _error(self, what: str, exc: Exception) -> StoreError:
        reason = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
        detail = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
        return StoreError(f"KV store {self.url} (namespace {self.namespace!r}): {what}: {detail}")

    def __repr__(self) -> str:
        return f"<SQLKVStore {self.url} table={self.table.name!r} namespace={self.namespace!r}>"


class _Listener:
    """A thread that ``LISTEN``s on :data:`NOTIFY_CHANNEL` and calls back for one namespace.

    A lost connection is logged once and retried every :data:`LISTEN_RETRY_S`; whoever
    subscribed polls anyway, so a gap only delays.
    """

    def __init__(self, engine: Engine, namespace: str, callback: Callable[[], None], url: str) -> None:
        self._engine = engine
        self._namespace = namespace
        self._callback = callback
        self._url = url
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serve-kv-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not threading.current_thread():
            self._thread.join(LISTEN_WAKE_S * 4)

    def _run(self) -> None:
        warned = False
        while not self._stopping.is_set():
            try:
                self._listen()
            except Exception as exc:  # noqa: BLE001 - any driver error: fall back to polling, retry later
                if not warned:
                    log.warning("KV store %s: LISTEN failed (%s); changes are seen by polling", self._url, exc)
                    warned = True
                self._stopping.wait(LISTEN_RETRY_S)

    def _listen(self) -> None:
        raw = self._engine.raw_connection()
        conn: Any = raw.driver_connection  # a psycopg 3 Connection
        raw.detach()  # a connection of its own: it never goes back to the pool while listening
        try:
            conn.rollback()  # psycopg: autocommit can only be switched outside a transaction
            conn.autocommit = True
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")  # a constant identifier, not input
            while not self._stopping.is_set():
                for note in conn.notifies(timeout=LISTEN_WAKE_S):
                    if note.payload == self._namespace:
                        self._callback()
                    if self._stopping.is_set():
                        break
        finally:
            raw.close()
