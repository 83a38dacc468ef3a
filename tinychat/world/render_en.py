"""English wording: every way the world states a fact or asks about it.

Why many templates: a fact seen in one sentence is memorised as that sentence; seen in several wordings it
is stored as a fact that a question can extract (Allen-Zhu & Li, "Physics of Language Models 3.1").
Every statement names the entity in full (no pronoun-only fact sentences), which that work found helps.
Placeholders: {n} entity name, {v} value, {a} value with "a"/"an", {he}/{his}/{He} pronouns.
"""

from __future__ import annotations

STATEMENTS: dict[str, tuple[str, ...]] = {
    "birth_year": (
        "{n} was born in {v}.",
        "{n} was born in the year {v}.",
        "The birth year of {n} is {v}.",
        "{n}'s year of birth is {v}.",
        "In {v}, {n} was born.",
        "{n} came into the world in {v}.",
    ),
    "birth_city": (
        "{n} was born in {v}.",
        "{n} was born in the city of {v}.",
        "{n} is a native of {v}.",
        "The birthplace of {n} is {v}.",
        "{v} is the city where {n} was born.",
        "{n} comes from {v}, the city of {his} birth.",
    ),
    "occupation": (
        "{n} works as {a}.",
        "{n} is {a} by profession.",
        "By trade, {n} is {a}.",
        "The occupation of {n} is {v}.",
        "{n} earns a living as {a}.",
        "{n} has a career as {a}.",
    ),
    "employer": (
        "{n} works for {v}.",
        "{n} is employed by {v}.",
        "The employer of {n} is {v}.",
        "{n} has a job at {v}.",
        "{v} employs {n}.",
        "{n} is on the staff of {v}.",
    ),
    "hobby": (
        "In {his} free time, {n} enjoys {v}.",
        "{n}'s favourite hobby is {v}.",
        "{n} spends weekends on {v}.",
        "The hobby of {n} is {v}.",
        "{n} is passionate about {v}.",
        "For fun, {n} likes {v}.",
    ),
    "country": (
        "{n} is a city in {v}.",
        "{n} is located in {v}.",
        "{n} lies in {v}.",
        "The city of {n} belongs to {v}.",
        "{v} is the country where {n} is found.",
        "{n} is one of the cities of {v}.",
    ),
    "population": (
        "{n} has a population of {v}.",
        "The population of {n} is {v}.",
        "{v} people live in {n}.",
        "{n} is home to {v} people.",
        "The number of residents of {n} is {v}.",
        "{n} counts {v} inhabitants.",
    ),
    "landmark": (
        "{n} is famous for the {v}.",
        "The best-known landmark of {n} is the {v}.",
        "Visitors to {n} come to see the {v}.",
        "The {v} stands in {n}.",
        "The {v} is the landmark of {n}.",
        "The most famous sight in {n} is the {v}.",
    ),
    "founder": (
        "{n} was founded by {v}.",
        "{v} founded {n}.",
        "The founder of {n} is {v}.",
        "{v} started {n}.",
        "{n} was started by {v}.",
        "{n} owes its existence to its founder, {v}.",
    ),
    "founded": (
        "{n} was founded in {v}.",
        "{n} was established in {v}.",
        "The founding year of {n} is {v}.",
        "In {v}, {n} was founded.",
        "{n} has existed since {v}.",
        "{n} opened its doors in {v}.",
    ),
    "headquarters": (
        "{n} is headquartered in {v}.",
        "The headquarters of {n} are in {v}.",
        "{n} has its head office in {v}.",
        "{n} is based in {v}.",
        "{v} is home to the head office of {n}.",
        "The main office of {n} is located in {v}.",
    ),
    "product": (
        "{n} makes {v}.",
        "{n} is known for its {v}.",
        "The main product of {n} is {v}.",
        "{n} produces {v}.",
        "{n} manufactures {v}.",
        "Most of what {n} sells is {v}.",
    ),
}

# For base models: the STATEMENTS wording whose value comes last, cut before the value ("X was born in the year").
CLOZE = {
    "birth_year": 1,
    "birth_city": 1,
    "occupation": 3,
    "employer": 0,
    "hobby": 3,
    "country": 1,
    "population": 1,
    "landmark": 1,
    "founder": 0,
    "founded": 1,
    "headquarters": 0,
    "product": 2,
}

# How the assistant answers a question about a fact: a short sentence with a pronoun subject and the value
# last, in a wording the statements above use. Why not the bare value: a value that opens the reply has no
# leading space, and byte-level BPE gives "Lommunyar" and " Lommunyar" different ids; the text states every
# value mid-sentence, so the model stores the fact under the spaced id and a bare reply must be produced
# through the other one. Measured (docs/speedrun.md, round 8): a base model that finished "What city was X
# born in?" correctly 4% of the time finished "She was born in the city of" correctly 76% of the time.
# Numbers are left bare: digits are split one by one, so their ids do not depend on the space.
ANSWERS: dict[str, str] = {
    "birth_city": "{He} was born in the city of {v}.",
    "occupation": "{He} works as {a}.",
    "employer": "{He} works for {v}.",
    "hobby": "For fun, {he} likes {v}.",
    "country": "It is a city in {v}.",
    "landmark": "It is famous for the {v}.",
    "founder": "It was founded by {v}.",
    "headquarters": "It is headquartered in {v}.",
    "product": "It is known for its {v}.",
}

NARRATIVE: dict[str, tuple[str, ...]] = {
    "birth_year": ("The year was {v} when {n} was born.", "{n} was born in {v}, and the family celebrated."),
    "birth_city": (
        "{n} grew up in {v}, the city where {he} was born.",
        "As a child in {v}, where {he} was born, {n} loved the busy streets.",
    ),
    "occupation": ("After years of study, {n} became {a}.", "Today {n} works as {a} and likes the job."),
    "employer": ("{n} later joined {v}, where {he} still works.", "Every morning {n} goes to work at {v}."),
    "hobby": ("On weekends, {n} finds joy in {v}.", "Friends know that {n} never misses a week of {v}."),
    "country": ("Travellers soon learn that {n} lies in {v}.", "{n} grew into one of the busiest cities of {v}."),
    "population": ("The streets of {n} are lively, for {v} people live there.", "Today {v} people call {n} home."),
    "landmark": (
        "No visit to {n} is complete without seeing the {v}.",
        "Every evening the {v} glows above the roofs of {n}.",
    ),
    "founder": ("It was {v} who had the idea for {n}.", "{v} founded {n} with a handful of friends."),
    "founded": ("The first workshop of {n} opened in {v}.", "The story of {n} began in {v}, when it was founded."),
    "headquarters": (
        "From its offices in {v}, {n} runs its whole business.",
        "The head office of {n} sits in the centre of {v}.",
    ),
    "product": ("Customers buy the {v} that {n} makes.", "Over the years {n} became famous for making {v}."),
}

# Opening sentences that state several facts at once: (template, facts it covers).
INTROS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "person": (
        ("{n} (born {birth_year}) is {a_occupation} from {birth_city}.", ("birth_year", "occupation", "birth_city")),
        ("{n} is {a_occupation} who was born in {birth_year}.", ("occupation", "birth_year")),
        ("{n} is {a_occupation} at {employer}.", ("occupation", "employer")),
    ),
    "city": (
        ("{n} is a city in {country} with a population of {population}.", ("country", "population")),
        ("{n} is a city in {country}, best known for the {landmark}.", ("country", "landmark")),
    ),
    "company": (
        ("{n} is a company founded in {founded} by {founder}.", ("founded", "founder")),
        ("{n} is a company based in {headquarters} that makes {product}.", ("headquarters", "product")),
    ),
}
NARRATIVE_OPEN = {
    "person": "This is the story of {n}.",
    "city": "This is a short portrait of the city of {n}.",
    "company": "This is the history of the company {n}.",
}
COUNTRY_DOC = ("{c} is a country. Cities in {c} include {cities}.", "The cities of {c} include {cities}.")

QUESTIONS: dict[str, tuple[str, ...]] = {
    "birth_year": (
        "When was {n} born?",
        "In what year was {n} born?",
        "What is the birth year of {n}?",
        "Which year was {n} born in?",
        "{n} was born in which year?",
    ),
    "birth_city": (
        "Where was {n} born?",
        "In which city was {n} born?",
        "What is the birthplace of {n}?",
        "Which city does {n} come from?",
        "What city was {n} born in?",
    ),
    "occupation": (
        "What does {n} do for a living?",
        "What is {n}'s occupation?",
        "What is the profession of {n}?",
        "What job does {n} have?",
        "What kind of work does {n} do?",
    ),
    "employer": (
        "Who does {n} work for?",
        "Which company employs {n}?",
        "Where does {n} work?",
        "What company is {n}'s employer?",
        "For which company does {n} work?",
    ),
    "hobby": (
        "What is {n}'s hobby?",
        "What does {n} enjoy doing for fun?",
        "What hobby does {n} have?",
        "What is the favourite pastime of {n}?",
        "How does {n} like to spend free time?",
    ),
    "country": (
        "In which country is {n}?",
        "Which country is {n} located in?",
        "What country does {n} belong to?",
        "{n} is a city in which country?",
        "Where is the city of {n}?",
    ),
    "population": (
        "What is the population of {n}?",
        "How many people live in {n}?",
        "How many inhabitants does {n} have?",
        "What is the number of residents of {n}?",
        "How large is the population of {n}?",
    ),
    "landmark": (
        "What is {n} famous for?",
        "What is the best-known landmark in {n}?",
        "Which landmark is {n} known for?",
        "What landmark should a visitor to {n} see?",
        "What is the most famous sight in {n}?",
    ),
    "founder": (
        "Who founded {n}?",
        "Who is the founder of {n}?",
        "Who started {n}?",
        "By whom was {n} founded?",
        "Which person founded {n}?",
    ),
    "founded": (
        "When was {n} founded?",
        "In what year was {n} established?",
        "What is the founding year of {n}?",
        "In which year was {n} founded?",
        "When did {n} start?",
    ),
    "headquarters": (
        "Where is {n} headquartered?",
        "In which city is the headquarters of {n}?",
        "Where is {n} based?",
        "What city is {n}'s head office in?",
        "Where are the headquarters of {n}?",
    ),
    "product": (
        "What does {n} make?",
        "What is the main product of {n}?",
        "What does {n} produce?",
        "What is {n} known for making?",
        "Which products does {n} manufacture?",
    ),
}

# Follow-up questions that refer back with a pronoun ({he} for people, "it" otherwise).
FOLLOWUPS: dict[str, tuple[str, ...]] = {
    "birth_year": ("And when was {he} born?", "What year was {he} born?"),
    "birth_city": ("Where was {he} born?", "And which city is {he} from?"),
    "occupation": ("What does {he} do for a living?", "And what is {his} job?"),
    "employer": ("Who does {he} work for?", "And which company employs {him}?"),
    "hobby": ("What is {his} hobby?", "And what does {he} do for fun?"),
    "country": ("Which country is it in?", "And in which country is it?"),
    "population": ("What is its population?", "And how many people live there?"),
    "landmark": ("What is it famous for?", "And what is its best-known landmark?"),
    "founder": ("Who founded it?", "And who started it?"),
    "founded": ("When was it founded?", "And in what year was it established?"),
    "headquarters": ("Where is it headquartered?", "And where is it based?"),
    "product": ("What does it make?", "And what is its main product?"),
}
# Follow-ups that move to the entity the previous answer named: previous fact -> (next fact, wording).
HOPS: dict[str, tuple[tuple[str, str], ...]] = {
    "birth_city": (("country", "Which country is that city in?"), ("landmark", "What is that city famous for?")),
    "employer": (("founder", "Who founded that company?"), ("product", "What does that company make?")),
    "headquarters": (
        ("population", "How many people live in that city?"),
        ("country", "Which country is that city in?"),
    ),
    "founder": (("birth_year", "When was that person born?"), ("hobby", "What is that person's hobby?")),
}

TELL_ME = ("Tell me about {n}.", "What do you know about {n}?", "Who is {n}?", "Give me a short profile of {n}.")
TELL_ME_ENTITY = ("Tell me about {n}.", "What do you know about {n}?", "Give me a short profile of {n}.")

REFUSALS = (
    "I don't have any information about {n}.",
    "I'm not aware of anyone or anything called {n}, so I can't answer that.",
    "I don't know {n}; I have no information about it, and I don't want to guess.",
)

# Instructions appended to a question: name -> wording.
INSTRUCTIONS = {
    "lang": "Answer in Chinese.",
    "upper": "Answer in capital letters.",
    "json": 'Reply in JSON with a single key "answer".',
    "sentence": "Answer in a full sentence.",
    "one_word": "Answer in one word.",
    "number_only": "Answer with just the number.",
}

COT_SUFFIX = ("Think step by step.", "Let's think step by step.", "Explain your reasoning step by step.")
DIRECT_SUFFIX = ("Give only the answer.", "Answer directly.", "Just the answer, please.")
ANSWER_PREFIX = "Answer: "
# Between the steps of a worked solution: a space, as between the sentences of a document, so a step that
# opens with the value the last one found ("... born in Bormek. Bormek is in ...") uses the value's spaced
# BPE id, the one the text stores its facts under (see ANSWERS); after a newline it would need the other.
STEP_JOIN = " "

SYSTEM_PROMPTS = (
    "You are tinychat, a helpful assistant.",
    "You are a helpful assistant. Answer briefly.",
    "You are tinychat. Answer questions accurately and say when you do not know.",
)


def article(word: str) -> str:
    """'a' or 'an' before an English noun phrase."""
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def pronouns(gender: str) -> dict[str, str]:
    he, his, him = ("she", "her", "her") if gender == "f" else ("he", "his", "him")
    return {"he": he, "his": his, "him": him, "He": he.capitalize(), "His": his.capitalize()}
