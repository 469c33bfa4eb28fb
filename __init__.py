"""The root of a clone of the hf_oscq repository; the package itself is its `hf_oscq/` subfolder.

A script that sits next to a clone folder named `hf_oscq` and runs `import hf_oscq` imports this folder instead of
the installed package (Python searches the script's folder first). Without this file the folder would be imported
as an empty namespace package, and the script would fail later with errors that say to `import hf_oscq`, which it
did. This file makes that import fail at once, saying which folder shadows the package.
"""

from pathlib import Path as _Path

if __name__ == "hf_oscq":  # imported as the package (only a script next to the clone does that), not by a tool
    _clone = _Path(__file__).resolve().parent
    raise ImportError(
        f"`import hf_oscq` found the folder {_clone}, a clone of the hf_oscq repository next to your script, "
        f"instead of the installed package: the folder shadows it. Run the script from another folder (or rename "
        f"the clone), with the package installed from the clone: pip install -e {_clone}"
    )
