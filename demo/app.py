"""The chat demo: `python demo/app.py [flags]` is `llama-adapter demo [flags]` (see --help).

python demo/app.py                                               # the embedded SmolLM2, no adapter
python demo/app.py --adapter runs/alpaca runs/colours/multimodal  # offer two adapters on that base
"""

import sys

from llama_adapter.cli import main

if __name__ == "__main__":
    main(["demo", *sys.argv[1:]])
