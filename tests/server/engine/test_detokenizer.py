"""IncrementalDetokenizer: text appears once it is final, multi-byte characters split over
byte tokens never show half-made, and stop strings are cut even when tokens split them."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from cats_serve.server.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    """The tiny byte-level BPE tokenizer: characters outside its training text are bytes."""
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def feed(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    """The pieces `add` hands out, token by token, up to a stop (as the engine feeds it)."""
    pieces = []
    for i in ids:
        pieces.append(detok.add(i))
        if detok.stopped:
            break
    return pieces


def test_streamed_pieces_add_up_to_the_decoded_text(tokenizer):
    text = "the cat sat on a mat while the dog ran to Paris"
    ids = tokenizer(text)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    pieces = feed(detok, ids)
    assert "".join(pieces) + detok.flush() == tokenizer.decode(ids) == text
    assert detok.text == text and not detok.stopped


@pytest.mark.parametrize("char", ["é", "€", "🙂"])
def test_a_multi_byte_character_waits_for_its_last_byte(tokenizer, char):
    ids = tokenizer(f"cat {char} dog")["input_ids"]
    char_ids = tokenizer(char)["input_ids"]
    assert len(char_ids) == len(char.encode()) > 1, "the character should be split into bytes"
    detok = IncrementalDetokenizer(tokenizer)
    pieces = feed(detok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "cat " + char + " dog"
    # the character comes out whole, with the token of its last byte
    holder = next(i for i, p in enumerate(pieces) if char in p)
    assert all(p == "" for p in pieces[holder - len(char_ids) + 1 : holder])


def test_an_unfinished_character_at_the_end_is_never_shown(tokenizer):
    ids = tokenizer("cat 🙂")["input_ids"][:-1]  # cut inside the emoji's bytes
    detok = IncrementalDetokenizer(tokenizer)
    out = "".join(feed(detok, ids)) + detok.flush()
    assert out == "cat " and "\ufffd" not in out


def test_a_stop_string_split_over_tokens_cuts_the_text(tokenizer):
    ids = tokenizer("the cat sat on a mat")["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, stop=("sat on",))
    pieces = feed(detok, ids)
    assert len(pieces) < len(ids) and detok.stopped
    assert "".join(pieces) == detok.text == "the cat "
    assert detok.flush() == ""  # nothing of the stop string comes out later


def test_text_held_for_a_stop_string_that_never_completes_comes_out_at_flush(tokenizer):
    ids = tokenizer("the cat sat on a")["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, stop=("sat on a hat",))
    shown = "".join(feed(detok, ids))
    assert not detok.stopped
    assert shown == "the cat "  # "sat on a" could still become "sat on a hat"
    assert shown + detok.flush() == "the cat sat on a"


def test_the_earliest_of_several_stop_strings_wins(tokenizer):
    ids = tokenizer("one two three four five")["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, stop=("four", "two", ""))
    out = "".join(feed(detok, ids))
    assert detok.stopped and out == "one "


def test_a_stop_string_ending_in_a_multi_byte_character(tokenizer):
    ids = tokenizer("cat é dog")["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, stop=(" é",))
    out = "".join(feed(detok, ids))
    assert detok.stopped and out == "cat"


def test_special_tokens_add_no_text(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<eos>")
    detok = IncrementalDetokenizer(tokenizer)
    out = "".join(feed(detok, [*tokenizer("hello world")["input_ids"], eos]))
    assert out + detok.flush() == "hello world"
