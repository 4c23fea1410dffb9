"""Where a study lives: storage URLs (SQLite by default, PostgreSQL for several machines),
passwords kept out of every message, and the run folder's preparation lock.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna

from nas_fair.errors import UserError

# ---------------------------------------------------------------------- study storage


def default_storage(run_dir: Path, *, read_only: bool = False) -> str:
    """The run folder's SQLite URL; an existing 0-byte study.db (a truncated copy, a full disk)
    is refused: SQLite would silently start a new study in it beside the old reference.

    ``read_only``: opened read-only (a shared, finished study on a read-only folder). A WAL
    database without its ``-shm`` file cannot be opened read-only there unless SQLite is told
    the file is immutable; with ``-shm`` present (a search may still write) it reads normally.
    """
    path = (run_dir / "study.db").resolve()
    if path.is_file() and path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes), so the study's trials are gone from it: "
                        "restore it from a backup, or delete it to start the study again")
    if not read_only:
        return f"sqlite:///{path}"
    from urllib.parse import quote

    # Quoted twice: SQLAlchemy decodes the path once, SQLite decodes its URI file name again.
    name = quote(quote(str(path), safe="/"), safe="/")
    shm = path.with_name(path.name + "-shm").exists()
    return f"sqlite:///file:{name}?mode=ro{'' if shm else '&immutable=1'}&uri=true"


def _read_only_url(url: str) -> bool:
    """A SQLite URL opened read-only (``mode=ro`` or ``immutable=1``): nothing may be written."""
    query = url.partition("?")[2].split("&")
    return url.startswith("sqlite") and ("mode=ro" in query or "immutable=1" in query)


def read_only_error(run_dir: Path, need: str, fix: str = "") -> UserError:
    """The one-line error for a write a read-only run folder cannot take."""
    fix = fix or "copy the run folder somewhere writable and give --run-dir COPY"
    return UserError(f"the run folder {run_dir} is read-only and {need}: {fix}")


_QUERY_SECRETS = frozenset({"password", "passwd", "pwd"})


def _parsed(url: str) -> Any:
    """SQLAlchemy's own reading of ``url`` (what the driver receives), or None."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError, TypeError):
        return None


def shown_url(url: str) -> str:
    """A storage URL fit to print or store: its password (and any password query parameter)
    replaced by ``***``, as SQLAlchemy parses it; an unparseable URL keeps only its scheme."""
    parsed = _parsed(url)
    if parsed is None:
        return url if "@" not in url else url.split("://", 1)[0] + "://***"
    hidden = {k: "***" for k in parsed.query if k.lower() in _QUERY_SECRETS}
    if parsed.password is None and not hidden:
        return url  # nothing secret: shown exactly as given (rendering would re-encode paths)
    if parsed.host and "@" in parsed.host:  # "u:p@ss@host": SQLAlchemy splits at the first @
        parsed = parsed.set(password=parsed.password or "", host=parsed.host.rsplit("@", 1)[1])
    if hidden:
        parsed = parsed.update_query_dict(hidden)
    return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def _url_secrets(url: str) -> list[str]:
    """The password(s) a URL carries, as written and as decoded, to scrub them from messages."""
    from urllib.parse import quote, quote_plus

    parsed = _parsed(url)
    if parsed is None:
        return [url.split("://", 1)[1].rsplit("@", 1)[0]] if "://" in url and "@" in url else []
    found = [parsed.password] if parsed.password else []
    if parsed.host and "@" in parsed.host:
        # the user's password had an unencoded "@": its head went to the driver as the
        # password, its tail into the host name; scrub the whole and the tail, not the head alone
        tail = parsed.host.rsplit("@", 1)[0]
        found = [f"{parsed.password or ''}@{tail}", f"{tail}@"]
    for key, value in parsed.query.items():
        if key.lower() in _QUERY_SECRETS:
            found += [value] if isinstance(value, str) else list(value)
    return [s for pw in found if pw for s in {pw, quote(pw, safe=""), quote_plus(pw)}]


def scrub(text: str, url: str) -> str:
    """``text`` with exactly the credentials of ``url`` blanked (driver errors may quote them)."""
    text = text.replace(url, shown_url(url))
    for secret in sorted(_url_secrets(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage with heartbeats (dead remote workers' trials are retried).

    SQLite: WAL journal and a 60 s busy timeout, so local workers (``--jobs``) wait for each
    other's short write transactions instead of failing with "database is locked". Several
    workers creating the schema at once (PostgreSQL) is retried: one creates, the others load.
    """
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    kwargs: dict[str, Any] = {}
    sqlite = url.startswith("sqlite")
    if sqlite:
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    elif url.startswith("postgres"):
        # An unreachable host fails in seconds, not after the OS's TCP timeout; a connection
        # dropped during an hour-long trial is replaced instead of failing the trial.
        kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": 10},
                                   "pool_pre_ping": True}
    for attempt in range(5):
        try:
            storage = RDBStorage(
                _with_driver(url), heartbeat_interval=20, grace_period=120,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                **kwargs,
            )
            break
        except Exception as exc:  # noqa: BLE001 - every failure here is one line for the user
            if _schema_race(exc) and attempt < 4:
                time.sleep(0.2 + 0.5 * attempt)
                continue
            raise UserError(_storage_error(url, exc)) from None
    if sqlite and not _read_only_url(url):
        _sqlite_wal(storage)
    return storage


def _with_driver(url: str) -> str:
    """``postgresql://`` means whichever driver is installed (SQLAlchemy 2.0 assumes psycopg2,
    2.1 psycopg 3): pick the one present, so either ``pip install`` works."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    import importlib.util

    for module, driver in (("psycopg2", "psycopg2"), ("psycopg", "psycopg")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://{rest}"
    raise UserError(f"cannot open storage {shown_url(url)!r}: no PostgreSQL driver is installed; "
                    "pip install psycopg2-binary (or nas-fair[postgres])")


def _schema_race(exc: BaseException) -> bool:
    """Another worker was creating the same tables at the same moment."""
    try:
        from sqlalchemy.exc import IntegrityError, ProgrammingError
    except ImportError:  # pragma: no cover - sqlalchemy comes with optuna
        return False
    return isinstance(exc, (IntegrityError, ProgrammingError))


def _storage_error(url: str, exc: BaseException) -> str:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    hint = ""
    if isinstance(exc, ImportError) and url.startswith("postgres"):
        hint = "; install the driver: pip install psycopg2-binary (or nas-fair[postgres])"
    elif "://" not in url:
        hint = "; give an Optuna storage URL, e.g. sqlite:///path/study.db or postgresql://user@host/db"
    return scrub(f"cannot open storage {shown_url(url)!r}: {reason}{hint}", url)


def _sqlite_wal(storage: Any) -> None:
    """Readers no longer block the writer (persistent in the file; best effort if busy)."""
    try:
        with storage.engine.connect() as con:
            con.exec_driver_sql("PRAGMA journal_mode=WAL")
    except Exception:  # noqa: BLE001 - a busy database keeps its journal mode; still correct
        pass


# ---------------------------------------------------------------------- shared run folder

LOCK_FILE = ".prepare.lock"
_held: set[str] = set()  # lock files this process holds: taking one again is a no-op


@contextlib.contextmanager
def preparation_lock(run_dir: Path, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Exclusive ``flock`` on ``<run_dir>/.prepare.lock`` around work done once per run folder.

    Workers of one study (``--jobs``, or machines sharing the run folder) take it around the
    reference fine-tuning, the caches and the reference's scores: one computes, the others
    print that they wait, then load. Reentrant within a process; the kernel drops it when the
    holder dies, so a killed worker never leaves it stuck. No-op where ``fcntl`` is missing.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: single-worker use only
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    key = str(path.resolve())
    if key in _held:  # flock on a second descriptor would wait for ourselves
        yield
        return
    fh = open(path, "a+")  # noqa: SIM115 - held across the yield
    try:
        waited = 0.0
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waited >= 2.0:  # a short wait (another worker loading the cache) is silent
                    fh.seek(0)
                    holder = fh.read().strip() or "another worker"
                    (log or (lambda m: print(m, file=sys.stderr)))(
                        f"waiting for {holder} to prepare the reference model and caches "
                        f"in {run_dir}"
                    )
                    fcntl.flock(fh, fcntl.LOCK_EX)
                    break
                time.sleep(0.1)
                waited += 0.1
        fh.seek(0)
        fh.truncate()
        fh.write(f"worker {socket.gethostname()}:{os.getpid()}\n")
        fh.flush()
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
            fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        fh.close()
