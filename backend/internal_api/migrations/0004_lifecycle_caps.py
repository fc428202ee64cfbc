# The lifecycle's caps: refused publishes per outbox row, unclaimed dispatches, webhook hand-outs.

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('internal_api', '0003_lifecycle'),
    ]

    operations = [
        migrations.AddField(
            model_name='dispatch',
            name='attempts',
            field=models.PositiveIntegerField(db_default=0, default=0),
        ),
        migrations.AddField(
            model_name='dispatch',
            name='last_error',
            field=models.CharField(blank=True, db_default='', default='', max_length=300),
        ),
        migrations.AddField(
            model_name='workflowexecution',
            name='unclaimed_dispatches',
            field=models.PositiveIntegerField(db_default=0, default=0),
        ),
        migrations.AddField(
            model_name='workflowexecution',
            name='webhook_failed_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='workflowexecution',
            name='webhook_handed_count',
            field=models.PositiveIntegerField(db_default=0, default=0),
        ),
        migrations.AlterField(
            model_name='executionevent',
            name='reason',
            field=models.CharField(choices=[('dispatched', 'Dispatched'), ('claimed', 'Claimed'), ('released', 'Released'), ('lease_expired', 'Lease Expired'), ('lost', 'Lost'), ('unleased_timeout', 'Unleased Timeout'), ('finished', 'Finished'), ('status', 'Status'), ('never_claimed', 'Never Claimed'), ('undispatchable', 'Undispatchable')], max_length=32),
        ),
    ]
