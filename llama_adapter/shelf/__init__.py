"""The shelf: trained adapters for the embedded SmolLM2 that ship inside the package, each in a folder of its own
(adapter.safetensors, our config and a model card, README.md), each made by one script under train/.

Every command and `LlamaAdapterModel.load` take a shelf name wherever they take an adapter folder: a folder of that
name in the working directory wins, and says so. What the demo and the server offer of the shelf by themselves is
loaded from the shelf's own folders, which no folder of the working directory shadows.
"""

import itertools
import os
import re
import sys
from pathlib import Path

from .. import files
from ..adapter_files import config_path, read_config

FOLDER = Path(__file__).parent


def names() -> list[str]:
    """The adapters on the shelf."""
    return sorted(path.name for path in FOLDER.iterdir() if config_path(path).is_file())


def for_base(base: str) -> list[str]:
    """The shelf's adapters trained on the base of that name (DEFAULT_BASE: the embedded SmolLM2)."""
    return [name for name in names() if read_config(FOLDER / name)["base"]["name"] == base]


def resolve(adapter: str | Path) -> Path:
    """The folder `adapter` names: a folder that exists, else the shelf's adapter of that name.

    A bare name (no folder part) that is neither is refused, listing the shelf; a path is returned as it is, for the
    adapter folder's own checks to name what is missing.
    """
    files.check_path(adapter, "adapter")
    name, path = str(adapter), Path(adapter)
    if path.name != name or name.startswith((".", "~")):  # a path, not a name
        return path
    shelved = name in names()
    if path.is_dir():
        if shelved:
            print(f"--adapter {name}: using the folder ./{name}, not the shelf's adapter of that name", file=sys.stderr)
        return path
    if shelved:
        return FOLDER / name
    raise FileNotFoundError(
        f"--adapter {name!r}: no such folder, and no adapter of that name on the shelf "
        f"({', '.join(names()) or 'none yet'}; `llama-adapter adapters` lists them)"
    )


def identity(adapter: str | Path) -> str:
    """How a record names the adapter `adapter` resolves to, so that it means the same from any working folder: its
    shelf name, or its folder's absolute path."""
    folder = resolve(adapter)
    return folder.name if folder.parent == FOLDER else os.path.abspath(folder)


def describe(name: str) -> dict:
    """What `llama-adapter adapters` shows of a shelf adapter: method, base, parameters and what it is for."""
    folder = FOLDER / name
    config = read_config(folder)
    card = (folder / "README.md").read_text().splitlines() if (folder / "README.md").is_file() else []
    # The first sentence of the card's first paragraph after its title.
    paragraph = " ".join(itertools.takewhile(str.strip, itertools.dropwhile(lambda line: not line.strip(), card[1:])))
    purpose = re.split(r"(?<=\.)\s", paragraph, maxsplit=1)[0]
    return {
        "name": name,
        "method": config["adapter"]["method"] + (" + images" if config.get("visual", {}).get("clip_model") else ""),
        "base": config["base"]["name"],
        "parameters": config["trainable_parameters"],
        "for": purpose,
    }
