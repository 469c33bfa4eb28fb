"""Text data and tokenizers of the language-model recipe: an offline corpus, a Hub text dataset, a byte-level
tokenizer, and fixed-length token blocks for causal language modelling.

Offline corpus: the King James Version of the Bible as Debian ships it (packages `bible-kjv-text`, the text, and
`bible-kjv`, the `bible` program that decompresses it; `make system-deps` installs both). The 1611 translation is in
the public domain (outside the United Kingdom, where the Crown's letters patent still govern printing); the `bible`
program is GPL-2+ and is only run, never shipped. 31,102 verses, about 4.3 MB of text; every 20th chapter is held
out for evaluation.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OscqValueError
from .data import HubUnreachableError
from .dataset_errors import dataset_errors

KJV = "kjv"
KJV_COMMAND = ("bible", "-f", "Gen1:1-Rev22:21")  # -f: one verse a line, with its reference
KJV_LICENSE = "public domain (King James Version, 1611), from Debian's bible-kjv-text"
EVAL_EVERY_CHAPTERS = 20
END_OF_TEXT = "<|endoftext|>"
_VERSE = re.compile(r"^(?P<chapter>[1-3]?[A-Za-z]+\d+):\d+ (?P<text>.*)$")


@dataclass
class TextCorpus:
    """Training and evaluation text, and where it came from."""

    name: str
    train: str
    eval: str
    license: str
    eval_split: str = "held-out"  # which part of the source the evaluation text is, as a `Provenance` names it


def load_kjv(listing_file: str | Path | None = None) -> TextCorpus:
    """The King James Version from Debian's `bible-kjv-text`, verses one a line; every `EVAL_EVERY_CHAPTERS`-th
    chapter goes to the evaluation text.

    Args:
        listing_file: what `bible -f Gen1:1-Rev22:21` printed, saved to a file (for machines without the Debian
            packages); by default the `bible` program is run.

    Raises:
        OscqValueError: when the `bible` program (Debian packages bible-kjv, bible-kjv-text) is not installed.
    """
    if listing_file is not None:
        return _split_kjv(Path(listing_file).read_text())
    if shutil.which(KJV_COMMAND[0]) is None:
        raise OscqValueError(
            "The offline text corpus needs Debian's King James Version: apt-get install bible-kjv bible-kjv-text "
            "(or `make system-deps`), or train on a Hub text dataset with --dataset_name."
        )
    return _split_kjv(subprocess.run(KJV_COMMAND, capture_output=True, text=True, check=True, timeout=120).stdout)


def _split_kjv(listing: str) -> TextCorpus:
    train, held_out, chapters = [], [], {}
    for line in listing.splitlines():
        verse = _VERSE.match(line)
        if verse is None:
            continue
        index = chapters.setdefault(verse["chapter"], len(chapters))
        (held_out if index % EVAL_EVERY_CHAPTERS == EVAL_EVERY_CHAPTERS - 1 else train).append(verse["text"])
    if not train or not held_out:
        raise OscqValueError(f"`{' '.join(KJV_COMMAND)}` printed no verses: reinstall bible-kjv-text.")
    every = f"every-{EVAL_EVERY_CHAPTERS}th-chapter"
    return TextCorpus(KJV, "\n".join(train) + "\n", "\n".join(held_out) + "\n", KJV_LICENSE, every)


def load_hub_text(name: str, config: str | None = None, column: str = "text") -> TextCorpus:
    """A Hub text dataset's train and validation (or test) splits, joined line by line.

    Raises:
        HubUnreachableError: when the dataset cannot be downloaded.
        OscqValueError: when it has no `column` or no evaluation split.
    """
    import datasets

    local = Path(name).exists()
    fix = (
        "a local folder needs train.txt and validation.txt (or test.txt), each holding text, one document a line."
        if local
        else "check the dataset id, its configuration and --text_column."
    )
    try:
        with dataset_errors(f"The text dataset {name!r}", fix):
            loaded = datasets.load_dataset(name, config)
    except (OSError, ConnectionError) as error:
        if local:
            raise
        raise HubUnreachableError(
            f"The text dataset {name!r} lives on the Hugging Face Hub, which could not be reached "
            f"({str(error).splitlines()[0] if str(error) else type(error).__name__}). Offline: --dataset kjv "
            "(Debian's bible-kjv-text), or run where the Hub is reachable (a cached download also works)."
        ) from None
    held_out = next((split for split in ("validation", "test") if split in loaded), None)
    if "train" not in loaded or held_out is None or column not in loaded["train"].column_names:
        raise OscqValueError(
            f"{name!r} needs a train split, a validation or test split and a {column!r} column (--text_column); it "
            f"has splits {list(loaded)} and columns {loaded[next(iter(loaded))].column_names}."
        )
    lines = {split: "\n".join(loaded[split][column]) for split in ("train", held_out)}
    for split, text in lines.items():
        if not text.strip():
            raise OscqValueError(f"The text dataset {name!r} has an empty {split} split: {fix}")
    return TextCorpus(name, lines["train"], lines[held_out], "see the dataset card on the Hub", held_out)


def byte_tokenizer():
    """A byte-level tokenizer (the 256 bytes, GPT-2's byte-to-character mapping, no merges) plus `<|endoftext|>`
    (id 256), built with `tokenizers`: any text encodes, nothing is unknown, and decoding gives the text back.

    Returns:
        A `PreTrainedTokenizerFast` to save with the model (`save_pretrained`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet, key=_byte_of))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([END_OF_TEXT])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )


def _byte_of(symbol: str) -> int:
    """The byte GPT-2's byte-level alphabet maps to `symbol` (printable bytes map to themselves)."""
    code = ord(symbol)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


class TokenBlocks(torch.utils.data.Dataset):
    """A text as consecutive `block_size`-token windows for causal language modelling (`labels` = `input_ids`;
    the model shifts them). The tail shorter than a block is dropped."""

    def __init__(self, text: str, tokenizer, block_size: int, max_blocks: int | None = None):
        if block_size < 2:
            raise OscqValueError(f"block_size must be at least 2 tokens, got {block_size}.")
        if max_blocks is not None:  # no tokenizer packs more than 16 characters a token: tokenize only what is used
            text = text[: max_blocks * block_size * 16]
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        blocks = ids[: len(ids) // block_size * block_size].view(-1, block_size)
        if max_blocks is not None:
            blocks = blocks[:max_blocks]
        if len(blocks) == 0:
            raise OscqValueError(f"The text holds {len(ids)} tokens, fewer than one block of {block_size}.")
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}
