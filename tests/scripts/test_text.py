import shutil

import pytest
import torch

from hf_oscq.errors import OscqValueError
from hf_oscq.scripts.data import HubUnreachableError
from hf_oscq.scripts.text import END_OF_TEXT, TokenBlocks, byte_tokenizer, load_hub_text, load_kjv

needs_kjv = pytest.mark.skipif(shutil.which("bible") is None, reason="Debian packages bible-kjv, bible-kjv-text")


def test_byte_tokenizer_ids_are_the_utf8_bytes_and_decode_back(tmp_path):
    tokenizer = byte_tokenizer()
    text = "In the beginning — “Ünïcode” \n\ttabs & 1611"
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == 257 and tokenizer.convert_tokens_to_ids(END_OF_TEXT) == 256 == tokenizer.eos_token_id
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == ids


def test_token_blocks_are_consecutive_windows():
    tokenizer = byte_tokenizer()
    blocks = TokenBlocks("abcdefghij" * 3, tokenizer, block_size=8)
    assert len(blocks) == 3  # 30 bytes: three whole blocks, the tail of 6 dropped
    assert bytes(blocks[1]["input_ids"].tolist()) == b"ijabcdef"
    assert torch.equal(blocks[1]["labels"], blocks[1]["input_ids"])
    assert len(TokenBlocks("x" * 100, tokenizer, 8, max_blocks=2)) == 2
    with pytest.raises(OscqValueError, match="fewer than one block"):
        TokenBlocks("short", tokenizer, 8)


@needs_kjv
def test_kjv_corpus_holds_every_verse_with_every_twentieth_chapter_held_out():
    corpus = load_kjv()
    train, held_out = corpus.train.splitlines(), corpus.eval.splitlines()
    assert len(train) + len(held_out) == 31102  # verses of the King James Version
    assert train[0] == "In the beginning God created the heaven and the earth."
    # chapters 20, 40, ... of the Bible's 1189, counted across books: Genesis 20 and 40 are the first two
    assert held_out[0].startswith("And Abraham journeyed from thence toward the south country")
    assert "And it came to pass after these things, that the butler of the king of Egypt" in corpus.eval
    assert "And the LORD visited Sarah as he had said" in corpus.train  # Genesis 21:1
    assert "public domain" in corpus.license


def test_hub_text_dataset_offline_is_a_clear_error():
    with pytest.raises(HubUnreachableError, match="--dataset kjv"):
        load_hub_text("Salesforce/wikitext", "wikitext-2-raw-v1")
