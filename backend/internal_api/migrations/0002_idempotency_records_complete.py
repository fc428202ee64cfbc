# Idempotency records are now written once, complete, in the request's transaction: no more
# in-flight rows. Existing rows are a 24-hour cache and are dropped rather than converted.

from django.db import migrations, models


def drop_records(apps, schema_editor):
    apps.get_model("internal_api", "IdempotencyRecord").objects.all().delete()


class Migration(migrations.Migration):
    dependencies = [("internal_api", "0001_initial")]

    operations = [
        migrations.RunPython(drop_records, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="idempotencyrecord",
            name="response_status",
            field=models.PositiveSmallIntegerField(),
        ),
        migrations.AlterField(
            model_name="idempotencyrecord",
            name="response_body",
            field=models.BinaryField(),
        ),
        migrations.AlterField(
            model_name="idempotencyrecord",
            name="response_content_type",
            field=models.CharField(max_length=100),
        ),
    ]
