"""``genq keys``: create, list and revoke API keys (directly in the database)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from core import keys
from core.db import session_scope
from core.settings import get_settings

app = typer.Typer(help="Manage API keys.", no_args_is_help=True)


@app.command()
def create(
    name: Annotated[str, typer.Option("--name", help="a name for the key")],
    owner: Annotated[
        str | None, typer.Option(help="who owns what the key makes (default: name)")
    ] = None,
) -> None:
    """Create a key. It is shown once, alone on the last line, so scripts can take it."""
    with session_scope(get_settings().resolved_database_url) as session:
        key, secret = keys.create_key(session, name=name, owner=owner)
        typer.echo(f"created {key.id} (name {key.name}, owner {key.owner}); the key, shown once:")
    typer.echo(secret)


@app.command("list")
def list_keys() -> None:
    """List keys (never their secrets)."""
    table = Table("id", "name", "owner", "prefix", "created", "revoked")
    with session_scope(get_settings().resolved_database_url) as session:
        for key in keys.list_keys(session):
            revoked = key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else ""
            table.add_row(
                key.id, key.name, key.owner, key.prefix + "…",
                key.created_at.isoformat(timespec="seconds"), revoked,
            )  # fmt: skip
    from cli.main import console

    console.print(table)


@app.command()
def revoke(key_id: Annotated[str, typer.Argument(help="the key's id (key_...)")]) -> None:
    """Revoke a key; requests with it get 401 from then on."""
    try:
        with session_scope(get_settings().resolved_database_url) as session:
            keys.revoke_key(session, key_id)
    except keys.KeyNotFoundError:
        typer.echo(f"no key with id {key_id}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"revoked {key_id}")
