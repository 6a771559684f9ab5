"""``python manage.py cleanup_orders [--days N] [--in-background]``: the cleanup, now or by a worker."""

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from reports.tasks import cleanup


class Command(BaseCommand):
    help = "Delete processed orders older than --days (in a worker with --in-background)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--days", type=int, default=30)
        parser.add_argument("--in-background", action="store_true")

    def handle(self, *args: Any, days: int, in_background: bool, **options: Any) -> None:
        deleted = cleanup.delay(days=days).get(timeout=60) if in_background else cleanup(days=days)
        self.stdout.write(f"deleted {deleted} order(s)")
