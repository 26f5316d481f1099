"""Between text and token ids: a conversation's prompt ids, and from generated ids to streamed text
(incremental detokenization and stop strings).

The engine (engine/engine.py) works on token ids; each request's ids go through a `TextStream`, which turns them
into text deltas at a constant cost per token, whatever the length of the answer:

- detokenization is incremental: `tokenizers`' `DecodeStream` re-decodes only a window of the last few ids,
  never the whole answer (re-decoding everything for every token is quadratic in the answer's length);
- a character split over several tokens (UTF-8 bytes of an emoji or of CJK text) is held back until it is
  whole: a delta never ends in half a character (U+FFFD);
- text that may be the beginning of a stop string is held back until it is known not to be one; a stop
  string may span several tokens. The stop string and whatever follows it are never emitted. With
  `min_ids` (a request's `min_tokens`), a stop string found before that many ids were pushed is text.

The text streamed is `tokenizer.decode(ids, skip_special_tokens=True)` of the whole answer, cut before the
first stop string, less a trailing incomplete character. (transformers' decode may also apply its
WordPiece-era `clean_up_tokenization_spaces`; it skips it for the BPE tokenizers of decoder-only models,
and so does this stream, always.)
"""

from __future__ import annotations

import logging

from tokenizers.decoders import DecodeStream

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"      # what a decoder writes for bytes that are not (yet) a whole character
WINDOW_CONTEXT_IDS = 8      # ids of context a fallback decoder starts from


def chat_prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The token ids of a conversation rendered by the chat template, ending with the assistant's turn opening
    (what the model continues); tools and tool turns as engine/toolcalls.py renders them for this template.
    lm.encode_chat renders whole conversations with loss labels, for training."""
    from assistant.engine.toolcalls import for_template
    messages, extra = for_template(tokenizer, messages, tools)
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        **extra)
    return list(out["input_ids"])


def backend_of(tokenizer):
    """The `tokenizers.Tokenizer` behind a transformers tokenizer (or the tokenizer itself), or None."""
    from tokenizers import Tokenizer
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None


class WindowDecoder:
    """DecodeStream's algorithm in Python, over any `decode(ids) -> str`: the text of a new id is the decode
    of a short window of ids less the decode of the window without it. Serves tokenizers that have no
    `tokenizers` backend, and a stream whose DecodeStream failed."""

    def __init__(self, decode, context: list[int] | tuple[int, ...] = ()):
        self.decode = decode
        self.ids = list(context)
        self.prefix = decode(self.ids) if self.ids else ""
        self.start = len(self.ids)     # ids before `start` are context, already emitted

    def step(self, tok: int) -> str | None:
        self.ids.append(tok)
        text = self.decode(self.ids)
        if len(text) <= len(self.prefix) or text.endswith(REPLACEMENT):
            return None
        new = text[len(self.prefix):]   # (a decoder that rewrites earlier text loses that rewrite)
        self.ids = self.ids[self.start:]
        self.prefix = self.decode(self.ids)
        self.start = len(self.ids)
        return new


class TextStream:
    """One answer's token ids in, its text out, in deltas safe to show (see the module docstring).

    `push(id)` returns the text that became final with that id ("" while it is held back); when the answer
    reaches a stop string, `stopped` turns True and `push` returns the text up to the stop string, after
    which the stream takes no more ids. `finish()` returns what was still held back (text that might have
    begun a stop string) when the answer ends otherwise. `text` is the answer's text streamed so far."""

    def __init__(self, tokenizer, stop: tuple[str, ...] | list[str] = (), *, skip_special_tokens: bool = True,
                 min_ids: int = 0):
        self.stop = tuple(s for s in stop if s)
        self.min_ids = min_ids          # stop strings end the text only once this many ids were pushed
        self.pushed = 0
        self.skip_special_tokens = skip_special_tokens
        self.backend = backend_of(tokenizer)
        self._tokenizer = tokenizer
        if self.backend is not None:
            self._decoder = DecodeStream(skip_special_tokens=skip_special_tokens)
            special = [i for i, t in self.backend.get_added_tokens_decoder().items() if t.special]
        else:
            self._decoder = WindowDecoder(self._decode)
            special = getattr(tokenizer, "all_special_ids", None) or []
        # Decoding drops skipped special tokens before anything else, so they need not reach the decoder (a
        # run of them, e.g. past the end of sequence under ignore_eos, would widen its window).
        self._skip = frozenset(special) if skip_special_tokens else frozenset()
        self._recent: list[int] = []    # the last few ids whose text is out: context to decode more from
        self._held: list[int] = []      # ids since, whose text is not out yet (part of a character)
        self._parts: list[str] = []     # text emitted so far, joined on demand
        self._pending = ""              # decoded, but held back: it may begin a stop string
        self.stopped = False

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def _decode(self, ids: list[int]) -> str:
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self._tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _step(self, tok: int) -> str | None:
        if isinstance(self._decoder, WindowDecoder):
            chunk = self._decoder.step(tok)
        else:
            try:
                chunk = self._decoder.step(self.backend, tok)
            except Exception:  # noqa: BLE001 - e.g. a decoder whose output is not prefix-stable; go on without it
                log.warning("incremental decoding failed at token %d: the rest of this answer decodes by "
                            "windows of ids", tok, exc_info=True)
                self._decoder = WindowDecoder(self._decode, self._recent[-WINDOW_CONTEXT_IDS:])
                chunk = "".join(c for c in map(self._decoder.step, self._held + [tok]) if c) or None
        if chunk is None:
            self._held.append(tok)
            return None
        self._recent += self._held
        self._recent.append(tok)
        self._held.clear()
        if len(self._recent) > 2 * WINDOW_CONTEXT_IDS:
            del self._recent[:-WINDOW_CONTEXT_IDS]
        return chunk

    def push(self, tok: int) -> str:
        """The text that `tok` makes final ("" when none yet). After a stop string, ids are ignored."""
        self.pushed += 1
        if self.stopped or tok in self._skip:
            return ""
        return self._take(self._step(tok))

    def _take(self, chunk: str | None) -> str:
        if not chunk:
            return ""
        if not self.stop:
            self._parts.append(chunk)
            return chunk
        # Emitted text never ends in a proper prefix of a stop string (that is held back in _pending), so a
        # stop string that completes now lies within _pending + chunk: the search is bounded by its length.
        window = self._pending + chunk
        cut = -1 if self.pushed < self.min_ids else min((i for i in (window.find(s) for s in self.stop) if i >= 0),
                                                         default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return self._emit(window[:cut])
        keep = 0
        for s in self.stop:   # the longest end of the window that begins some stop string
            for k in range(min(len(s) - 1, len(window)), keep, -1):
                if window.endswith(s[:k]):
                    keep = k
                    break
        self._pending = window[len(window) - keep:] if keep else ""
        return self._emit(window[:len(window) - keep])

    def finish(self) -> str:
        """At the end of the answer: the text still held back, if any, as `tokenizer.decode` of the whole
        answer has it, less a character whose ids never completed it."""
        if self.stopped:
            return ""
        out = ""
        if self._held:   # e.g. a space before the first byte of an emoji, in one token
            context = self._recent[-WINDOW_CONTEXT_IDS:]
            head, whole = self._decode(context), self._decode(context + self._held).rstrip(REPLACEMENT)
            self._held.clear()
            if whole.startswith(head):
                out = self._take(whole[len(head):])
        if not self.stopped:
            out += self._emit(self._pending)
            self._pending = ""
        return out

    def _emit(self, text: str) -> str:
        if text:
            self._parts.append(text)
        return text
