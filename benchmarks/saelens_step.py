"""SAELens's own training step (``SAETrainer._train_step``: forward, loss, backward, gradient clipping, Adam,
schedulers, dead-latent bookkeeping), with SAELens's default settings, as a ``step_worker`` for
``step_speed.py``. Runs with SAELens's interpreter, never c2r's (SAELens is no dependency of c2r)::

    python3 -m venv /work/venvs/saelens
    /work/venvs/saelens/bin/pip install torch==2.13.0   # first, or pip pulls the CUDA wheels
    /work/venvs/saelens/bin/pip install sae-lens
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_worker import serve  # noqa: E402

from sae_lens.config import SAETrainerConfig  # noqa: E402
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig  # noqa: E402
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402

ARCHITECTURES = {
    "topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
    "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), required=True)
    parser.add_argument("--d", type=int, required=True)
    parser.add_argument("--dict-size", type=int, required=True)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (SAELens's autocast option)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, config = ARCHITECTURES[args.architecture]
    sae = model(config(d_in=args.d, d_sae=args.dict_size, k=args.k, device=args.device))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=10**9, train_batch_size_samples=args.batch, lr_end=3e-4, device=args.device,
        autocast=args.bf16,
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(()))
    x = torch.randn(args.batch, args.d, device=device) / args.d**0.5
    serve(lambda: trainer._train_step(sae, x), device)


if __name__ == "__main__":
    main()
