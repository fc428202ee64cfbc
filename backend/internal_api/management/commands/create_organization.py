"""``manage.py create_organization <org_id> [--name NAME]``: idempotent; prints the id."""

from __future__ import annotations

import re
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from backend.internal_api.models import Organization

ORG_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Command(BaseCommand):
    """Create an organization unless it exists (then only a given --name is updated)."""

    help = "Create an organization (idempotent) and print its id."

    def add_arguments(self, parser: CommandParser) -> None:
        """``org_id`` and an optional ``--name``."""
        parser.add_argument("org_id", help="letters, digits, '.', '_' or '-'; at most 64")
        parser.add_argument("--name", default=None, help="display name")

    def handle(self, *args: Any, **options: Any) -> None:
        """Create or keep the organization, then print its id on stdout."""
        org_id: str = options["org_id"]
        if not ORG_ID.fullmatch(org_id):
            raise CommandError(
                "org_id must be 1 to 64 letters, digits, '.', '_' or '-' "
                "and start with a letter or digit"
            )
        name: str | None = options["name"]
        org, created = Organization.objects.get_or_create(pk=org_id, defaults={"name": name or ""})
        if not created and name is not None and org.name != name:
            org.name = name
            org.save(update_fields=["name"])
        self.stdout.write(org.id)
