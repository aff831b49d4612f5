"""python -m llama_adapter.train ARGS is python -m llama_adapter train ARGS (torchrun's older form)."""

import runpy
import sys

sys.argv.insert(1, "train")
runpy.run_module("llama_adapter", run_name="__main__", alter_sys=True)
