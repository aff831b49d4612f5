"""Fine-tuning an adapter: the settings (config.py), the loop (loop.py), the order of its steps (plan.py), the
optimizer and schedule (optim.py), checkpoints and resuming (checkpoint.py, resume.py), the rows of a task
(tasks.py), several processes (distributed.py) and what a run reports (run_log.py).

    from llama_adapter.train import TrainConfig, train
"""

from .config import TrainConfig
from .loop import train

__all__ = ["TrainConfig", "train"]
