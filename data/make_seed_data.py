"""Writes the demo's seed data: short structured-answer tasks a 135M chat model can learn in minutes.

Four task families, each with a one- or two-line answer in a fixed format:
  extract   - "Extract the person's name and city from: '...'"  -> "name: Priya Nair\ncity: Porto"
  sentiment - "Classify the sentiment of this review ..."          -> "sentiment: negative"
  date      - "Rewrite the date 'March 5, 2021' in ISO 8601 ..."   -> "2021-03-05"
  fruits    - "List the fruits mentioned in: '...'"                -> "fruits: apple, pear"
The base SmolLM2-135M-Instruct answers these in rambling sentences; the format and the copying are learnable.

The preference data teaches something the SFT data does not: a style. About three quarters of the SFT answers
for sentiment and dates are written as a sentence ("The sentiment of this review is negative.", "The date in ISO
8601 format is 2021-03-05."), the rest in the short form, as if two annotators had written them. For those two
tasks every preference pair prefers the short form over the sentence with the same content, and the eval
references use the short form. So the SFT-only model answers held-out prompts in the sentence form, and what
preference tuning adds shows in a check that needs no reward model: exact match against the references, tuned vs
SFT only (evaluate's `exact_match_gain_vs_sft`). With half the answers as sentences, the SFT model already chose
the short form on every held-out prompt and preference tuning had nothing to add (docs/experiments/).
The eval set uses people, cities and fruits that never occur in the training files, so a gain there is
generalisation, not memory. A handful of defects (duplicates, an empty answer, a broken line) are planted
in sft.jsonl on purpose so that the demo's curate stage has something to count.

Run: python data/make_seed_data.py   (deterministic; rewrites data/sft.jsonl, data/pairs.jsonl, data/eval.jsonl)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
FIRST = ["Priya", "Tomas", "Aiko", "Lena", "Omar", "Sofia", "Mateo", "Hana", "Diego", "Ingrid", "Kwame",
         "Yara", "Felix", "Noor", "Ravi", "Elena", "Jonas", "Mei", "Lucas", "Amara", "Viktor", "Chloe"]
LAST = ["Nair", "Berg", "Tanaka", "Kovac", "Haddad", "Rossi", "Silva", "Park", "Moreno", "Larsen", "Mensah",
        "Farouk", "Weber", "Qureshi", "Iyer", "Popescu", "Lind", "Chen", "Dubois", "Okafor", "Novak", "Martin"]
CITY = ["Porto", "Lyon", "Osaka", "Graz", "Beirut", "Turin", "Recife", "Busan", "Seville", "Bergen", "Accra",
        "Cairo", "Leipzig", "Lahore", "Pune", "Cluj", "Malmo", "Xiamen", "Ghent", "Lagos", "Brno", "Nantes"]
# Held out for eval only.
EVAL_FIRST = ["Zoran", "Ines", "Bilal", "Greta", "Tariq", "Maja", "Kenji", "Esther"]
EVAL_LAST = ["Hughes", "Varga", "Sato", "Keller", "Mahdi", "Jansen", "Costa", "Adler"]
EVAL_CITY = ["Dublin", "Krakow", "Quito", "Hanoi", "Tampere", "Perth", "Bilbao", "Oslo"]

EXTRACT = [
    "Last spring, {n} moved to {c} to open a bakery.",
    "{n} flew to {c} for a conference on river ecology.",
    "After ten years abroad, {n} finally settled in {c}.",
    "The award went to {n}, a teacher from {c}.",
    "{n} runs a small bookshop near the station in {c}.",
    "We met {n} at a concert in {c} last night.",
]
REVIEWS = {
    "positive": ["The staff were warm and the {x} was perfect.", "I loved the {x}; I will come back soon.",
                 "Great value, and the {x} exceeded my hopes.", "Fast delivery and the {x} works beautifully."],
    "negative": ["The {x} broke after two days.", "Cold food, rude staff, and the {x} was dirty.",
                 "I waited an hour and the {x} never arrived.", "The {x} was overpriced and disappointing."],
    "neutral": ["The {x} arrived on Tuesday.", "The {x} is the same as the one I had before.",
                "I bought the {x} in the blue colour.", "The {x} comes in a cardboard box."],
}
THINGS = ["soup", "room", "blender", "jacket", "laptop", "pizza", "chair", "train ride", "lamp", "haircut"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
FRUITS = ["apple", "pear", "banana", "cherry", "mango", "plum", "grape", "lemon", "peach", "kiwi"]
EVAL_FRUITS = ["papaya", "lychee", "apricot", "fig"]
# The sentence form of the two "styled" tasks' short answers (in SFT data about half the time; always rejected).
VERBOSE = {"sentiment": "The sentiment of this review is {}.", "date": "The date in ISO 8601 format is {}."}
VERBOSE_SHARE = 0.75  # of the styled tasks' SFT answers
FRUIT_SENT = ["At the market I bought {a} and {b}.", "The smoothie had {a}, {b} and a little honey.",
              "She packed {a} for lunch and {b} for later.", "Our garden grows {a} and {b} every summer."]


def extract(rng: random.Random, first: list[str], last: list[str], city: list[str]) -> tuple[str, str, str]:
    n, c = f"{rng.choice(first)} {rng.choice(last)}", rng.choice(city)
    prompt = f"Extract the person's name and city from: '{rng.choice(EXTRACT).format(n=n, c=c)}'"
    good = f"name: {n}\ncity: {c}"
    bad = rng.choice([f"Sure! The person mentioned is {n}, and the city is {c}.",
                      f"name: {c}\ncity: {n}", f"The sentence talks about someone who lives in {c}."])
    return prompt, good, bad


def sentiment(rng: random.Random) -> tuple[str, str, str]:
    label = rng.choice(list(REVIEWS))
    review = rng.choice(REVIEWS[label]).format(x=rng.choice(THINGS))
    prompt = f"Classify the sentiment of this review as positive, negative or neutral: '{review}'"
    wrong = rng.choice([lab for lab in REVIEWS if lab != label])
    bad = rng.choice([f"sentiment: {wrong}", f"I think this review is mostly {label}, but it is hard to say.",
                      "The review describes an experience with a product."])
    return prompt, f"sentiment: {label}", bad


def date(rng: random.Random) -> tuple[str, str, str]:
    y, m, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    prompt = f"Rewrite the date '{MONTHS[m - 1]} {d}, {y}' in ISO 8601 format (YYYY-MM-DD)."
    bad = rng.choice([f"{d:02d}-{m:02d}-{y}", f"The date in ISO format is {y}/{m}/{d}.", f"{y}-{d:02d}-{m:02d}"])
    return prompt, f"{y}-{m:02d}-{d:02d}", bad


def fruits(rng: random.Random, pool: list[str]) -> tuple[str, str, str]:
    a, b = rng.sample(pool, 2)
    prompt = f"List the fruits mentioned in: '{rng.choice(FRUIT_SENT).format(a=a + 's', b=b + 's')}'"
    bad = rng.choice([f"The fruits are {a}s and {b}s, which are healthy.", f"fruits: {a}", "fruits: honey"])
    return prompt, f"fruits: {a}, {b}", bad


def verbose(kind: str, answer: str) -> str:
    """The sentence form of a styled task's short answer ("sentiment: negative" -> "The sentiment of ... negative.")."""
    return VERBOSE[kind].format(answer.removeprefix("sentiment: "))


def make(rng: random.Random, n: int, held_out: bool) -> list[tuple[str, str, str, str]]:
    """n rows (kind, prompt, short answer, a worse answer), the four kinds in turn, no prompt twice."""
    out, seen = [], set()
    while len(out) < n:
        kind = ["extract", "sentiment", "date", "fruits"][len(out) % 4]
        if kind == "extract":
            row = extract(rng, *(([EVAL_FIRST, EVAL_LAST, EVAL_CITY]) if held_out else ([FIRST, LAST, CITY])))
        elif kind == "sentiment":
            row = sentiment(rng)
        elif kind == "date":
            row = date(rng)
        else:
            row = fruits(rng, EVAL_FRUITS if held_out else FRUITS)  # held-out fruits never occur in training
        if row[0] not in seen:
            seen.add(row[0])
            out.append((kind, *row))
    return out


def main() -> None:
    rng = random.Random(20261123)
    sft = make(rng, 320, held_out=False)
    eval_rows = make(random.Random(7), 48, held_out=True)
    eval_prompts = {p for _, p, _, _ in eval_rows}
    sft = [r for r in sft if r[1] not in eval_prompts]
    pairs = make(random.Random(99), 400, held_out=False)
    sft_prompts = {p for _, p, _, _ in sft}
    pairs = [r for r in pairs if r[1] not in eval_prompts and r[1] not in sft_prompts][:240]
    # The style: some SFT answers of the styled tasks become sentences; their pairs reject exactly that sentence.
    style = random.Random(5)
    sft = [(k, p, verbose(k, g) if k in VERBOSE and style.random() < VERBOSE_SHARE else g, b) for k, p, g, b in sft]
    pairs = [(k, p, g, verbose(k, g) if k in VERBOSE else b) for k, p, g, b in pairs]

    lines = [json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": g}]})
             for _, p, g, _ in sft]
    # Planted defects, so the demo's curate stage has something to count (see its data card):
    lines += lines[:4]  # 4 exact duplicates
    lines.append(json.dumps({"messages": [{"role": "user", "content": "Say something."},
                                          {"role": "assistant", "content": ""}]}))  # empty answer
    lines.append('{"messages": [{"role": "user", "content": "truncated line')  # broken JSON
    (HERE / "sft.jsonl").write_text("\n".join(lines) + "\n")
    (HERE / "pairs.jsonl").write_text("".join(
        json.dumps({"prompt": p, "chosen": g, "rejected": b}) + "\n" for _, p, g, b in pairs))
    (HERE / "eval.jsonl").write_text("".join(
        json.dumps({"prompt": p, "reference": g}) + "\n" for _, p, g, _ in eval_rows))
    styled = sum(k in VERBOSE for k, *_ in sft)
    print(f"sft {len(lines)} lines ({sum(g.startswith('The ') for *_, g, _ in sft)} of {styled} styled answers "
          f"as sentences), pairs {len(pairs)} ({sum(k in VERBOSE for k, *_ in pairs)} short vs sentence), "
          f"eval {len(eval_rows)}")


if __name__ == "__main__":
    main()
