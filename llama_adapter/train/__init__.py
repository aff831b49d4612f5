"""Fine-tuning an adapter: the settings (config.py), the loop (loop.py), the order of its steps (plan.py), the
optimizer and schedule (optim.py), checkpoints and resuming (checkpoint.py, resume.py), the rows of a task
(tasks.py), several processes (launch.py, distributed.py) and what a run reports (run_log.py).

    from llama_adapter.train import TrainConfig, train
"""

from .config import TrainConfig

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str):
    if name == "train":  # the loop loads torch and transformers; TrainConfig (the flags of `train`) needs neither
        from .loop import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
