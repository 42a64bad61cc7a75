"""The region-feature family: Oscar-style models on transformers' BERT over text tokens, tag
tokens and detector region features (tasks ``pretrain``, ``caption``, ``retrieval``; Oscar
and Mengzi-Oscar checkpoints in and out). Its interface to the shared training loop and
evaluation is the one :mod:`mmcn.models.factory` lists."""
from mmcn.models.regions.evaluation import EVAL_CONFIGS, eval_worker
from mmcn.models.regions.factory import TASKS, build_model, load_model
from mmcn.models.regions.training import STEPS, freeze, prepare_run, run_inputs, task_data, tokenizer_texts, validate

CONFIGS = {task: config for task, (config, _) in TASKS.items()}

__all__ = ["CONFIGS", "EVAL_CONFIGS", "STEPS", "build_model", "eval_worker", "freeze", "load_model", "prepare_run",
           "run_inputs", "task_data", "tokenizer_texts", "validate"]
