"""The chat demo: `python demo/app.py [flags]` is `llama-adapter demo [flags]` (see --help).

python demo/app.py                         # the embedded SmolLM2 with the shelf's adapters (alpaca, shapes)
python demo/app.py --adapter runs/my-adapter  # your adapter first, then the shelf's
"""

import sys

from llama_adapter.cli import main

if __name__ == "__main__":
    main(["demo", *sys.argv[1:]])
