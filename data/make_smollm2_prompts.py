"""Write data/smollm2_prompts.jsonl: the project's own instruction prompts for the real-LM task.

Instructions come from templates filled with small word lists and fact tables, seeded, so the file is
reproducible: ``python data/make_smollm2_prompts.py``. A reference response is written only where the
answer is well defined (arithmetic, conversions, facts from the table, classification of a given text,
mechanical rewrites); open-ended tasks (explain, brainstorm, summarise) have an empty response.
"""

from __future__ import annotations

import json
import os
import random

SEED = 0
OUT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2_prompts.jsonl")

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Australia": "Canberra",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Egypt": "Cairo", "Kenya": "Nairobi", "Mexico": "Mexico City",
    "Russia": "Moscow", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Greece": "Athens", "Turkey": "Ankara", "Ireland": "Dublin", "Austria": "Vienna", "Peru": "Lima",
    "Chile": "Santiago", "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul", "Netherlands": "Amsterdam",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "early": "late", "light": "dark",
    "open": "closed", "full": "empty", "strong": "weak", "young": "old", "rich": "poor", "loud": "quiet",
    "up": "down", "inside": "outside", "win": "lose", "buy": "sell", "push": "pull", "begin": "end",
}
PLURALS = {
    "child": "children", "mouse": "mice", "tooth": "teeth", "foot": "feet", "person": "people", "leaf": "leaves",
    "knife": "knives", "city": "cities", "box": "boxes", "cactus": "cacti", "sheep": "sheep", "goose": "geese",
    "woman": "women", "potato": "potatoes", "wolf": "wolves", "bus": "buses",
}
FRUITS = ["apple", "banana", "cherry", "mango", "pear", "grape", "orange", "plum", "peach", "kiwi"]
VEGETABLES = ["carrot", "potato", "onion", "spinach", "broccoli", "cabbage", "lettuce", "leek", "radish", "celery"]
MAMMALS = ["dog", "whale", "bat", "horse", "elephant", "dolphin", "cat", "rabbit"]
BIRDS = ["eagle", "sparrow", "penguin", "owl", "parrot", "swan", "robin", "ostrich"]
CONCEPTS = [
    "photosynthesis", "gravity", "inflation", "a black hole", "the water cycle", "machine learning", "a vaccine",
    "democracy", "compound interest", "an ecosystem", "the internet", "a volcano", "evolution", "electricity",
    "a recession", "the greenhouse effect", "a prime number", "recycling", "a budget", "an algorithm",
    "the immune system", "a solar eclipse", "supply and demand", "a rainbow", "encryption", "a tsunami",
    "the stock market", "renewable energy", "a library catalogue", "time zones",
]
AUDIENCES = ["a ten-year-old", "a beginner", "a busy manager", "a high school student"]
LIST_TOPICS = [
    "healthy breakfast foods", "ways to save water at home", "tips for a job interview", "indoor hobbies",
    "things to pack for a beach trip", "ways to reduce stress", "board games for a family evening",
    "questions to ask a new doctor", "safety rules for riding a bicycle", "uses for an empty glass jar",
    "benefits of regular exercise", "ways to learn a new language", "kitchen tools every cook needs",
    "habits that improve sleep", "reasons to visit a museum", "ways to be kind to a neighbour",
]
BRAINSTORM = [
    "a name for a small bakery", "a theme for a school science fair", "a birthday gift for a grandmother who loves gardening",
    "a slogan for a recycling campaign", "an activity for a rainy Saturday", "a title for a short story about a lost key",
    "a weekend project with an old bicycle", "a team name for a quiz night", "a dish to bring to a picnic",
    "a way to celebrate a colleague's retirement", "a club to start at a community centre", "a podcast topic about local history",
]
SENTENCES = [
    "The cat sat quietly by the window.", "We walked to the market on Sunday morning.",
    "She finished her homework before dinner.", "The train leaves the station at noon.",
    "My brother plays the guitar every evening.", "The river flows past the old mill.",
    "They planted tomatoes in the garden.", "A strong wind blew across the field.",
    "The children laughed at the clown.", "He reads the newspaper with his coffee.",
    "Our team won the final match.", "The baker opens the shop at six.",
]
PAST_TENSE = {
    "I walk to school every day.": "I walked to school every day.",
    "She eats an apple after lunch.": "She ate an apple after lunch.",
    "They play football in the park.": "They played football in the park.",
    "We write letters to our friends.": "We wrote letters to our friends.",
    "He drives to work.": "He drove to work.",
    "The dog runs across the yard.": "The dog ran across the yard.",
    "I buy bread at the corner shop.": "I bought bread at the corner shop.",
    "She sings in the choir.": "She sang in the choir.",
}
POSITIVE = ["wonderful", "excellent", "delightful", "fantastic", "reliable", "friendly", "comfortable"]
NEGATIVE = ["terrible", "disappointing", "awful", "broken", "rude", "uncomfortable", "useless"]
PRODUCTS = ["hotel", "restaurant", "phone", "pair of shoes", "laptop", "coffee shop", "hair dryer", "bookstore"]
PARAGRAPHS = [
    ("The town library reopened last week after a year of renovation. The building now has a larger children's "
     "section, a quiet study room and solar panels on the roof. Visitors praised the bright reading areas, "
     "although some complained that parking is still limited."),
    ("Honeybees communicate the location of flowers through a movement called the waggle dance. The angle of the "
     "dance shows the direction relative to the sun, and its length tells other bees how far to fly. Scientists "
     "have decoded these dances to map where colonies forage."),
    ("The company reported higher sales in the third quarter, mainly because of strong demand for its budget "
     "laptops. Costs also rose, as shipping prices increased. The managers expect growth to slow next year and "
     "plan to invest in customer service."),
    ("Regular walking has many health benefits. It strengthens the heart, helps control weight and improves mood. "
     "Experts suggest thirty minutes a day, which can be split into shorter walks. Good shoes and a safe route "
     "make the habit easier to keep."),
    ("The city council voted to turn an empty parking lot into a community garden. Residents will be able to rent "
     "small plots for a low yearly fee. Volunteers will teach free classes on composting and growing vegetables."),
    ("Octopuses are known for their intelligence. They can open jars, escape from tanks and change colour in a "
     "fraction of a second to hide from predators. Each of their eight arms contains many nerve cells, which lets "
     "the arms react on their own."),
    ("A new bus line connects the university with the train station every fifteen minutes. Students can ride for "
     "free with their card. The service runs from six in the morning until midnight on weekdays."),
    ("Marie baked bread every Saturday for twenty years. She used flour from a local mill and let the dough rise "
     "overnight. Her neighbours often lined up outside her door, and in the end she opened a small bakery."),
]
PEOPLE = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jade", "Kofi", "Lena"]
ITEMS = ["apples", "books", "marbles", "pencils", "stickers", "cookies", "stamps", "shells"]


def add(examples: list[dict], instruction: str, context: str = "", response: str = "") -> None:
    examples.append({"instruction": instruction, "context": context, "response": response})


def build(rng: random.Random) -> list[dict]:
    examples: list[dict] = []
    for country, capital in CAPITALS.items():
        add(examples, f"What is the capital of {country}?", response=f"The capital of {country} is {capital}.")
    for _ in range(30):
        name, item = rng.choice(PEOPLE), rng.choice(ITEMS)
        start, extra = rng.randint(3, 40), rng.randint(2, 25)
        add(examples, f"{name} has {start} {item} and gets {extra} more. How many {item} does {name} have now?",
            response=f"{name} has {start} + {extra} = {start + extra} {item}.")
    for _ in range(25):
        name, item = rng.choice(PEOPLE), rng.choice(ITEMS)
        start = rng.randint(20, 90)
        given = rng.randint(1, start - 1)
        add(examples, f"{name} had {start} {item} and gave away {given}. How many {item} are left?",
            response=f"{start} - {given} = {start - given}, so {start - given} {item} are left.")
    for _ in range(25):
        boxes, per_box, item = rng.randint(2, 12), rng.randint(3, 15), rng.choice(ITEMS)
        add(examples, f"There are {boxes} boxes with {per_box} {item} in each box. How many {item} are there in total?",
            response=f"{boxes} x {per_box} = {boxes * per_box} {item}.")
    for _ in range(15):
        price, count = rng.randint(2, 9), rng.randint(2, 8)
        paid = price * count + rng.choice([0, 5, 10, 20])
        add(examples, f"A notebook costs {price} dollars. Sam buys {count} notebooks and pays with {paid} dollars. "
            "How much change does Sam get?",
            response=f"The notebooks cost {price} x {count} = {price * count} dollars, so the change is "
            f"{paid} - {price * count} = {paid - price * count} dollars.")
    conversions = [
        ("kilometres", "metres", 1000), ("hours", "minutes", 60), ("kilograms", "grams", 1000),
        ("minutes", "seconds", 60), ("metres", "centimetres", 100), ("days", "hours", 24), ("litres", "millilitres", 1000),
    ]
    for _ in range(30):
        big, small, factor = rng.choice(conversions)
        amount = rng.randint(2, 15)
        add(examples, f"Convert {amount} {big} to {small}.", response=f"{amount} {big} is {amount * factor} {small}.")
    for _ in range(15):
        numbers = rng.sample(range(1, 100), rng.randint(4, 7))
        add(examples, "Sort the following numbers from smallest to largest.", ", ".join(map(str, numbers)),
            ", ".join(map(str, sorted(numbers))))
    for word, opposite in OPPOSITES.items():
        add(examples, f"What is the opposite of the word \"{word}\"?", response=f"The opposite of \"{word}\" is \"{opposite}\".")
    for word, plural in PLURALS.items():
        add(examples, f"What is the plural of \"{word}\"?", response=f"The plural of \"{word}\" is \"{plural}\".")
    for _ in range(15):
        words = rng.sample(FRUITS, 3) + rng.sample(VEGETABLES, 3)
        rng.shuffle(words)
        add(examples, "Classify each of the following as a fruit or a vegetable.", ", ".join(words),
            "\n".join(f"{w}: {'fruit' if w in FRUITS else 'vegetable'}" for w in words))
    for _ in range(10):
        animals = rng.sample(MAMMALS, 3) + rng.sample(BIRDS, 3)
        rng.shuffle(animals)
        add(examples, "Which of these animals are birds and which are mammals?", ", ".join(animals),
            "\n".join(f"{a}: {'bird' if a in BIRDS else 'mammal'}" for a in animals))
    for _ in range(30):
        product = rng.choice(PRODUCTS)
        if rng.random() < 0.5:
            review, label = f"The {product} was {rng.choice(POSITIVE)} and I would happily recommend it.", "Positive"
        else:
            review, label = f"The {product} was {rng.choice(NEGATIVE)} and I would not go back.", "Negative"
        add(examples, "Classify the sentiment of this review as Positive or Negative.", review, label)
    for sentence in SENTENCES:
        add(examples, "Rewrite the following sentence in all capital letters.", sentence, sentence.upper())
        add(examples, "How many words are in the following sentence?", sentence, str(len(sentence.split())))
    for present, past in PAST_TENSE.items():
        add(examples, "Rewrite this sentence in the past tense.", present, past)
    for concept in CONCEPTS:
        add(examples, f"Explain {concept} to {rng.choice(AUDIENCES)}.")
    for concept in rng.sample(CONCEPTS, 12):
        add(examples, f"Why is {concept} important? Answer in two or three sentences.")
    for topic in LIST_TOPICS:
        add(examples, f"List {rng.choice(['three', 'four', 'five'])} {topic}.")
    for idea in BRAINSTORM:
        add(examples, f"Brainstorm ideas for {idea}.")
    for paragraph in PARAGRAPHS:
        add(examples, "Summarise the following text in one sentence.", paragraph)
        add(examples, "Write a short title for this passage.", paragraph)
        add(examples, "What is the main idea of this passage?", paragraph)
    for sentence in SENTENCES[:8]:
        add(examples, "Rewrite the following sentence so that it sounds more formal.", sentence)
    # Random fills can repeat a prompt; a duplicate could sit in both train and test.
    unique = list({(e["instruction"], e["context"]): e for e in examples}.values())
    rng.shuffle(unique)
    return unique


def main() -> None:
    examples = build(random.Random(SEED))
    with open(OUT_PATH, "w", encoding="utf-8") as file:
        for example in examples:
            file.write(json.dumps(example, ensure_ascii=False) + "\n")
    print(f"wrote {len(examples)} examples to {OUT_PATH}")


if __name__ == "__main__":
    main()
