"""outbox tasks by tenant

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 15:40:00.000000

Fair claims across tenants (ipaas.engine.outbox.claim_in) list the tenants holding tasks
with a loose index scan and read each one's due tasks in (run_at, id) order: both are seeks
on this index, so a tenant's backlog is never scanned.
"""
from typing import Sequence, Union

from alembic import op


revision: str = '0003'
down_revision: Union[str, None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('outbox_tasks', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_tasks_tenant_id_run_at_id', ['tenant_id', 'run_at', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('outbox_tasks', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_tasks_tenant_id_run_at_id')
