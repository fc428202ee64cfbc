#!/usr/bin/env python
"""Django's command-line utility for the backend (``python manage.py <command>``)."""

from __future__ import annotations

import os
import sys


def main() -> None:
    """Run a Django management command; a bad setting is one line on stderr and exit 2, a
    database that cannot be used (``DATABASE_URL``) one line and exit 1."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "backend.settings")
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line
    from django.db import OperationalError

    try:
        settings.INSTALLED_APPS  # noqa: B018 - loads the settings, which validate the environment
    except ImproperlyConfigured as exc:
        print(f"backend: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        execute_from_command_line(sys.argv)
    except OperationalError as exc:
        from backend.internal_api.database import describe_failure

        print(describe_failure(exc), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
