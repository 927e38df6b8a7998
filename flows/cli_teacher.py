"""``slimflow teacher serve CONFIG``: the run's fitted teacher as an HTTP service for online distillation.

Registered on the main parser by :func:`add_teacher_commands`. ``teacher`` is also the teacher stage's command
(``slimflow teacher CONFIG``), so this extends that parser rather than adding a second one: ``teacher serve
CONFIG`` serves, ``teacher CONFIG`` runs the stage. Heavy imports happen inside the command.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from slimflow.flows.cli_args import no_wait_arg, positive_int

_SERVE_DESC = (
    "`slimflow teacher CONFIG` runs the teacher stage (fit the teacher). `slimflow teacher serve CONFIG` serves "
    "the fitted teacher of the run (RUN_DIR/teacher/model) over HTTP for online distillation "
    "(distill.mode: online): POST /v1/logits {\"texts\": [...]}, GET /v1/info, GET /healthz. Concurrent requests "
    "are batched together. It listens on 127.0.0.1 by default; any other address needs a token (--token or "
    "SLIMFLOW_TOKEN), which clients send as `Authorization: Bearer TOKEN`."
)


def cmd_teacher(args) -> int:
    if args.config == "serve":
        if not args.serve_config:
            raise ValueError("slimflow teacher serve: give the run's CONFIG (slimflow teacher serve CONFIG --out DIR)")
        return cmd_teacher_serve(args)
    if args.serve_config:
        raise ValueError(f"slimflow teacher: unexpected argument {args.serve_config!r} (did you mean `teacher serve`?)")
    args.command = "teacher"
    return args.run_stage(args)


def cmd_teacher_serve(args) -> int:
    from slimflow.flows.config import load_config
    from slimflow.storage.fs import join
    from slimflow.tasks.service import TOKEN_ENV, Limits, check_bind, serve

    config = load_config(args.serve_config)
    out = os.path.abspath(args.out or os.path.join("runs", config.name))
    t = config.teacher
    token = args.token or os.environ.get(TOKEN_ENV) or None
    limits = Limits(batch_tokens=t.batch_tokens, max_texts=args.max_texts, max_chars=config.data.max_chars)
    check_bind(args.host, token)  # refused before it says it is serving (issue 12)
    print(f"serving the teacher of {out} on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    serve(join(out, "teacher", "model"), host=args.host, port=args.port, token=token, limits=limits,
          device=t.device, dtype=t.dtype, threads=t.threads, cache_dir=t.cache_dir,
          trust_remote_code=t.trust_remote_code, log_level=args.log_level)
    return 0


def add_teacher_commands(sub, run_stage: Callable[[argparse.Namespace], int]) -> None:
    """Make ``teacher`` take ``serve CONFIG`` as well as ``CONFIG`` (the stage, run by ``run_stage``: the CLI's
    stage command, passed in so this module needs no import of the CLI), with the service's options."""
    tp = sub.choices.get("teacher")
    if tp is None:
        tp = sub.add_parser("teacher", help="fit the teacher (stage), or `teacher serve CONFIG` to serve it")
        tp.add_argument("config", help="the run's YAML config, or `serve`")
        tp.add_argument("--out", help="run directory (default: ./runs/<name>)")
        no_wait_arg(tp)
    tp.description = _SERVE_DESC
    tp.formatter_class = argparse.RawDescriptionHelpFormatter
    tp.add_argument("serve_config", nargs="?", metavar="CONFIG", help="with `serve`: the run's YAML config")
    g = tp.add_argument_group("teacher serve")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need a token)")
    g.add_argument("--port", type=positive_int, default=8500, help="port (default 8500, distill.service_url's default)")
    g.add_argument("--token", help="bearer token clients must send (default: $SLIMFLOW_TOKEN); prefer the env var: "
                   "a command line is visible to other users")
    g.add_argument("--max-texts", type=positive_int, default=1024, help="most texts one request may hold (413 beyond)")
    g.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    tp.set_defaults(func=cmd_teacher, run_stage=run_stage)
