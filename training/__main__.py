"""Command line: ``python -m training {train,evaluate,visualize} ...``.

Each subcommand parses its arguments once, calls one function, and prints the result. Failures a user
can fix (missing data, bad option) end with one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import json
import os
import sys

from training.cli import ArgumentParser, HelpFormatter
from training.config import add_train_arguments, config_from_args
from training.data import DataNotFoundError


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="train a model; writes runs/<RUN>/best.pt and last.pt", formatter_class=HelpFormatter
    )
    add_train_arguments(train)

    ev = sub.add_parser(
        "evaluate",
        help="score a checkpoint on a dataset's test split; confusion matrix and "
        "misclassified images as PNG (and in the run's TensorBoard)",
        formatter_class=HelpFormatter,
    )
    ev.add_argument("--checkpoint", required=True, help="a best.pt or last.pt")
    ev.add_argument("--dataset", default=None, help="default: the dataset the checkpoint was trained on")
    ev.add_argument("--data-dir", default=None, help="pre-fetched dataset files (default: data/)")
    ev.add_argument("--out-dir", default=None, help="default: <checkpoint dir>/eval-<dataset>/")
    ev.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ev.add_argument("--json", action="store_true", help="print the metrics as one JSON line (last line)")

    vis = sub.add_parser(
        "visualize", help="first-layer filters and feature maps as labelled PNG figures", formatter_class=HelpFormatter
    )
    vis.add_argument("--checkpoint", required=True, help="a best.pt or last.pt")
    vis.add_argument(
        "--image",
        default=None,
        help="an image file to show feature maps for, e.g. samples/digits/7.png (make demo writes it)",
    )
    vis.add_argument("--out-dir", default=None, help="default: <checkpoint dir>/visualize/")

    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from training.train import fit

            best = fit(config_from_args(args))
            if os.environ.get("RANK", "0") == "0":  # under torchrun every process returns; one prints
                print(best)
        elif args.command == "evaluate":
            from training.evaluate import evaluate_checkpoint

            metrics = evaluate_checkpoint(
                args.checkpoint, args.dataset, args.data_dir, args.out_dir, workers=args.workers
            )
            if args.json:
                print(json.dumps(metrics))
            else:
                print(metrics_table(metrics))
            # where the pictures went, on stderr: stdout stays the table (or the one JSON line)
            print(f"wrote {', '.join(metrics['files'].values())}", file=sys.stderr)
        else:
            from training.visualize import visualize

            for path in visualize(args.checkpoint, args.image, args.out_dir):
                print(path)
    except (ValueError, DataNotFoundError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def metrics_table(metrics: dict) -> str:
    """Per-class precision/recall/F1 and the accuracy line, for people (``--json`` is for programs)."""
    width = max(len("class"), *(len(name) for name in metrics["per_class"]))
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for name, m in metrics["per_class"].items():
        lines.append(f"{name:<{width}}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:5.4f}  {m['support']:7d}")
    lines.append(f"accuracy {metrics['accuracy']:.4f} on {metrics['samples']} images of {metrics['dataset']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
