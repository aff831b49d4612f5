"""python -m llama_adapter ARGS: the llama-adapter command (how torchrun starts each training process)."""

from .cli import main

main()
