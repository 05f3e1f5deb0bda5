"""`jaxalign plot OUTPUT_DIR`: PNG curves of a run's metrics.jsonl (training and eval loss, learning rate)."""

import argparse
from pathlib import Path

from jaxalign import storage
from jaxalign.commands.jsonl import read_objects
from jaxalign.errors import JaxalignError

PANELS = {
    "loss.png": ("loss", ("loss", "eval_loss")),
    "lr.png": ("learning rate", ("lr",)),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", type=storage.location,
                        help="a run's output folder (the one holding metrics.jsonl)")
    parser.add_argument("--out", type=storage.location, default=None,
                        help="where to write the PNGs (default: OUTPUT_DIR/plots)")


def read_metrics(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Per metric name, the steps and values found in a metrics.jsonl file (lines without `step` are errors)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for line_number, record in read_objects(path, "metrics file (written by a training run)"):
        if "step" not in record:
            raise JaxalignError(f"{path}:{line_number}: expected a JSON object with a 'step' key")
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                steps, values = series.setdefault(name, ([], []))
                steps.append(record["step"])
                values.append(float(value))
    return series


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(args.output_dir / "metrics.jsonl")
    out_dir = args.out or args.output_dir / "plots"
    written = []
    with storage.staged_folder(out_dir) as folder:
        for file_name, (title, names) in PANELS.items():
            present = [name for name in names if name in series]
            if not present:
                continue
            figure, axis = plt.subplots(figsize=(7, 4))
            for name in present:
                steps, values = series[name]
                axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
            axis.set_xlabel("step")
            axis.set_title(title)
            axis.grid(alpha=0.3)
            axis.legend()
            figure.tight_layout()
            figure.savefig(folder / file_name, dpi=100)
            plt.close(figure)
            written.append(out_dir / file_name)
    if not written:
        raise JaxalignError(f"{args.output_dir / 'metrics.jsonl'} has none of the metrics loss, eval_loss, lr")
    for path in written:
        print(path)
    return 0
