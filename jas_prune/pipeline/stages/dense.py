"""Dense: the unpruned model's top-1/top-5 on the test partition, its params and MACs."""

from __future__ import annotations

import logging

from ...evaluate import accuracy, count_params_macs, predict_logits
from ...metrics import DenseMetrics, Fingerprint
from ...models import input_size
from .base import STAGES, Stage

log = logging.getLogger("jas_prune")


def run_dense(ctx) -> None:
    loader, samples = ctx.loader("test")
    logits, labels = predict_logits(ctx.model, loader, device=ctx.device,
                                    sample_ids=[s.id for s in samples], desc="evaluate dense")
    acc = accuracy(logits, labels)
    size = count_params_macs(ctx.model, input_size(ctx.model))
    ctx.metrics.fingerprint = Fingerprint(model=ctx.digest)
    ctx.metrics.dense = DenseMetrics(top1=acc["top1"], top5=acc["top5"], params=size["params"], macs=size["macs"],
                                     test_images=acc["n"])
    log.info("dense: top1 %.4f top5 %.4f params %d macs %d on %d test images",
             acc["top1"], acc["top5"], size["params"], size["macs"], acc["n"])


@STAGES.register
def _dense_stage() -> Stage:
    return Stage("dense", "top-1/top-5 of the dense model on the test partition, params, MACs -> metrics.dense",
                 enabled=lambda r: True, run=run_dense, order=30)
