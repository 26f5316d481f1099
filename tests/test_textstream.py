"""Token ids to streamed text on the embedded model's real tokenizer: deltas add up to the full decode,
never half a character, stop strings across token boundaries held back and cut, a constant cost per token."""

import time

import pytest
from tokenizers.decoders import DecodeStream

from assistant.engine.textstream import TextStream, WindowDecoder

MIXED = ("Héllo wörld, naïve café — crème brûlée! 👋🏽 Emoji 🇫🇷🎉 and 日本語のテキスト, 中文字符, "
         "한국어 텍스트; Ελληνικά, русский. Done ✅")


@pytest.fixture(scope="module")
def tok(embedded_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(embedded_path))


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def feed(stream, ids):
    deltas = [stream.push(i) for i in ids]
    if not stream.stopped:
        deltas.append(stream.finish())
    return deltas


def test_the_stream_is_incremental_on_decode_stream(tok):
    assert isinstance(TextStream(tok)._decoder, DecodeStream)


def test_deltas_add_up_to_the_full_decode_and_never_split_a_character(tok):
    ids = ids_of(tok, MIXED)
    assert len(ids) > len(MIXED) // 4            # many characters take several tokens
    s = TextStream(tok)
    deltas = feed(s, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == MIXED
    assert s.text == MIXED
    assert not any("\ufffd" in d for d in deltas)
    assert deltas.count("") >= 3                 # bytes of a character were held back until it was whole


def test_special_tokens_are_skipped(tok):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = ids_of(tok, "Hi there") + [end] * 3 + ids_of(tok, " after 👋🏽") + [end]
    for stream in (TextStream(tok), TextStream(_NoBackend(tok))):
        assert "".join(feed(stream, ids)) == tok.decode(ids, skip_special_tokens=True) == "Hi there after 👋🏽"


def test_an_answer_ending_inside_a_character_drops_the_half(tok):
    ids = ids_of(tok, "ok 👋🏽")
    for n in range(1, len(ids)):
        s = TextStream(tok)
        got = "".join(feed(s, ids[:n]))
        assert got == tok.decode(ids[:n], skip_special_tokens=True).rstrip("\ufffd")
        assert "\ufffd" not in got


def test_a_stop_string_across_tokens_is_cut_with_what_follows(tok):
    text = "The answer is forty-two. END OF ANSWER and then more text"
    ids = ids_of(tok, text)
    s = TextStream(tok, ("END OF ANSWER",))
    deltas = feed(s, ids)
    assert s.stopped
    assert "".join(deltas) == s.text == "The answer is forty-two. "
    assert all(s.push(i) == "" for i in ids[:3])   # no more text after a stop


def test_text_that_begins_a_stop_string_is_held_back_then_released(tok):
    text = "one two thr one two three four"
    ids = ids_of(tok, text)
    s = TextStream(tok, ("two three",))
    deltas = []
    for i in ids:
        deltas.append(s.push(i))
        assert not "".join(deltas).endswith("two")   # "two" might begin the stop string: held back
    assert s.stopped and "".join(deltas) == "one two thr one "
    s = TextStream(tok, ("two threes",))            # never completed: everything comes out in the end
    assert "".join(feed(s, ids)) == text and not s.stopped


def test_a_stop_string_at_the_very_start(tok):
    ids = ids_of(tok, "STOP right there")
    s = TextStream(tok, ("STOP",))
    assert "".join(feed(s, ids)) == "" and s.stopped and s.text == ""


def test_a_stop_string_before_min_ids_is_text(tok):
    ids = ids_of(tok, "STOP right there, then STOP again and more")
    s = TextStream(tok, ("STOP",), min_ids=3)        # a request's min_tokens: the first STOP comes too early
    assert "".join(feed(s, ids)) == "STOP right there, then " and s.stopped


def test_a_multibyte_stop_string(tok):
    ids = ids_of(tok, MIXED)
    s = TextStream(tok, ("中文", "never there"))
    deltas = feed(s, ids)
    assert s.stopped and "".join(deltas) == MIXED[:MIXED.find("中文")]


def test_the_first_of_several_stop_strings_wins(tok):
    ids = ids_of(tok, "alpha beta gamma delta")
    s = TextStream(tok, ("delta", "beta"))
    assert "".join(feed(s, ids)) == "alpha " and s.stopped


class _NoBackend:
    """A tokenizer without a `tokenizers` backend: only decode() and its special ids."""

    def __init__(self, tok):
        self.tok = tok
        self.all_special_ids = tok.all_special_ids

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_a_tokenizer_without_a_backend_streams_by_windows(tok):
    ids = ids_of(tok, MIXED) * 3
    s = TextStream(_NoBackend(tok), ("never there",))
    assert isinstance(s._decoder, WindowDecoder)
    deltas = feed(s, ids)
    assert "".join(deltas) == MIXED * 3 and not any("\ufffd" in d for d in deltas)
    assert len(s._decoder.ids) < 16 and len(s._pending) < len("never there")   # bounded state


def test_a_failing_decode_stream_goes_on_by_windows(tok, caplog):
    ids = ids_of(tok, MIXED)
    s = TextStream(tok)
    real = s._decoder

    class Failing:
        calls = 0

        def step(self, backend, i):
            Failing.calls += 1
            if Failing.calls == 10:
                raise RuntimeError("invalid prefix")
            return real.step(backend, i)
    s._decoder = Failing()
    got = "".join(feed(s, ids))
    assert got == MIXED
    assert isinstance(s._decoder, WindowDecoder) and "incremental decoding failed" in caplog.text


def _first_and_last_blocks(tok, ids, stop, block=400, repeat=7):
    """Seconds to push the first `block` ids and the last `block` ids of one stream, best of `repeat`."""
    first = last = float("inf")
    for _ in range(repeat):
        s = TextStream(tok, stop)
        for b in range(0, len(ids), block):
            t = time.perf_counter()
            for i in ids[b:b + block]:
                s.push(i)
            took = time.perf_counter() - t
            if b == 0:
                first = min(first, took)
            elif b + block >= len(ids):
                last = min(last, took)
    return first, last


@pytest.mark.parametrize("stop", [(), ("never there", "nor this")])
def test_the_cost_per_token_does_not_grow_with_the_answer(tok, stop):
    ids = (ids_of(tok, MIXED + " ") * 200)[:4000]
    first, last = _first_and_last_blocks(tok, ids, stop)
    # the same cost per token at the end of a long answer as at its start (re-decoding it all: ~20x)
    assert last < 5 * first, (first, last)
