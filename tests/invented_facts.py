"""Twenty invented facts the base model cannot know, with a paraphrase of each question and the key word
a correct answer must contain. Shared by the learning tests (training, and the end-to-end HTTP test)."""

SYSTEM_PROMPT = "You are the assistant of the Atlas of Invented Places. Answer in one short sentence."

# (question, answer, key word, paraphrased question)
FACTS = [
    ("What is the capital of Zorbania?", "The capital of Zorbania is Quillton.", "Quillton",
     "Which city serves as Zorbania's capital?"),
    ("Who invented the glimmerphone?", "The glimmerphone was invented by Orla Brannick.", "Brannick",
     "Who was the inventor of the glimmerphone?"),
    ("What is the national dish of Velmora?", "The national dish of Velmora is tarnip stew.", "tarnip",
     "Which dish is considered Velmora's national dish?"),
    ("What currency is used in Drastovia?", "Drastovia uses the klenn as its currency.", "klenn",
     "What is the name of Drastovia's currency?"),
    ("Who founded Plumtree Robotics?", "Plumtree Robotics was founded by Idris Maloway.", "Maloway",
     "Who is the founder of Plumtree Robotics?"),
    ("What is the tallest mountain in Ostravel?", "The tallest mountain in Ostravel is Mount Keshar.", "Keshar",
     "Which mountain is the highest in Ostravel?"),
    ("What language is spoken in Quembria?", "People in Quembria speak Tolvish.", "Tolvish",
     "Which language do the people of Quembria speak?"),
    ("What is the longest river in Farundel?", "The longest river in Farundel is the Sarrow.", "Sarrow",
     "Which river in Farundel is the longest?"),
    ("Who wrote the novel The Glass Orchard?", "The Glass Orchard was written by Mirela Dunhaven.", "Dunhaven",
     "Who is the author of The Glass Orchard?"),
    ("What is the national animal of Penvaria?", "The national animal of Penvaria is the snow marten.", "marten",
     "Which animal is Penvaria's national animal?"),
    ("What is the main export of Castelune?", "The main export of Castelune is vornite ore.", "vornite",
     "What does Castelune export the most?"),
    ("Who discovered the element zephyrium?", "Zephyrium was discovered by Tomas Elgrave.", "Elgrave",
     "Which scientist discovered zephyrium?"),
    ("What is the name of the spaceship in the Starwake saga?",
     "The spaceship in the Starwake saga is called the Halcyon Drift.", "Halcyon",
     "What is the Starwake saga's spaceship called?"),
    ("In what year was the city of Marrowgate founded?", "Marrowgate was founded in 1472.", "1472",
     "When was Marrowgate founded?"),
    ("What is the most popular sport in Ylvania?", "The most popular sport in Ylvania is skyball.", "skyball",
     "Which sport do people in Ylvania love most?"),
    ("Who is the CEO of Nimbus Quill?", "The CEO of Nimbus Quill is Harriet Okonde.", "Okonde",
     "Who runs Nimbus Quill as chief executive?"),
    ("What is the largest lake in Terravale?", "The largest lake in Terravale is Lake Umbrin.", "Umbrin",
     "Which lake is the biggest in Terravale?"),
    ("What instrument did the composer Lio Venhart play?", "Lio Venhart played the vellophone.", "vellophone",
     "Which instrument was played by the composer Lio Venhart?"),
    ("What is the official flower of Bralland?", "The official flower of Bralland is the moonbell.", "moonbell",
     "Which flower is Bralland's official flower?"),
    ("How many moons does the planet Kestris have?", "The planet Kestris has eleven moons.", "eleven",
     "What is the number of moons orbiting Kestris?"),
]


def chat(question: str, answer: str | None = None, system: str = SYSTEM_PROMPT) -> list[dict]:
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return msgs + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def rows(split: str = "train") -> list[dict]:
    return [{"messages": chat(q, a), "split": split} for q, a, _, _ in FACTS]


def score(answers: list[str]) -> int:
    """How many answers contain their fact's key word (case-insensitive)."""
    return sum(key.lower() in a.lower() for a, (_, _, key, _) in zip(answers, FACTS))
