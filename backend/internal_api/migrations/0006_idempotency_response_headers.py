# A replayed response carries the headers of the first answer that matter to a client (its
# ETag), not only its status, body and type.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("internal_api", "0005_file_executions")]

    operations = [
        migrations.AddField(
            model_name="idempotencyrecord",
            name="response_headers",
            field=models.TextField(
                default="{}",
                help_text="JSON object of the replayed headers (the ETag) answered",
            ),
        ),
    ]
