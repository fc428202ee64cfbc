"""``manage.py purge_idempotency_records``: delete idempotency records past their 24 h."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from backend.internal_api.idempotency import purge_expired_records


class Command(BaseCommand):
    """Delete expired idempotency records (the backend also does it lazily); prints the count."""

    help = "Delete expired Idempotency-Key records and print how many were deleted."

    def handle(self, *args: Any, **options: Any) -> None:
        """Delete and report."""
        self.stdout.write(f"{purge_expired_records()} expired idempotency record(s) deleted")
