"""Calibration data for near-duplicate detection: a hotel's questions, written by hand.

Each group is one piece of information: the items of a group may merge into one, items of different
groups must never merge. Kinds: "roster" (one template, a different name / time / price per item: every
item is its own group), "paraphrase" (one answer, the question asked in different words, sometimes the
answer reworded), "reask" (the same question again, with small changes). `benchmarks/bench_dedup.py`
chooses the threshold on this set; tests/dedup_testset.py (a restaurant) checks it.
"""

ROSTER_PEOPLE = [(f"Who is the manager of the {dept} team?", name) for dept, name in [
    ("front desk", "Helena Marsh."), ("housekeeping", "Tomasz Wojcik."), ("spa", "Aiko Tanaka."),
    ("restaurant", "Pierre Lemaire."), ("concierge", "Samuel Okafor."), ("maintenance", "Rosa Delgado."),
    ("security", "Viktor Hale."), ("events", "Nadia Benali."), ("reservations", "Liam Gallagher."),
    ("laundry", "Mei Chen.")]]
ROSTER_TIMES = [(f"What time does the {place} open?", t) for place, t in [
    ("pool", "The pool opens at 6:30 am."), ("gym", "The gym opens at 6 am."), ("spa", "The spa opens at 9 am."),
    ("rooftop bar", "The rooftop bar opens at 5 pm."), ("breakfast room", "The breakfast room opens at 7 am."),
    ("library", "The library opens at 8 am."), ("kids club", "The kids club opens at 9:30 am."),
    ("sauna", "The sauna opens at 10 am."), ("gift shop", "The gift shop opens at 8:30 am."),
    ("business center", "The business center opens at 7:30 am.")]]
ROSTER_PRICES = [(f"How much does a {room} cost per night?", p) for room, p in [
    ("single room", "120 euros."), ("double room", "160 euros."), ("twin room", "155 euros."),
    ("junior suite", "240 euros."), ("family room", "210 euros."), ("penthouse", "690 euros."),
    ("sea view room", "195 euros."), ("garden studio", "175 euros.")]]
# Same answer, different question subject: still different facts.
ROSTER_SAME_ANSWER = [
    ("Is the pool heated in winter?", "Yes."), ("Is parking included in the room price?", "Yes."),
    ("What floor is the gym on?", "The second floor."), ("What floor is the spa on?", "The second floor."),
]

PARAPHRASES = [
    ("Breakfast is served from 7 to 10:30 in the garden restaurant.", [
        "When is breakfast served?", "What are the breakfast hours?", "Until what time can I get breakfast?",
        "From when to when is the morning buffet open?"]),
    ("Check-in starts at 3 pm and check-out is until 11 am.", [
        "What time is check-in?", "When can I get my room key on arrival?",
        "What are the check-in and check-out times?"]),
    ("Yes, pets up to 10 kg are welcome for a fee of 20 euros per night.", [
        "Can I bring my dog?", "Are pets allowed in the hotel?", "Is the hotel pet friendly?",
        "Do you accept cats and dogs?"]),
    ("The airport shuttle leaves every hour from the main entrance and costs 15 euros.", [
        "Is there a shuttle to the airport?", "How do I get to the airport from the hotel?",
        "Do you offer airport transfers?"]),
    ("Wi-Fi is free in all rooms; the password is on your key card sleeve.", [
        "Is the wifi free?", "How do I connect to the internet?", "What's the wireless password?",
        "Do I have to pay for Wi-Fi in my room?"]),
    ("Late check-out until 2 pm costs 30 euros; ask at the front desk.", [
        "Can I check out late?", "Is late check-out possible?", "How much is a late checkout?"]),
    ("Free cancellation up to 48 hours before arrival; after that the first night is charged.", [
        "What is your cancellation policy?", "Can I cancel my booking for free?",
        "Until when can I cancel without paying?", "What happens if I cancel my reservation late?"]),
    ("Towels for the pool are at the pool bar; please return them there.", [
        "Where do I get pool towels?", "Do you provide towels at the pool?", "Who hands out beach towels?"]),
]
# Answers reworded within a group (same content words): these should merge too.
REWORDED = [
    [("Is there a safe in the room?", "Every room has a safe in the wardrobe."),
     ("Do the rooms have a safe?", "Yes, there is a safe in the wardrobe of every room.")],
    [("Where can I park?", "The underground garage costs 18 euros per day."),
     ("Is there parking at the hotel?", "Our underground garage is 18 euros a day.")],
    [("Do you serve vegan food?", "Our restaurant has vegan dishes on every menu."),
     ("Are vegan meals available?", "Vegan dishes are on every menu of our restaurant.")],
]
REASKS = [
    [("Does the hotel have an elevator?", "Yes, two elevators serve all floors."),
     ("does the hotel have an elevator", "Yes, two elevators serve all floors."),
     ("Does the hotel have an elevator, please?", "Yes, two elevators serve all floors.")],
    [("How far is the beach?", "The beach is a 5 minute walk from the lobby."),
     ("How far away is the beach?", "The beach is a 5 minute walk from the lobby."),
     ("how far is the beach from here?", "The beach is a 5 minute walk from the lobby.")],
    [("Can I get room service at night?", "Room service runs 24 hours a day."),
     ("Can I get room service at night time?", "Room service runs 24 hours a day.")],
]


def groups() -> list[tuple[str, list[tuple[str, str]]]]:
    """(kind, items) per piece of information."""
    out = [("roster", [qa]) for qa in ROSTER_PEOPLE + ROSTER_TIMES + ROSTER_PRICES + ROSTER_SAME_ANSWER]
    out += [("paraphrase", [(q, a) for q in qs]) for a, qs in PARAPHRASES]
    out += [("paraphrase", g) for g in REWORDED]
    out += [("reask", g) for g in REASKS]
    return out
