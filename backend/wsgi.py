"""WSGI entry point for gunicorn: ``gunicorn backend.wsgi:application``.

A bad setting stops the server with one line naming the variable: exit status 4 is gunicorn's
"application failed to load", which makes the arbiter halt instead of respawning workers.
"""

from __future__ import annotations

import os
import sys

from django.core.exceptions import ImproperlyConfigured
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "backend.settings")

try:
    application = get_wsgi_application()
except ImproperlyConfigured as exc:
    print(f"backend: {exc}", file=sys.stderr, flush=True)
    sys.exit(4)
