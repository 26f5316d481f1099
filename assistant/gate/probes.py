"""The general-knowledge probe set the gate asks before a new version goes live, and how an answer is
judged to give a probe's content.

Each probe is a short question with the key content of a right answer: one or more alternatives, any of
which counts ("7" or "seven"). An answer gives the content when one alternative appears in it as whole
words, case and punctuation aside (`gives_content`), so a shorter or reworded answer that keeps the fact
still counts. The questions are written for this project, cover everyday facts, arithmetic, language and
simple instructions, and are kept apart from every training row: the training recipe's self-replay prompts
and the benchmark's hidden probe set share no question with them (tests/test_retention.py checks it).

`PROBE_SET_VERSION` names this list in caches and cards: change it whenever a probe changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PROBE_SET_VERSION = "general-1"


@dataclass(frozen=True)
class Probe:
    question: str
    keys: tuple[str, ...]          # any one of them, as whole words, makes the answer right
    kind: str                      # fact | arithmetic | language | instruction


def _p(kind: str, question: str, *keys: str) -> Probe:
    return Probe(question, keys, kind)


PROBES: tuple[Probe, ...] = (
    # Everyday facts
    _p("fact", "What is the capital of France?", "paris"),
    _p("fact", "What is the capital of Germany?", "berlin"),
    _p("fact", "What is the capital of Spain?", "madrid"),
    _p("fact", "What is the capital of England?", "london"),
    _p("fact", "What is the capital of Russia?", "moscow"),
    _p("fact", "What is the capital of Egypt?", "cairo"),
    _p("fact", "What is the capital of China?", "beijing"),
    _p("fact", "What is the capital of the United States?", "washington"),
    _p("fact", "How many days are there in a week?", "7", "seven"),
    _p("fact", "How many months are there in a year?", "12", "twelve"),
    _p("fact", "How many hours are there in a day?", "24", "twenty four", "twenty-four"),
    _p("fact", "How many minutes are there in an hour?", "60", "sixty"),
    _p("fact", "How many legs does a dog have?", "4", "four"),
    _p("fact", "How many continents are there on Earth?", "7", "seven"),
    _p("fact", "What color is the sky on a clear day?", "blue"),
    _p("fact", "What color is grass?", "green"),
    _p("fact", "What color is snow?", "white"),
    _p("fact", "What do bees make?", "honey"),
    _p("fact", "What do cows drink?", "water"),
    _p("fact", "Which animal is known as the king of the jungle?", "lion"),
    _p("fact", "What is the largest animal on Earth?", "blue whale", "whale"),
    _p("fact", "What planet do we live on?", "earth"),
    _p("fact", "What star is at the center of our solar system?", "sun"),
    _p("fact", "Which planet is known as the Red Planet?", "mars"),
    _p("fact", "What is frozen water called?", "ice"),
    _p("fact", "Who wrote Hamlet?", "shakespeare"),
    _p("fact", "Who painted the Starry Night?", "van gogh", "gogh"),
    _p("fact", "Who developed the theory of relativity?", "einstein"),
    _p("fact", "What is the freezing point of water in Celsius?", "0", "zero"),
    _p("fact", "What organ pumps blood through the body?", "heart"),
    _p("fact", "What do plants need from the sun to grow?", "light", "sunlight"),
    _p("fact", "What is the chemical symbol for gold?", "au"),
    _p("fact", "What is the fastest land animal?", "cheetah"),
    _p("fact", "In which country are the pyramids of Giza?", "egypt"),
    _p("fact", "What is the main language spoken in Mexico?", "spanish"),
    _p("fact", "What season comes after winter?", "spring"),
    # Arithmetic
    _p("arithmetic", "What is 2 plus 2?", "4", "four"),
    _p("arithmetic", "What is 3 plus 4?", "7", "seven"),
    _p("arithmetic", "What is 10 minus 3?", "7", "seven"),
    _p("arithmetic", "What is 5 times 2?", "10", "ten"),
    _p("arithmetic", "What is 9 plus 1?", "10", "ten"),
    _p("arithmetic", "What is 6 times 3?", "18", "eighteen"),
    _p("arithmetic", "What is 20 divided by 4?", "5", "five"),
    _p("arithmetic", "What is 100 minus 1?", "99", "ninety nine", "ninety-nine"),
    _p("arithmetic", "What is half of 10?", "5", "five"),
    _p("arithmetic", "What is 3 times 3?", "9", "nine"),
    _p("arithmetic", "What is 8 plus 8?", "16", "sixteen"),
    _p("arithmetic", "What is 15 plus 5?", "20", "twenty"),
    # Language
    _p("language", "What is the opposite of cold?", "hot", "warm"),
    _p("language", "What is the opposite of big?", "small", "little", "tiny"),
    _p("language", "What is the opposite of up?", "down"),
    _p("language", "What is the opposite of day?", "night"),
    _p("language", "What is the plural of child?", "children"),
    _p("language", "What is the plural of mouse?", "mice"),
    _p("language", "What is the past tense of go?", "went"),
    _p("language", "How do you say thank you in French?", "merci"),
    _p("language", "How do you say hello in Spanish?", "hola"),
    _p("language", "How do you say yes in Spanish?", "si", "sí"),
    _p("language", "What word means a baby cat?", "kitten"),
    _p("language", "What word means a baby dog?", "puppy"),
    _p("language", "What is a word that rhymes with cat?", "hat", "bat", "mat", "rat", "sat", "fat", "pat", "that",
       "chat", "flat", "vat"),
    _p("language", "What is the opposite of open?", "closed", "close", "shut"),
    # Instructions
    _p("instruction", "Reply with only the word yes.", "yes"),
    _p("instruction", "Name a fruit that is yellow.", "banana", "lemon", "pineapple", "mango"),
    _p("instruction", "Name a primary color.", "red", "blue", "yellow"),
    _p("instruction", "Name a day of the week.", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday",
       "sunday"),
    _p("instruction", "Name an animal that can fly.", "bird", "birds", "eagle", "bat", "owl", "parrot", "pigeon",
       "sparrow", "butterfly", "bee", "crow", "hawk", "duck"),
    _p("instruction", "Count from one to three.", "1 2 3", "one two three"),
    _p("instruction", "Write the number five as a digit.", "5"),
    _p("instruction", "Name something you can drink.", "water", "milk", "juice", "tea", "coffee", "soda"),
    _p("instruction", "Complete the phrase: once upon a...", "time"),
    _p("instruction", "Name a month of the year.", "january", "february", "march", "april", "may", "june", "july",
       "august", "september", "october", "november", "december"),
    _p("instruction", "Say good morning.", "good morning"),
    _p("instruction", "Name a musical instrument.", "piano", "guitar", "violin", "drum", "drums", "flute",
       "trumpet", "saxophone", "cello", "harp", "clarinet"),
)

_NON_WORD = re.compile(r"[^\w]+")


def normalize(text: str) -> str:
    """Lower-cased words joined by single spaces, with a space at each end (for whole-word search)."""
    return " " + " ".join(_NON_WORD.sub(" ", text.lower()).split()) + " "


def gives_content(answer: str, keys: tuple[str, ...]) -> bool:
    """Whether `answer` holds one of `keys` as whole words (case and punctuation aside)."""
    text = normalize(answer)
    return any(normalize(k) in text for k in keys)
