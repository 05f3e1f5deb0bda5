"""`jaxalign pipeline PIPELINE.yaml`: several training commands in order, each stage reading an earlier stage's
export, then a Markdown report with a figure per stage (`jaxalign.pipeline`). A rerun skips finished stages and
resumes the unfinished one; `--print` shows each stage's resolved config without running anything."""

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", type=Path, help="pipeline YAML (e.g. configs/pipelines/llama2_chat_tiny.yaml)")
    parser.add_argument("--print", dest="print_only", action="store_true",
                        help="print every stage's resolved config and exit")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="continue stages whose outputs were made with other training settings")


def run(args: argparse.Namespace) -> int:
    from jaxalign.train import stop

    stop.install()
    from jaxalign import sharding as shd
    from jaxalign.pipeline import dump, load_pipeline, run_pipeline

    pipeline = load_pipeline(args.pipeline)
    if args.print_only:
        print(dump(pipeline), end="")
        return 0
    shd.initialize_distributed()
    stop.install()
    try:
        return run_pipeline(pipeline, allow_config_change=args.allow_config_change)
    except stop.TrainingStopped as stopped:
        return stopped.code
