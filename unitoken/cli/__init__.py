"""The ``unitoken`` command, one module per command group:
``model`` (model, tokenizer, generate, chat), ``data``, ``train``, ``evaluation`` (eval, gate),
``registry`` (registry, lineage) and ``pipeline``. Each module's ``register(sub)`` adds its
commands, with their arguments and an example, beside the handlers they run.

Exit codes: 0 success, 1 error (one line naming the problem and the fix; traceback only with
``--debug``), 2 usage error, 3 a gate or validation said no.
"""

from __future__ import annotations

import argparse
import logging
import os

from unitoken.cli import data, evaluation, model, pipeline, registry, train
from unitoken.cli.common import HELP_FORMAT, UsageError, console, epilog, err_console

__all__ = ["UsageError", "build_parser", "console", "err_console", "main"]

GROUPS = (model, data, train, evaluation, registry, pipeline)
EXAMPLES = ["unitoken data synth --out d --n 500",
            "unitoken model init --recipe tiny --out m",
            "unitoken train --stage 1 --recipe tiny --data p --out runs/stage1 --init m",
            "unitoken eval --model runs/stage3/handoff --suite shapes-vqa,shapes-geneval --data d --out e",
            "unitoken registry register --model runs/stage3/handoff --eval e --gate decision.json --name shapes",
            "unitoken pipeline run --local --recipe tiny"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unitoken", description="UniToken training platform.",
                                     epilog=epilog(EXAMPLES, "unitoken COMMAND --help: the command's own examples"),
                                     formatter_class=HELP_FORMAT)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as err:
        err_console.print(f"[red]usage error:[/red] {err}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI boundary: one clear line, exit 1
        if args.debug:
            raise
        err_console.print(f"[red]error:[/red] {type(err).__name__}: {err}", highlight=False, soft_wrap=True)
        return 1
