"""Overrides that make a test trial take a few seconds: 32 px, a 2-block ViT, 4 rounds of one
epoch, on the ``disk`` category (imported as ``from fast import FAST``, like raycluster)."""

FAST = [
    "data.resize=40",
    "data.image_size=32",
    "data.categories=[disk]",
    "model.encoder_depth=2",
    "train.epochs=4",
    "train.eval_every=1",
    "train.warmup_epochs=1",
    "train.lr_milestones=[3]",
    "train.batch_size=4",
    "eval.blur_sigma=0.5",
]
