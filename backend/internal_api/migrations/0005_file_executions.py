# File executions: one file of a workflow execution (resource file-executions/).

import uuid

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("internal_api", "0004_lifecycle_caps"),
    ]

    operations = [
        migrations.CreateModel(
            name="FileExecution",
            fields=[
                (
                    "id",
                    models.UUIDField(
                        default=uuid.uuid4, editable=False, primary_key=True, serialize=False
                    ),
                ),
                ("file_name", models.CharField(max_length=1024)),
                ("file_hash", models.CharField(blank=True, default="", max_length=128)),
                (
                    "status",
                    models.CharField(
                        choices=[
                            ("PENDING", "Pending"),
                            ("IN_PROGRESS", "In Progress"),
                            ("COMPLETED", "Completed"),
                            ("ERROR", "Error"),
                            ("SKIPPED", "Skipped"),
                        ],
                        default="PENDING",
                        max_length=16,
                    ),
                ),
                ("error_message", models.TextField(blank=True, default="")),
                ("execution_time", models.FloatField(blank=True, help_text="seconds", null=True)),
                ("result", models.JSONField(blank=True, null=True)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("modified_at", models.DateTimeField(auto_now=True)),
                (
                    "execution",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="files",
                        to="internal_api.workflowexecution",
                    ),
                ),
                (
                    "organization",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="file_executions",
                        to="internal_api.organization",
                    ),
                ),
            ],
            options={
                "indexes": [
                    models.Index(
                        fields=["organization", "-created_at", "-id"], name="file_org_created"
                    ),
                    models.Index(
                        fields=["organization", "execution", "-created_at", "-id"],
                        name="file_org_exec",
                    ),
                    models.Index(fields=["execution", "status"], name="file_exec_status"),
                ],
            },
        ),
    ]
