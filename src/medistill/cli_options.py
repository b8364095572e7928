"""The options several ``medistill`` commands share, each with its help text and default."""

from __future__ import annotations

import typer

_EPOCHS = typer.Option(None, "--epochs", help="training epochs (default 10; train.epochs)")
_BATCH = typer.Option(None, "--batch-size", help="images per step (default 64; train.batch_size)")
_SEED = typer.Option(None, "--seed", help="training seed (default 0; train.seed); the split has its own, data.split_seed")
_LR = typer.Option(None, "--lr", help="learning rate (default 0.001; optim.lr)")
_INPUT_SIZE = typer.Option(None, "--input-size", help="the model's input side (default: the images' own, 224 where "
                           "they differ)")
_DEVICE = typer.Option(None, "--device", help="auto (default: CUDA, then MPS, else CPU), cpu, cuda, cuda:N or mps")
_AMP = typer.Option(None, "--amp", help="mixed precision: off (default), bf16 or fp16")
_SET = typer.Option(None, "--set", help="dotted override, e.g. --set optim.lr=0.01 (repeatable)")
_FOLD = typer.Option(None, "--fold", help="cross-validation fold i of data.folds=K (set K with --set data.folds=K)")
_WORKERS = typer.Option(None, "--workers", help="DataLoader worker processes (data.num_workers; default auto)")
_FORCE = typer.Option(False, "--force", help="write into an --out that holds other files or a finished run")
_PRINT = typer.Option(False, "--print-config", help="print the resolved config (YAML) and exit without training")
_UNLABELED = typer.Option(None, "--unlabeled", help="images without labels (flat folder, CSV with a path column, .npz "
                          "with `images`): the student learns the teacher's outputs on them (data.unlabeled)")
_LABEL_FRACTION = typer.Option(None, "--label-fraction", help="keep this stratified share of the training labels; the "
                               "rest join the unlabelled pool (data.label_fraction; for measuring an archive's worth)")
_PRETRAINED = typer.Option(False, "--pretrained", help="start the students from timm's published weights (needs "
                           "network access; offline, pass a local file with --set students.0.pretrained=PATH)")


def method_epilog() -> str:
    """One line per ``--method`` preset, under ``distill --help``."""
    from medistill.presets import DESCRIPTIONS, METHODS

    return "Methods:\n\n" + "\n\n".join(f"{name}: {DESCRIPTIONS.get(name, '')}" for name in METHODS)
