"""secret key check

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 10:40:00.000000

The row itself is written by the first core that starts after this migration (it needs the
key, which migrations never see): on a database holding secrets, only a core whose key
decrypts one of them (ipaas.key_check).
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0002'
down_revision: Union[str, None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('secret_key_check',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('ciphertext', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_secret_key_check'))
    )


def downgrade() -> None:
    op.drop_table('secret_key_check')
