"""Training and evaluation: :func:`fit`, verified checkpoints, :func:`evaluate`; plain PyTorch underneath.

``fit`` is one AdamW loop over a map-style dataset of ``(input, label)`` items (a
:class:`fastcascade.data.PartitionDataset`, a ``TensorDataset`` or any dataset of that shape):
discriminative learning rates (fastcascade.param_groups), a per-step cosine or one-cycle schedule,
freeze-then-unfreeze, bf16 autocast, gradient clipping, class-balanced / oversampling samplers and
per-class sampling factors, early
stopping on a validation metric, tqdm progress, checkpoints that are verified on save, and exact
resume. Under ``torchrun`` it runs unchanged as DDP (gloo on the CPU, NCCL on CUDA): each rank trains
on its shard, validation confusion matrices and losses are summed over ranks, rank 0 writes files.

Validation metrics come from fastcascade.metrics (confusion_matrix, ClassificationReport). fit's sampling
keywords (sampler, beta, class_factors, batch_size, num_workers, seed) and checkpoint keywords (out_dir,
checkpoint_every, resume) are checked and carried as the settings groups :class:`Sampling` and
:class:`Checkpointing`.

Modules: fit.py (the epoch loop), sampling.py, diagnostics.py (warnings recorded in the history), step.py
(optimizer, schedule, freeze phase, one epoch of steps), history.py (best epoch, early stopping, progress), resume.py (fit's checkpoint files and resume),
checkpoint.py (save / load / verify a checkpoint file), evaluate.py, batches.py, distributed.py, rng.py.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .diagnostics import Diagnostics
from .evaluate import evaluate
from .fit import fit
from .resume import Checkpointing
from .sampling import Sampling

__all__ = ["Checkpointing", "Diagnostics", "Sampling", "evaluate", "fit", "load_checkpoint", "save_checkpoint"]
