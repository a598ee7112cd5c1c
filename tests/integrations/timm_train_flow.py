"""A training script that builds its optimizer the way timm's ``train.py`` does.

It is run by ``test_timm_train.py`` as ``train.py`` would be: its arguments are parsed
with train.py's option names and defaults (``--opt``, ``--opt-kwargs`` through timm's
``ParseKwargs``, ``--lr`` absent by default with ``--lr-base`` and the batch-size rule,
``--device-modules`` imported first; only the model and ``--epochs`` default to
something small), the optimizer comes from
``create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)``, the
scheduler from ``create_scheduler_v2``, checkpoints from timm's ``CheckpointSaver`` and
``--resume`` from timm's ``resume_checkpoint``. Only the data differ: fixed random
images, each epoch's batches drawn from a generator seeded by the epoch, so a resumed
run sees the batches an uninterrupted one sees.

It prints one JSON line: the learning rate used, the optimizer's class, the epochs
run, and a digest of the final parameters.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json

import torch
import torch.nn.functional as F
from timm import utils
from timm.models import create_model, resume_checkpoint
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="train.py's optimizer flow")
    parser.add_argument("--model", default="convnext_atto")
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=utils.ParseKwargs)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--resume", default="")
    parser.add_argument("--no-resume-opt", action="store_true", default=False)
    parser.add_argument("-b", "--batch-size", type=int, default=8)
    parser.add_argument("--device-modules", default=None, type=str, nargs="+")
    # Optimizer parameters, as train.py declares them.
    parser.add_argument("--opt", default="sgd", type=str)
    parser.add_argument("--opt-eps", default=None, type=float)
    parser.add_argument("--opt-betas", default=None, type=float, nargs="+")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=2e-5)
    parser.add_argument("--clip-grad", type=float, default=None)
    parser.add_argument("--clip-mode", type=str, default="norm")
    parser.add_argument("--layer-decay", type=float, default=None)
    parser.add_argument("--layer-decay-min-scale", type=float, default=0)
    parser.add_argument("--layer-decay-no-opt-scale", type=float, default=None)
    parser.add_argument("--opt-kwargs", nargs="*", default={}, action=utils.ParseKwargs)
    # Learning rate schedule parameters (those scheduler_kwargs reads).
    parser.add_argument("--sched", type=str, default="cosine")
    parser.add_argument("--sched-on-updates", action="store_true", default=False)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--lr-base", type=float, default=0.1)
    parser.add_argument("--lr-base-size", type=int, default=256)
    parser.add_argument("--lr-base-scale", type=str, default="")
    parser.add_argument("--lr-noise", type=float, nargs="+", default=None)
    parser.add_argument("--lr-noise-pct", type=float, default=0.67)
    parser.add_argument("--lr-noise-std", type=float, default=1.0)
    parser.add_argument("--lr-cycle-mul", type=float, default=1.0)
    parser.add_argument("--lr-cycle-decay", type=float, default=0.5)
    parser.add_argument("--lr-cycle-limit", type=int, default=1)
    parser.add_argument("--lr-k-decay", type=float, default=1.0)
    parser.add_argument("--warmup-lr", type=float, default=1e-5)
    parser.add_argument("--min-lr", type=float, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--epoch-repeats", type=float, default=0.0)
    parser.add_argument("--start-epoch", default=None, type=int)
    parser.add_argument("--decay-milestones", default=[90, 180, 270], type=int, nargs="+")
    parser.add_argument("--decay-epochs", type=float, default=90)
    parser.add_argument("--warmup-epochs", type=int, default=5)
    parser.add_argument("--warmup-prefix", action="store_true", default=False)
    parser.add_argument("--cooldown-epochs", type=int, default=0)
    parser.add_argument("--patience-epochs", type=int, default=10)
    parser.add_argument("--decay-rate", "--dr", type=float, default=0.1)
    # Run parameters.
    parser.add_argument("--steps-per-epoch", type=int, default=4)
    parser.add_argument("--output", default="")
    return parser


def main() -> None:
    args = _parser().parse_args()
    if args.device_modules:
        for module in args.device_modules:
            importlib.import_module(module)

    torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.num_classes, **args.model_kwargs)
    images = torch.randn(64, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    labels = images.mean(dim=(1, 2, 3)).argsort().argsort() * args.num_classes // 64

    if not args.lr:
        batch_ratio = args.batch_size / args.lr_base_size
        if not args.lr_base_scale:
            args.lr_base_scale = "sqrt" if any(o in args.opt.lower() for o in ("ada", "lamb")) else "linear"
        if args.lr_base_scale == "sqrt":
            batch_ratio = batch_ratio ** 0.5
        args.lr = args.lr_base * batch_ratio

    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)

    resume_epoch = None
    if args.resume:
        resume_epoch = resume_checkpoint(model, args.resume, optimizer=None if args.no_resume_opt else optimizer,
                                         log_info=False)

    output_dir = utils.get_outdir(args.output or "./output/train")
    saver = utils.CheckpointSaver(model=model, optimizer=optimizer, args=args, checkpoint_dir=output_dir,
                                  recovery_dir=output_dir, decreasing=True, max_history=2)
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                updates_per_epoch=args.steps_per_epoch)
    start_epoch = args.start_epoch if args.start_epoch is not None else resume_epoch or 0
    if scheduler is not None and start_epoch > 0:
        scheduler.step(start_epoch)

    epochs = []
    for epoch in range(start_epoch, num_epochs):
        model.train()
        gen = torch.Generator().manual_seed(1000 + epoch)
        losses = []
        for _ in range(args.steps_per_epoch):
            idx = torch.randint(0, images.shape[0], (args.batch_size,), generator=gen)
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            if args.clip_grad is not None:
                utils.dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
            optimizer.step()
            losses.append(loss.item())
        mean_loss = sum(losses) / len(losses)
        saver.save_checkpoint(epoch, metric=mean_loss)
        if scheduler is not None:
            scheduler.step(epoch + 1, mean_loss)
        epochs.append({"epoch": epoch, "loss": mean_loss})

    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    print(json.dumps({"lr": args.lr, "optimizer": type(optimizer).__name__, "epochs": epochs,
                      "params_sha256": digest.hexdigest()}))


if __name__ == "__main__":
    main()
