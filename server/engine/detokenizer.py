"""Incremental detokenization with stop strings.

Decoding only a short window of recent tokens keeps each step O(1) in the output length; text is
held back while it ends in an incomplete UTF-8 sequence or could be the start of a stop string,
so a client never sees text that a later token takes back.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start
        self._read_offset = 0  # tokens before this are already in self._text
        self._text = ""  # text of every token up to the read offset, stop strings not yet cut
        self._emitted = 0  # characters of self._text already handed out
        self.stopped = False

    @property
    def text(self) -> str:
        return self._text[: self._emitted]

    def add(self, token_id: int) -> str:
        """Append one token; return the new text that is safe to show (may be empty)."""
        self._ids.append(token_id)
        window = self._ids[self._prefix_offset :]
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(window)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete character: wait for the next token
        self._text += full[len(prefix) :]
        # The tokens just read stay in the next window as context (leading spaces, merges).
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._release()

    def flush(self) -> str:
        """At the end of generation: hand out what was held back for a possible stop string."""
        if self.stopped:
            return ""
        tail = self._text[self._emitted :]
        self._emitted = len(self._text)
        return tail

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _release(self) -> str:
        start = max(0, self._emitted - max((len(s) for s in self._stop), default=0))
        hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            cut = min(hits)
            self._text = self._text[:cut]
            self.stopped = True
            out = self._text[self._emitted :]
            self._emitted = len(self._text)
            return out
        safe = len(self._text) - self._held_back()
        out = self._text[self._emitted : safe]
        self._emitted = max(self._emitted, safe)
        return out

    def _held_back(self) -> int:
        # the longest tail of the text that is a proper prefix of some stop string
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
