# The execution lifecycle: dispatch outbox, leases, events, webhooks due (DESIGN.md "Execution lifecycle").

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("internal_api", "0002_idempotency_records_complete"),
    ]

    operations = [
        migrations.CreateModel(
            name="Dispatch",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("task", models.CharField(max_length=255)),
                ("queue", models.CharField(max_length=255)),
                (
                    "reason",
                    models.CharField(
                        choices=[
                            ("created", "Created"),
                            ("lease_expired", "Lease Expired"),
                            ("dispatch_timeout", "Dispatch Timeout"),
                            ("unleased_timeout", "Unleased Timeout"),
                            ("webhook_due", "Webhook Due"),
                            ("requested", "Requested"),
                        ],
                        max_length=32,
                    ),
                ),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("published_at", models.DateTimeField(blank=True, null=True)),
            ],
        ),
        migrations.CreateModel(
            name="ExecutionEvent",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                (
                    "from_status",
                    models.CharField(
                        choices=[
                            ("PENDING", "Pending"),
                            ("QUEUED", "Queued"),
                            ("IN_PROGRESS", "In Progress"),
                            ("COMPLETED", "Completed"),
                            ("ERROR", "Error"),
                            ("STOPPED", "Stopped"),
                        ],
                        max_length=16,
                    ),
                ),
                (
                    "to_status",
                    models.CharField(
                        choices=[
                            ("PENDING", "Pending"),
                            ("QUEUED", "Queued"),
                            ("IN_PROGRESS", "In Progress"),
                            ("COMPLETED", "Completed"),
                            ("ERROR", "Error"),
                            ("STOPPED", "Stopped"),
                        ],
                        max_length=16,
                    ),
                ),
                ("at", models.DateTimeField()),
                ("worker", models.CharField(blank=True, default="", max_length=255)),
                ("epoch", models.PositiveIntegerField(blank=True, null=True)),
                (
                    "reason",
                    models.CharField(
                        choices=[
                            ("dispatched", "Dispatched"),
                            ("claimed", "Claimed"),
                            ("released", "Released"),
                            ("lease_expired", "Lease Expired"),
                            ("lost", "Lost"),
                            ("unleased_timeout", "Unleased Timeout"),
                            ("finished", "Finished"),
                            ("status", "Status"),
                        ],
                        max_length=32,
                    ),
                ),
            ],
        ),
        migrations.AddField(
            model_name="webhookdelivery",
            name="webhook_id",
            field=models.CharField(blank=True, default="", max_length=40),
        ),
        migrations.AddField(
            model_name="workflowexecution",
            name="dispatch_queue",
            field=models.CharField(blank=True, default="", max_length=255),
        ),
        migrations.AddField(
            model_name="workflowexecution",
            name="dispatch_task",
            field=models.CharField(blank=True, default="", max_length=255),
        ),
        migrations.AddField(
            model_name="workflowexecution",
            name="lease_epoch",
            field=models.PositiveIntegerField(default=0, help_text="bumped by every claim"),
        ),
        migrations.AddField(
            model_name="workflowexecution",
            name="lease_expires_at",
            field=models.DateTimeField(blank=True, help_text="null: no lease", null=True),
        ),
        migrations.AddField(
            model_name="workflowexecution",
            name="lease_seconds",
            field=models.PositiveIntegerField(
                default=0, help_text="length of the lease taken; a heartbeat renews it by as much"
            ),
        ),
        migrations.AddField(
            model_name="workflowexecution",
            name="lease_worker",
            field=models.CharField(blank=True, default="", max_length=255),
        ),
        migrations.AddField(
            model_name="workflowexecution",
            name="lost_count",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.AddField(
            model_name="workflowexecution",
            name="queued_at",
            field=models.DateTimeField(
                blank=True, help_text="last move to QUEUED or last publish", null=True
            ),
        ),
        migrations.AddField(
            model_name="workflowexecution",
            name="webhook_delivered_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="workflowexecution",
            name="webhook_handed_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="workflowexecution",
            name="webhook_id",
            field=models.CharField(
                blank=True,
                default="",
                help_text="msg_<32 hex> once a webhook is due",
                max_length=40,
            ),
        ),
        migrations.AddField(
            model_name="workflowexecution",
            name="webhook_url",
            field=models.URLField(blank=True, default="", max_length=2048),
        ),
        migrations.AddIndex(
            model_name="workflowexecution",
            index=models.Index(
                condition=models.Q(("status__in", ("QUEUED", "IN_PROGRESS"))),
                fields=["status"],
                name="exec_active",
            ),
        ),
        migrations.AddIndex(
            model_name="workflowexecution",
            index=models.Index(
                condition=models.Q(
                    ("webhook_delivered_at__isnull", True),
                    models.Q(("webhook_id", ""), _negated=True),
                ),
                fields=["webhook_handed_at"],
                name="exec_webhook_due",
            ),
        ),
        migrations.AddConstraint(
            model_name="webhookdelivery",
            constraint=models.UniqueConstraint(
                condition=models.Q(
                    ("outcome", "delivered"), models.Q(("webhook_id", ""), _negated=True)
                ),
                fields=("webhook_id",),
                name="hook_delivered_once",
            ),
        ),
        migrations.AddField(
            model_name="dispatch",
            name="execution",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.CASCADE,
                related_name="dispatches",
                to="internal_api.workflowexecution",
            ),
        ),
        migrations.AddField(
            model_name="executionevent",
            name="execution",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.CASCADE,
                related_name="events",
                to="internal_api.workflowexecution",
            ),
        ),
        migrations.AddIndex(
            model_name="dispatch",
            index=models.Index(
                condition=models.Q(("published_at__isnull", True)),
                fields=["id"],
                name="dispatch_unpublished",
            ),
        ),
        migrations.AddIndex(
            model_name="executionevent",
            index=models.Index(fields=["execution", "id"], name="event_exec"),
        ),
    ]
