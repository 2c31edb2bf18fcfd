"""Tasks: what is modelled and what is optimised, chosen by config like the estimator (`task=NAME`).

A task is an nn.Module holding every trained parameter of its model, and the one place that knows
its structure. Training, packing, evaluation, gvae-eval, gvae-sample, checkpoints, the table and
the microscope use only the contract below, so a new model or objective is one module here and one
configs/task/NAME.yaml:

- data targets: each method takes `x`, a batch of float pixel rows (B, pixels) as the data's
  binarization gives them, and takes its inputs and targets from it (the VAE: x and x; the
  structured-output SBN: the upper and the lower half).
- networks: built in __init__ from the `model` group (the latent units and the dense layers) and
  the task's own schema; `latents` lists its stochastic layers, each a gvae.latents.Latent.
- the training objective: `training_loss(estimator, x, tau)` -> (loss, TrainStats), with
  `build_estimator` giving the estimator module it needs (one Estimator per stochastic layer) and
  `train_tags` naming its training figures in TensorBoard.
- evaluation figures (`FIGURES`, each saying whether it is a bound): per example, `nelbo` (one
  exact sample), `log_weights` (m exact samples, for the m-sample bound) and `relaxed_nelbo`
  (relaxed samples: not a bound); gvae.evaluation averages them over a split.
- image summaries: `log_images` (TensorBoard, at each evaluation) and `pictures` (gvae-sample).
- the microscope (gvae/diagnostics.py): the first stochastic layer's logits, the estimator's
  gradient of the objective with respect to them, and the expected loss given a code of that layer.

Every method works unchanged on a pack of S runs (gvae/packing.py stacks the task's Linear layers
and free tensors along a leading run dimension), so tasks write batch reductions over dim -1 of
per-example figures and let tensors broadcast.
"""

from gvae.tasks import sbn, vae  # noqa: F401  (the built-in tasks register themselves)
from gvae.tasks.base import TASKS, Figure, Task, TaskConfig, build_task, register_task

__all__ = ["TASKS", "Figure", "Task", "TaskConfig", "build_task", "register_task"]
