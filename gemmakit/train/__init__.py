"""Training: one loop for pretraining, SFT, LoRA, reward models, DPO and RL, one process or torch.distributed.

Where it sits: after `data` (token shards, the packing loader), before `eval` and `cli`. The modules,
bottom to top:

- `recipe`: TOML recipes onto frozen dataclasses, strictly (unknown keys are errors).
- `objectives`: chunked next-token cross-entropy (masked for SFT) as a loss module.
- `optim`: AdamW parameter groups (no decay on norms and embeddings) and the LR schedules.
- `distributed`: process group from torchrun's environment, DDP / FSDP2 wrapping, collectives.
- `checkpoints`: atomic, checksummed step directories; discovery skips corrupt ones; retention.
- `loop`: `fit`, THE loop: accumulation, clipping, non-finite halting, metrics, eval, checkpoints.
- `pretrain` / `sft`: the batch sources of each method.
- `pairs`: preference pairs as ids and padded batches; `reward` (Bradley-Terry reward model, HF
  sequence-classification export), `dpo` (DPO / IPO against cached reference log-probs) and `rl`
  (rollouts from `infer.Engine`, RLOO advantages, clipped ratio): objectives and batch sources.
- `align`: the data, reference and objective of an alignment run, for `run`.
- `run`: a whole run from a recipe (model, tokenizer, data, LoRA, wrapping, final export).

Key trade-off: methods differ only in batches and objective, so every fix to the loop reaches them
all; a method adds a loss module (forward(**batch) -> loss sum, statistics; `units` it is normalised
by) and a batch source, not a loop.
"""

from gemmakit.train.loop import Hooks, NonFiniteError, Result, TrainError, fit
from gemmakit.train.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict
from gemmakit.train.run import run

__all__ = [
    "Hooks",
    "NonFiniteError",
    "Recipe",
    "RecipeError",
    "Result",
    "TrainError",
    "fit",
    "load_recipe",
    "recipe_from_dict",
    "run",
]
