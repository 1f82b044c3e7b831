"""Accounts, functions, agents and the agent-function links.

Revision ID: 0001_accounts_agents
Revises:
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_accounts_agents"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamps() -> list[sa.Column[object]]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("auth_id", sa.String(20), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("token_hash", sa.String(200), nullable=False),
        sa.Column("plivo_auth_id", sa.String(100), nullable=True),
        sa.Column("plivo_auth_token", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_accounts"),
    )
    op.create_index("ix_accounts_auth_id", "accounts", ["auth_id"], unique=True)

    op.create_table(
        "functions",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("account_id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("handler_url", sa.String(2000), nullable=False),
        sa.Column("user_parameters", sa.JSON(), nullable=False),
        sa.Column("fixed_parameters", sa.JSON(), nullable=False),
        *_timestamps(),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_functions_account_id_accounts", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_functions"),
        sa.UniqueConstraint("account_id", "name", name="uq_functions_account_id_name"),
    )
    op.create_index("ix_functions_account_id", "functions", ["account_id"])

    op.create_table(
        "agents",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("account_id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("welcome_message", sa.Text(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("answer_llm", sa.JSON(), nullable=False),
        sa.Column("stt", sa.JSON(), nullable=False),
        sa.Column("tts", sa.JSON(), nullable=False),
        sa.Column("knowledgebase_ids", sa.JSON(), nullable=False),
        sa.Column("call_timeout", sa.Integer(), nullable=False),
        *_timestamps(),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_agents_account_id_accounts", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_agents"),
    )
    op.create_index("ix_agents_account_id", "agents", ["account_id"])

    op.create_table(
        "agent_functions",
        sa.Column("agent_id", sa.String(36), nullable=False),
        sa.Column("function_id", sa.String(36), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name="fk_agent_functions_agent_id_agents", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["function_id"],
            ["functions.id"],
            name="fk_agent_functions_function_id_functions",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("agent_id", "function_id", name="pk_agent_functions"),
    )
    op.create_index("ix_agent_functions_function_id", "agent_functions", ["function_id"])


def downgrade() -> None:
    op.drop_table("agent_functions")
    op.drop_table("agents")
    op.drop_table("functions")
    op.drop_table("accounts")
