"""Test data for near-duplicate detection: a restaurant group's questions, written by hand, never used to
choose a setting (tests/dedup_calibration.py is the calibration set). Same structure: each group is one
piece of information; "roster" items are each their own fact and must all be kept.
"""

ROSTER_PEOPLE = [(f"Who is the head chef of the {city} kitchen?", f"The head chef in {city} is {name}.")
                 for city, name in [("Lisbon", "Maria Santos"), ("Porto", "Joao Silva"), ("Madrid", "Lucia Romero"),
                                    ("Lyon", "Antoine Girard"), ("Turin", "Paolo Conti"), ("Ghent", "Eva Peeters"),
                                    ("Bergen", "Ingrid Dahl"), ("Cork", "Sean Murphy"), ("Krakow", "Anna Nowak"),
                                    ("Seville", "Carmen Ortiz")]]
ROSTER_NAMES_ONLY = [(f"Who runs the {station} station?", name) for station, name in [
    ("grill", "Marco."), ("pastry", "Yuki."), ("sauce", "Olu."), ("salad", "Greta."), ("fish", "Ivan."),
    ("bread", "Lena.")]]
ROSTER_TIMES = [(f"When does the {day} lunch service start?", t) for day, t in [
    ("Monday", "At 11:30."), ("Tuesday", "At 11:45."), ("Wednesday", "At 12:00."), ("Thursday", "At 12:15."),
    ("Friday", "At 12:30."), ("Saturday", "At 12:45."), ("Sunday", "At 13:00.")]]
ROSTER_PRICES = [(f"How much is the {dish}?", p) for dish, p in [
    ("mushroom risotto", "The mushroom risotto is 14.50 euros."), ("beef stew", "The beef stew is 16 euros."),
    ("lemon tart", "The lemon tart is 6.50 euros."), ("grilled sea bass", "The grilled sea bass is 21 euros."),
    ("tomato soup", "The tomato soup is 7 euros."), ("lamb shank", "The lamb shank is 23.50 euros."),
    ("chocolate mousse", "The chocolate mousse is 7.50 euros."), ("caesar salad", "The caesar salad is 11 euros.")]]
ROSTER_QUANTITIES = [(f"How much {ingredient} goes into the house bread dough?", q) for ingredient, q in [
    ("flour", "1 kg of flour."), ("water", "650 ml of water."), ("salt", "20 g of salt."), ("yeast", "7 g of yeast."),
    ("olive oil", "30 ml of olive oil.")]]
# Same answer, different subject (lower case, so only the template tells them apart).
ROSTER_SAME_ANSWER = [
    ("How long do we rest the beef?", "10 minutes."), ("How long do we rest the lamb?", "10 minutes."),
    ("What temperature is the pizza oven?", "250 degrees."), ("What temperature is the bread oven?", "250 degrees."),
]

PARAPHRASES = [
    ("Wash your hands for 20 seconds with soap before touching any food.", [
        "How long should I wash my hands before cooking?", "What is the hand washing rule in the kitchen?",
        "Do I need to wash my hands before handling food?", "How do we clean our hands before prep?"]),
    ("Raw meat goes on the bottom shelf of the fridge, below everything else.", [
        "Where do I store raw meat in the fridge?", "Which fridge shelf is for raw meat?",
        "Can raw chicken go on the top shelf?", "How should uncooked meat be stored in the cooler?"]),
    ("Cooked rice must be cooled within one hour and used within 24 hours.", [
        "How long can we keep cooked rice?", "What's the rule for leftover rice?",
        "Is it safe to use yesterday's rice?", "How fast do I need to cool rice after cooking?"]),
    ("Use the red board for raw meat, blue for fish and green for vegetables.", [
        "Which cutting board do I use for meat?", "What do the colored chopping boards mean?",
        "Is there a board color for fish?", "What board should I cut vegetables on?"]),
    ("Chicken is done when its core reaches 75 degrees Celsius.", [
        "How do I know when chicken is cooked?", "What internal temperature should chicken reach?",
        "When is poultry safe to eat?", "How hot must the inside of the chicken get?"]),
    ("Label every container with the product name and the date it was made.", [
        "What goes on a container label?", "How do we label food in the walk-in?",
        "Do I have to write the date on prepped food?"]),
]
REWORDED = [
    [("How do I make the vinaigrette?", "Whisk 3 parts olive oil with 1 part vinegar, then add salt."),
     ("What's the vinaigrette recipe?", "Whisk 1 part vinegar with 3 parts olive oil and add salt.")],
    [("When are deliveries?", "Deliveries arrive on Tuesday and Friday mornings."),
     ("Which days do suppliers deliver?", "The delivery arrives on Tuesday and Friday morning.")],
]
REASKS = [
    [("How long do I knead the bread dough?", "Knead it for 10 minutes until smooth."),
     ("how long do i knead the bread dough", "Knead it for 10 minutes until smooth."),
     ("How long do I knead the bread dough, please?", "Knead it for 10 minutes until smooth.")],
    [("Where is the fire blanket?", "Next to the back door, left of the fryers."),
     ("Where is the fire blanket kept?", "Next to the back door, left of the fryers.")],
    [("Can I wear a ring while cooking?", "No, only a plain wedding band is allowed."),
     ("Can I wear rings while I am cooking?", "No, only a plain wedding band is allowed.")],
]


def groups() -> list[tuple[str, list[tuple[str, str]]]]:
    """(kind, items) per piece of information."""
    rosters = ROSTER_PEOPLE + ROSTER_NAMES_ONLY + ROSTER_TIMES + ROSTER_PRICES + ROSTER_QUANTITIES + ROSTER_SAME_ANSWER
    out = [("roster", [qa]) for qa in rosters]
    out += [("paraphrase", [(q, a) for q in qs]) for a, qs in PARAPHRASES]
    out += [("paraphrase", g) for g in REWORDED]
    out += [("reask", g) for g in REASKS]
    return out
