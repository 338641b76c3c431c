"""``paadet eval`` killed hard: ``python tests/eval_killed.py K eval FLAGS...`` runs the command's evaluation and
SIGKILLs the process right after its K-th image is journaled (no cleanup, as a crashed machine would), through
the evaluation's public ``on_record`` callback. tests/test_eval_model.py then checks that ``--resume`` finishes it."""

from __future__ import annotations

import os
import signal
import sys

from paadet.cli import build_parser
from paadet.commands import eval as eval_command


def main(argv: list[str]) -> int:
    count = int(argv[0])
    args = build_parser("eval", all_commands=False).parse_args(argv[1:])
    seen = []

    def kill_after(record) -> None:
        seen.append(record)
        if len(seen) == count:
            os.kill(os.getpid(), signal.SIGKILL)

    ann_file, image_dir = eval_command.dataset_files(args.data, args.ann, args.images)
    eval_command.run_model(
        ann_file,
        image_dir,
        eval_command.MODEL.spec(args),
        limit=args.limit,
        output_dir=args.output_dir,
        per_class=args.per_class,
        resume=args.resume,
        loader=args.loader,
        progress=not args.no_progress,
        on_record=kill_after,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
