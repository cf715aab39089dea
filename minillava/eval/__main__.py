"""python -m minillava.eval <benchmark> [flags]; each benchmark's --help says what it reads and how it scores.

Every run writes to its --out folder: answers.jsonl (one line per answered question, resumable),
scored.jsonl (one verdict per question), results.json and table.md. Rerunning the same command
answers only the questions still missing, and rescoring a finished run does not load the model.
"""
import argparse
import sys

from ..checkpoint import CheckpointError
from ..image import ImageError
from ..openai_jobs import JobsError
from . import llava_bench, scienceqa, toy
from .common import EvalError, resolve_device

BENCHMARKS = {"scienceqa": scienceqa, "llava-bench": llava_bench, "toy": toy}


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m minillava.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, module in BENCHMARKS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    resolve_device(args)
    try:
        return args.run(args)
    except (EvalError, CheckpointError, ImageError, JobsError, OSError) as e:   # one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:       # finished batches are in answers.jsonl, reviews in the journal
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
