"""One line about a database the backend cannot use: for ``manage.py`` and gunicorn's start.

``DATABASE_URL`` naming a database that does not exist, a host that does not answer or a user
the server refuses would otherwise end in a long traceback. The line names the variable, the
database, its host and user, and the server's reason; never the password.
"""

from __future__ import annotations

from django.db import DatabaseError, connection

_VENDORS = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}


def describe_failure(exc: BaseException) -> str:
    """``backend: DATABASE_URL: cannot use <the database>: <reason>`` for ``exc``."""
    db = connection.settings_dict
    where = f'the {_VENDORS.get(connection.vendor, connection.vendor)} database "{db["NAME"]}"'
    if db.get("HOST"):
        where += f" at {db['HOST']}" + (f":{db['PORT']}" if db.get("PORT") else "")
    if db.get("USER"):
        where += f' as user "{db["USER"]}"'
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = next((line for line in lines if "failed: " in line), lines[0] if lines else "")
    reason = reason.rpartition("failed: ")[2].removeprefix("FATAL:").strip()
    password = db.get("PASSWORD")
    if password:
        reason = reason.replace(password, "***")
    return f"backend: DATABASE_URL: cannot use {where}: {reason or type(exc).__name__}"


def connection_problem() -> str | None:
    """Connect once: None when the database answers, else the line saying why it does not."""
    try:
        connection.ensure_connection()
    except DatabaseError as exc:
        return describe_failure(exc)
    finally:
        connection.close()
    return None
