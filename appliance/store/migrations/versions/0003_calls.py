"""calls: call records, transcript turns and function calls

Revision ID: 0003_calls
Revises: 0002_documents
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_calls"
down_revision: str | None = "0002_documents"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("call_uuid", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("agent_id", sa.String(length=36), nullable=False),
        sa.Column("direction", sa.String(length=16), nullable=False),
        sa.Column("from_number", sa.String(length=64), nullable=False),
        sa.Column("to_number", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("hangup_cause", sa.String(length=64), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_calls_account_id_accounts", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("call_uuid", name="pk_calls"),
    )
    op.create_index("ix_calls_account_id", "calls", ["account_id"], unique=False)
    op.create_index("ix_calls_agent_id", "calls", ["agent_id"], unique=False)
    op.create_index("ix_calls_status", "calls", ["status"], unique=False)
    op.create_index("ix_calls_started_at", "calls", ["started_at"], unique=False)
    op.create_table(
        "call_turns",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("call_uuid", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("heard_text", sa.Text(), nullable=True),
        sa.Column("interrupted", sa.Boolean(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("timings", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["call_uuid"], ["calls.call_uuid"], name="fk_call_turns_call_uuid_calls", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_call_turns"),
    )
    op.create_index("ix_call_turns_call_uuid", "call_turns", ["call_uuid"], unique=False)
    op.create_table(
        "call_function_calls",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("call_uuid", sa.String(length=64), nullable=False),
        sa.Column("turn_seq", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("arguments", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["call_uuid"],
            ["calls.call_uuid"],
            name="fk_call_function_calls_call_uuid_calls",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_call_function_calls"),
    )
    op.create_index("ix_call_function_calls_call_uuid", "call_function_calls", ["call_uuid"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_call_function_calls_call_uuid", table_name="call_function_calls")
    op.drop_table("call_function_calls")
    op.drop_index("ix_call_turns_call_uuid", table_name="call_turns")
    op.drop_table("call_turns")
    for name in ("ix_calls_started_at", "ix_calls_status", "ix_calls_agent_id", "ix_calls_account_id"):
        op.drop_index(name, table_name="calls")
    op.drop_table("calls")
