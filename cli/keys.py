"""``genq keys``: create, list, show and revoke API keys (directly in the database)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer
from pydantic import TypeAdapter, ValidationError

from core import egress, keys, text
from core.db import session_scope
from core.schemas import CallbackUrl
from core.settings import get_settings

app = typer.Typer(help="Manage API keys.", no_args_is_help=True)


@app.command()
def create(
    name: Annotated[str, typer.Option("--name", help="a name for the key")],
    owner: Annotated[
        str | None,
        typer.Option(
            help="the tenant that owns what the key makes; keys share jobs, files and "
            "batches only when created for the same owner (default: a new tenant)"
        ),
    ] = None,
    callback_url: Annotated[
        str | None,
        typer.Option(help="default webhook URL for the owner's jobs and batches"),
    ] = None,
    high_priority: Annotated[
        bool, typer.Option("--high-priority", help="the key may submit priority 'high' jobs")
    ] = False,
) -> None:
    """Create a key. It is shown once, alone on the last line, so scripts can take it;
    the line before holds its webhook secret (`genq keys show` shows that again)."""
    if callback_url is not None:
        try:
            callback_url = str(TypeAdapter(CallbackUrl).validate_python(callback_url))
        except ValidationError as exc:
            typer.echo(f"--callback-url: {exc.errors()[0]['msg']}", err=True)
            raise typer.Exit(2) from None
        refused = egress.check_callback_url(callback_url, get_settings().webhook_allow)
        if refused is not None:
            typer.echo(f"--callback-url: {refused}", err=True)
            raise typer.Exit(2)
    with session_scope(get_settings().resolved_database_url) as session:
        try:
            key, secret = keys.create_key(
                session,
                name=name,
                owner=owner,
                callback_url=callback_url,
                high_priority=high_priority,
            )
        except text.UnstorableTextError as exc:
            typer.echo(f"--{exc.param}: {exc.reason}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"created {key.id} (name {key.name}, owner {key.owner})")
        typer.echo(f"webhook secret: {key.webhook_secret}")
        typer.echo("the key, shown once:")
    typer.echo(secret)


@app.command("list")
def list_keys(
    owner: Annotated[str | None, typer.Option(help="only the keys of this tenant (owner)")] = None,
) -> None:
    """List keys (never their secrets), one per line in aligned columns. Nothing is
    cut to fit the terminal, so an id can always be copied into `genq keys revoke`."""
    rows = [("id", "name", "owner", "prefix", "created (UTC)", "revoked (UTC)")]
    with session_scope(get_settings().resolved_database_url) as session:
        for key in keys.list_keys(session):
            if owner is not None and key.owner != owner:
                continue
            revoked = _when(key.revoked_at) if key.revoked_at else "-"
            rows.append(
                (key.id, key.name, key.owner, key.prefix + "…", _when(key.created_at), revoked)
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _when(moment: dt.datetime) -> str:
    """UTC, to the minute."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M")


@app.command()
def show(key_id: Annotated[str, typer.Argument(help="the key's id (key_...)")]) -> None:
    """Show a key (never the key itself): owner, default callback, webhook secret."""
    try:
        with session_scope(get_settings().resolved_database_url) as session:
            key = keys.get_key(session, key_id)
            typer.echo(f"id: {key.id}")
            typer.echo(f"name: {key.name}")
            typer.echo(f"owner: {key.owner}")
            typer.echo(f"high_priority: {'yes' if key.high_priority else 'no'}")
            typer.echo(f"revoked: {key.revoked_at.isoformat() if key.revoked_at else 'no'}")
            typer.echo(f"callback_url: {key.callback_url or ''}")
            typer.echo(f"webhook secret: {key.webhook_secret}")
    except keys.KeyNotFoundError:
        typer.echo(f"no key with id {key_id}", err=True)
        raise typer.Exit(1) from None


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
