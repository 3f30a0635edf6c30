"""SAELens's BatchTopK trained with its own trainer step (``SAETrainer._train_step``) and default settings, on
the rows and batch order that ``batchtopk_parity.py`` gives c2r, then evaluated in SAELens's inference form (the
JumpReLU SAE it saves and loads back). Writes a JSON of the metrics. Runs with SAELens's interpreter, never c2r's
(SAELens is no dependency of c2r); see ``saelens_step.py`` for the venv.

SAELens defaults in play: decoder rows initialised at norm 0.1 with a tied encoder, ``b_dec`` zero,
pre-activations scaled by the decoder norms, AuxK with coefficient 1 and a 1000-step dead window, gradient norm
clipped to 1, threshold moved 1% per step towards the batch's smallest kept activation. The lr is constant (also
SAELens's default scheduler), at the value given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from parity_common import batch_order, ground_truth_features, inference_metrics, load_rows  # noqa: E402

from sae_lens import SAE  # noqa: E402
from sae_lens.config import SAETrainerConfig  # noqa: E402
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--dict-size", type=int, required=True)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="BatchTopKTrainingSAEConfig fields over SAELens's defaults (JSON values), for diagnosis")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    x = load_rows(args.shards, "train")
    overrides = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    config = BatchTopKTrainingSAEConfig(d_in=x.shape[1], d_sae=args.dict_size, k=args.k, **overrides)
    sae = BatchTopKTrainingSAE(config)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch_size, train_batch_size_samples=args.batch_size, lr=args.lr,
        lr_end=args.lr,  # unused by the constant scheduler, but the trainer asserts it is set
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(()))
    started = time.time()
    for indices in batch_order(len(x), args.steps, args.batch_size, args.seed):
        trainer._train_step(sae, x[indices])
        trainer.n_training_steps += 1
    train_s = time.time() - started

    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        inference = SAE.load_from_disk(tmp)
    inference.eval()
    metrics = inference_metrics(
        load_rows(args.shards, "val"), inference.encode, inference.decode, inference.W_dec,
        ground_truth_features(args.shards),
    )
    report = {**metrics, "threshold": float(sae.topk_threshold), "trainer_dead": int(trainer.dead_neurons.sum()),
              "train_s": round(train_s, 1), "architecture": inference.cfg.architecture()}
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
