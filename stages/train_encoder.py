"""Stage: one row of the encoder table, LoRETTA's BERT path (stages/core/encoder.py).

    python stages/train_encoder.py --method loretta_rep --out results/encoder/rows/loretta_rep.json
trains params.yaml's ``encoder_table.methods.<method>`` on the table's task (a multiple-choice
task of data/tasks, classified by the encoder with a new head) and writes the test accuracy and
trainable-parameter count. ``--steps`` and ``--lr`` override the table's values for a quick try.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.core.config import OneLineParser, load_params, section  # noqa: E402
from stages.core.encoder import train_and_score  # noqa: E402
from stages.core.errors import cli_entry  # noqa: E402
from stages.core.io import atomic_write_json  # noqa: E402


@cli_entry
def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, help="a key of params.yaml encoder_table.methods")
    parser.add_argument("--out", required=True, help="JSON file for the row")
    parser.add_argument("--params", default=None)
    parser.add_argument("--tasks_dir", default="data/tasks")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: encoder_table.steps)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    table = section(params, "encoder_table")
    settings = dict(section(params, "encoder_table", "methods", args.method))
    if args.lr is not None:
        settings["lr"] = args.lr
    with tempfile.TemporaryDirectory(prefix="adaptlab-encoder-") as work:
        row = train_and_score(table["model"], table["task"], settings, steps=args.steps or table["steps"],
                              batch_size=table["batch_size"], max_length=table["max_length"], seed=params.get("seed", 0),
                              tasks_dir=args.tasks_dir, work_dir=work)
    row = {"method": args.method, "model": table["model"], **row, "settings": settings}
    atomic_write_json(args.out, row)
    print(f"{args.method}: accuracy {row['accuracy']:.3f} on {row['task']}, {row['trainable_params']:,} trainable parameters")


if __name__ == "__main__":
    main()
