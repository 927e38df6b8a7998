"""``slimflow deploy``: the operations commands, registered on the main parser by :func:`add_ops_commands`.

Imports of Prefect and the flows happen inside the command, so ``slimflow --help`` stays instant.
"""

from __future__ import annotations

import argparse


def cmd_deploy(args) -> int:
    from slimflow.flows.cli_console import prefect_defaults

    prefect_defaults()
    from slimflow.flows.config import load_config
    from slimflow.flows.deploy import build_deployments, default_out, register_deployments, serve_deployments

    config = load_config(args.config)
    out = default_out(config, args.out)
    deployments = build_deployments(config, out, args.name or config.name, cron=args.cron,
                                    timezone=args.timezone, until=args.until)
    names = ", ".join(f"{d.flow_name}/{d.name}" for d in deployments)
    if args.pool:
        register_deployments(deployments, args.pool)
        print(f"registered {names} with work pool {args.pool!r}; start a worker: "
              f"`prefect worker start --pool {args.pool}`")
        return 0
    print(f"serving {names} (run directory {out}); Ctrl-C stops")
    serve_deployments(deployments, limit=args.limit)
    return 0


def add_ops_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``deploy`` to the ``slimflow`` parser's subcommands."""
    sp = subparsers.add_parser(
        "deploy", help="serve the pipeline and stage flows as Prefect deployments (UI runs, schedules)",
        description="Serve the pipeline flow (slimflow-run/NAME) and each stage flow (STAGE/NAME) as Prefect "
        "deployments from this process, with CONFIG as their default parameters: start runs from the Prefect "
        "UI and edit the config in the run form. Needs a Prefect server (PREFECT_API_URL). With --pool, "
        "register the deployments with a process work pool instead and return (a `prefect worker` runs them).",
        epilog="Operations guide: docs/operations.md.",
    )
    sp.add_argument("config", help="the run's YAML config: the deployments' default parameters")
    sp.add_argument("--out", help="run directory the deployed runs write to (default: ./runs/<name>)")
    sp.add_argument("--name", help="deployment name (default: the config's name)")
    sp.add_argument("--cron", help='schedule the pipeline deployment, e.g. "0 3 * * *" (03:00 daily)')
    sp.add_argument("--timezone", help="time zone of --cron, e.g. Europe/Berlin (default: UTC)")
    sp.add_argument("--until", help="the pipeline deployment's default last stage (default: the last stage)")
    sp.add_argument("--pool", help="register with this process work pool (created if missing) instead of serving")
    sp.add_argument("--limit", type=int, help="serve: at most this many flow runs at once (default: no limit)")
    sp.set_defaults(func=cmd_deploy)
