"""Make the embedded quickstart assets: a tiny Llama model directory and a SQuAD-format reading set.

    uv run python assets/make_assets.py [--out DIR]

Writes, under DIR (default: the folder holding this script):
  squad-tiny/   train.jsonl, validation.jsonl and a dataset card, in rajpurkar/squad's exact schema
  tiny-llama/   a Hugging Face model directory: a byte-level BPE tokenizer trained here on squad-tiny,
                with Llama-3 special tokens and a Llama-3 style chat template, and random fp32 weights

Everything is drawn from seeded RNGs and written in a fixed order, so a run reproduces the committed
files byte for byte (with the locked versions of torch, transformers and tokenizers).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

SEED = 20250101
N_TRAIN_PEOPLE = 1000  # 3 questions each -> 3000 train rows
N_VALIDATION_PEOPLE = 100  # -> 300 validation rows
QUESTIONS_PER_CONTEXT = 3

VOCAB_SIZE = 2048  # tokenizer size == model embedding rows; a multiple of 64
MODEL_MAX_LENGTH = 2048

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
# Their ids follow the learned BPE vocabulary, in this order, as in Llama-3; reserved tokens fill the rest.
SPECIAL_TOKENS = [BOS, EOS, PAD, START_HEADER, END_HEADER, EOT]

# Llama-3's pre-tokenizer split: contractions, letter runs, digit groups of at most three, punctuation,
# newlines, spaces. Digit groups keep years (1923 -> 192|3) from becoming one opaque token.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama-3 layout. Contents are rendered verbatim and messages strictly in order, so the rendering of
# a conversation's first k messages is a prefix of the rendering of all of them (the loss mask relies
# on it). Tools go into the first system block, or a new one; tool calls follow the content as JSON.
CHAT_TEMPLATE = """\
{{- bos_token }}
{%- if tools %}
    {%- set ns = namespace(tools_text='Available tools:') %}
    {%- for tool in tools %}
        {%- set ns.tools_text = ns.tools_text + '\\n' + (tool | tojson) %}
    {%- endfor %}
    {%- if not messages or messages[0]['role'] != 'system' %}
        {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + ns.tools_text + '<|eot_id|>' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- elif message['content'] is iterable %}
        {%- for part in message['content'] %}
            {%- if part['type'] == 'text' %}
                {{- part['text'] }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {%- if loop.first and tools and message['role'] == 'system' %}
        {{- '\\n\\n' + ns.tools_text }}
    {%- endif %}
    {%- if message['tool_calls'] %}
        {%- for tool_call in message['tool_calls'] %}
            {%- if tool_call['function'] is defined %}
                {%- set tool_call = tool_call['function'] %}
            {%- endif %}
            {%- if message['content'] or not loop.first %}
                {{- '\\n' }}
            {%- endif %}
            {{- tool_call | tojson }}
        {%- endfor %}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# ---------------------------------------------------------------------------------------------------
# Fictional entities. Names are built from stems and endings so that no row is about a real person.
# ---------------------------------------------------------------------------------------------------
FIRST_NAMES_SHE = [
    "Ada", "Beatrix", "Clara", "Dagny", "Edith", "Freya", "Greta", "Hilde", "Ingrid", "Juno",
    "Katya", "Lena", "Mira", "Nadia", "Olga", "Petra", "Rosa", "Selma", "Thea", "Ursula",
    "Vera", "Wilma", "Yara", "Zoë", "Renée", "Élodie", "Agnes", "Liv", "Maren", "Signe",
]  # fmt: skip
FIRST_NAMES_HE = [
    "Anton", "Bruno", "Casimir", "Dmitri", "Emil", "Felix", "Gustav", "Henrik", "Ivo", "Jonas",
    "Karl", "Lukas", "Milo", "Niels", "Oskar", "Pavel", "Rafael", "Soren", "Tobias", "Viktor",
    "Walter", "Yusuf", "Zeno", "Søren", "José", "Matthias", "Arvid", "Bram", "Leif", "Tomas",
]  # fmt: skip
SURNAME_STEMS = [
    "Ald", "Bram", "Cor", "Dal", "Elst", "Fenn", "Gald", "Hart", "Ivel", "Jorv", "Kess", "Lom",
    "Marr", "Nev", "Orl", "Pry", "Quell", "Rask", "Selw", "Thorn", "Ulm", "Varn", "Wick", "Yarr",
]  # fmt: skip
SURNAME_ENDINGS = [
    "ley", "wood", "sby", "ton", "mere", "holt", "ing", "ard", "ow", "en", "ick", "ersen",
    "ski", "ani", "eau", "ström",
]  # fmt: skip
PLACE_STEMS = [
    "Ash", "Brack", "Cold", "Dun", "Eld", "Fair", "Glen", "High", "Ivy", "Kings",
    "Lark", "Marsh", "North", "Oak", "Pine", "Raven", "Silver", "Stone", "Thorn", "Wester",
]  # fmt: skip
PLACE_ENDINGS = ["ford", "holm", "vale", "port", "wick", "bridge", "haven", "moor", "field", "by", "stead", "mouth"]
PROFESSIONS = [
    "architect", "astronomer", "botanist", "cartographer", "chemist", "clockmaker", "composer",
    "economist", "engineer", "geologist", "glassblower", "historian", "journalist", "lawyer",
    "librarian", "linguist", "mathematician", "nurse", "painter", "pharmacist", "photographer",
    "physician", "poet", "sculptor", "shipbuilder", "surveyor", "teacher", "translator",
    "veterinarian", "weaver",
]  # fmt: skip
ORG_ADJECTIVES = ["Northern", "Royal", "Eastern", "Free", "United", "Western", "Grand", "Old"]
ORG_NOUNS = ["Lantern", "Harbour", "Meridian", "Compass", "Granite", "Willow", "Falcon", "Beacon", "Cedar", "Anchor"]
ORG_KINDS = ["Society", "Institute", "Company", "Guild", "Academy", "Trust", "Works", "Press"]
AWARD_KINDS = ["Medal", "Prize", "Award", "Cup"]


@dataclass(frozen=True)
class Person:
    first_name: str
    surname: str
    pronoun: str  # "she" | "he"

    @property
    def name(self) -> str:
        return f"{self.first_name} {self.surname}"


def fictional_people(rng: random.Random) -> list[Person]:
    """Every first-name/surname pair once, shuffled: train and validation take disjoint slices."""
    surnames = [stem + ending for stem in SURNAME_STEMS for ending in SURNAME_ENDINGS]
    people = [Person(first, surname, "she") for first in FIRST_NAMES_SHE for surname in surnames]
    people += [Person(first, surname, "he") for first in FIRST_NAMES_HE for surname in surnames]
    rng.shuffle(people)
    return people


def place_names() -> list[str]:
    return [stem + ending for stem in PLACE_STEMS for ending in PLACE_ENDINGS]


def organisation_names() -> list[str]:
    return [f"{adj} {noun} {kind}" for adj in ORG_ADJECTIVES for noun in ORG_NOUNS for kind in ORG_KINDS]


def indefinite_article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------------
# Contexts and questions. A sentence template names its slots; filling it records where each slot's
# value landed, so answer_start comes from construction, never from searching the text.
# ---------------------------------------------------------------------------------------------------
# Each fact: the slots it introduces and the ways to say it. {Subject} starts a sentence, {subject}
# does not; both are the pronoun or the surname.
FACT_SENTENCES = {
    "birth": [
        "{person} was born in {birth_city} in {birth_year}.",
        "{person} was born in {birth_year} in the town of {birth_city}.",
        "In {birth_year}, {person} was born in {birth_city}.",
    ],
    "career": [
        "{Subject} trained as {article} {profession}.",
        "{Subject} worked as {article} {profession} for most of {possessive} life.",
        "By profession, {subject} was {article} {profession}.",
    ],
    "joined": [
        "In {join_year}, {subject} joined the {org}.",
        "{Subject} joined the {org} in {join_year}.",
        "{Subject} became a member of the {org} in {join_year}.",
    ],
    "moved": [
        "{Subject} moved to {home_city} in {move_year}.",
        "In {move_year}, {subject} settled in {home_city}.",
        "{Subject} left for {home_city} in {move_year} and stayed there.",
    ],
    "award": [
        "{Subject} received the {award} in {award_year}.",
        "In {award_year}, {subject} was awarded the {award}.",
        "The {award} went to {surname} in {award_year}.",
    ],
}
# The birth sentence always opens the paragraph; the others follow in this (chronological) order.
OPTIONAL_FACTS = ["career", "joined", "moved", "award"]

# Each question: the fact it needs, the slot holding its answer, and its phrasings (who/where/when/what).
QUESTIONS = [
    ("birth", "birth_city", ["Where was {person} born?", "In which town was {person} born?",
                             "What is the birthplace of {person}?"]),
    ("birth", "birth_year", ["When was {person} born?", "In what year was {person} born?",
                             "What year was {person} born in?"]),
    ("birth", "person", ["Who was born in {birth_city} in {birth_year}?", "Who was born in {birth_year}?",
                         "Which person was born in {birth_city}?"]),
    ("career", "profession", ["What was {person}'s profession?", "What did {person} work as?",
                              "What was the occupation of {person}?"]),
    ("joined", "org", ["Which organisation did {person} join?", "What did {person} join in {join_year}?",
                       "Which {org_kind} did {person} join?"]),
    ("joined", "join_year", ["When did {person} join the {org}?", "In what year did {person} join the {org}?"]),
    ("joined", "person", ["Who joined the {org} in {join_year}?"]),
    ("moved", "home_city", ["Where did {person} move to?", "Where did {person} move in {move_year}?",
                            "Which town did {person} settle in?"]),
    ("moved", "move_year", ["When did {person} move to {home_city}?",
                            "In what year did {person} settle in {home_city}?"]),
    ("award", "award", ["What award did {person} receive?", "Which prize was {person} given in {award_year}?",
                        "What did {person} receive in {award_year}?"]),
    ("award", "award_year", ["When did {person} receive the {award}?",
                             "In what year was {person} awarded the {award}?"]),
]  # fmt: skip

SLOT_PATTERN = re.compile(r"\{(\w+)\}")


def fill(template: str, values: dict[str, str]) -> tuple[str, dict[str, int]]:
    """Fill `{slot}`s; return the text and the character offset of each slot's value in it."""
    pieces, starts, cursor, length = [], {}, 0, 0
    for match in SLOT_PATTERN.finditer(template):
        literal = template[cursor : match.start()]
        value = values[match.group(1)]
        pieces += [literal, value]
        length += len(literal)
        starts.setdefault(match.group(1), length)
        length += len(value)
        cursor = match.end()
    pieces.append(template[cursor:])
    return "".join(pieces), starts


def draw_facts(person: Person, rng: random.Random, places: list[str], orgs: list[str]) -> dict[str, str]:
    """The slot values of one paragraph: distinct towns, and years that increase through a life."""
    birth_city, home_city, award_town = rng.sample(places, 3)
    birth_year = rng.randint(1790, 1960)
    join_year = birth_year + rng.randint(18, 30)
    move_year = join_year + rng.randint(2, 15)
    award_year = move_year + rng.randint(2, 20)
    profession = rng.choice(PROFESSIONS)
    org = rng.choice(orgs)
    subject = person.pronoun if rng.random() < 0.6 else person.surname
    return {
        "person": person.name,
        "surname": person.surname,
        "subject": subject,
        "Subject": subject[0].upper() + subject[1:],
        "possessive": "her" if person.pronoun == "she" else "his",
        "birth_city": birth_city,
        "birth_year": str(birth_year),
        "profession": profession,
        "article": indefinite_article(profession),
        "org": org,
        "org_kind": org.split()[-1].lower(),
        "join_year": str(join_year),
        "home_city": home_city,
        "move_year": str(move_year),
        "award": f"{award_town} {rng.choice(AWARD_KINDS)}",
        "award_year": str(award_year),
    }


def write_paragraph(facts: dict[str, str], rng: random.Random) -> tuple[str, list[str], dict[str, int]]:
    """2-5 sentences; returns the context, the facts it states, and each answer slot's offset in it."""
    extra = sorted(rng.sample(range(len(OPTIONAL_FACTS)), rng.randint(1, 4)))
    stated = ["birth"] + [OPTIONAL_FACTS[i] for i in extra]
    sentences, offsets, length = [], {}, 0
    for fact in stated:
        sentence, starts = fill(rng.choice(FACT_SENTENCES[fact]), facts)
        if sentences:
            length += 1  # the joining space
        for slot, start in starts.items():
            offsets.setdefault(slot, length + start)  # "person" answers point at the first mention
        sentences.append(sentence)
        length += len(sentence)
    return " ".join(sentences), stated, offsets


def squad_id(rng: random.Random, used: set[str]) -> str:
    """24 hex digits, like SQuAD's ids."""
    while (row_id := f"{rng.getrandbits(96):024x}") in used:
        pass
    used.add(row_id)
    return row_id


def make_rows(
    people: list[Person], rng: random.Random, used_ids: set[str], alternative_answers: bool
) -> list[dict]:
    """QUESTIONS_PER_CONTEXT rows per person, each asking a different slot of that person's paragraph.

    With alternative_answers (validation, like SQuAD's dev set), a question whose answer is a person
    also accepts the surname alone, a second annotator's shorter span.
    """
    places, orgs = place_names(), organisation_names()
    rows = []
    for person in people:
        facts = draw_facts(person, rng, places, orgs)
        context, stated, offsets = write_paragraph(facts, rng)
        askable = [q for q in QUESTIONS if q[0] in stated]
        for _, slot, phrasings in rng.sample(askable, QUESTIONS_PER_CONTEXT):
            question, _ = fill(rng.choice(phrasings), facts)
            texts, starts = [facts[slot]], [offsets[slot]]
            if alternative_answers and slot == "person":
                texts.append(person.surname)
                starts.append(offsets[slot] + len(person.first_name) + 1)
            rows.append({
                "id": squad_id(rng, used_ids),
                "title": person.name.replace(" ", "_"),
                "context": context,
                "question": question,
                "answers": {"text": texts, "answer_start": starts},
            })  # fmt: skip
    return rows


def make_squad_splits(seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    people = fictional_people(rng)
    train_people = people[:N_TRAIN_PEOPLE]
    validation_people = people[N_TRAIN_PEOPLE : N_TRAIN_PEOPLE + N_VALIDATION_PEOPLE]
    used_ids: set[str] = set()
    return {
        "train": make_rows(train_people, rng, used_ids, alternative_answers=False),
        "validation": make_rows(validation_people, rng, used_ids, alternative_answers=True),
    }


SQUAD_CARD = """\
---
configs:
- config_name: plain_text
  default: true
  data_files:
  - split: train
    path: train.jsonl
  - split: validation
    path: validation.jsonl
dataset_info:
  config_name: plain_text
  features:
  - name: id
    dtype: string
  - name: title
    dtype: string
  - name: context
    dtype: string
  - name: question
    dtype: string
  - name: answers
    sequence:
    - name: text
      dtype: string
    - name: answer_start
      dtype: int32
---

# squad-tiny

A small reading-comprehension set in the exact schema of `rajpurkar/squad`, made by
`assets/make_assets.py` (seed {seed}) so that the quickstart runs with no network.
Every paragraph is about a fictional person, written from sentence templates (birth, profession,
organisation, move, award; 2-5 sentences); each paragraph gets {per_context} questions
(who / where / when / what), and every answer is a span of its context. The people of the
validation split never appear in the train split.

- `train.jsonl`: {n_train} rows; `validation.jsonl`: {n_validation} rows, one JSON object per line.
- Fields: `id` (24 hex digits), `title`, `context`, `question`,
  `answers` = `{{"text": [str, ...], "answer_start": [int, ...]}}` with
  `context[answer_start:answer_start + len(text)] == text` (character offsets). Train rows have
  one answer; validation rows about a person also accept the surname alone, like SQuAD's dev set.

Load it like the Hub version: `datasets.load_dataset("assets/squad-tiny")`.
"""


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_squad(directory: Path, splits: dict[str, list[dict]], seed: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        write_jsonl(directory / f"{split}.jsonl", rows)
    card = SQUAD_CARD.format(
        seed=seed,
        per_context=QUESTIONS_PER_CONTEXT,
        n_train=len(splits["train"]),
        n_validation=len(splits["validation"]),
    )
    (directory / "README.md").write_text(card, encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------
def tokenizer_corpus(train_rows: list[dict]) -> list[str]:
    """The texts the chat template will carry, each after its role header: SQuAD turns as the squad
    dataset formats them (context -> system, question -> user, answer -> assistant), and a
    tool-calling exchange, so role names and JSON punctuation earn tokens of their own."""
    texts = []
    for row in train_rows:
        texts += [f"system\n\n{row['context']}", f"user\n\n{row['question']}"]
        texts.append(f"assistant\n\n{row['answers']['text'][0]}")
    tool = {"type": "function", "function": {"name": "lookup_person", "parameters": {"name": "string"}}}
    call = {"name": "lookup_person", "arguments": {"name": train_rows[0]["title"].replace("_", " ")}}
    texts += [f"system\n\nAvailable tools:\n{json.dumps(tool)}", f"assistant\n\n{json.dumps(call)}", "tool\n\n{}"] * 50
    return texts


def train_tokenizer(corpus: list[str]):
    """Byte-level BPE with Llama-3's split, special tokens after the learned vocabulary, and a
    post-processor that prepends <|begin_of_text|> when add_special_tokens=True (as Llama-3's does)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        # All 256 bytes, whether the corpus has them or not: any UTF-8 text then round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    # The corpus is small and can run out of merges first; like Llama-3's reserved tokens, these keep
    # the tokenizer exactly as large as the model's embedding.
    n_reserved = VOCAB_SIZE - tokenizer.get_vocab_size()
    tokenizer.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(n_reserved)])
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS}:0 $A:0",
            pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
            special_tokens=[(BOS, bos_id)],
        ),
    ])  # fmt: skip
    return tokenizer


def wrap_for_transformers(tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        # Off, unlike Llama-3: cleaning moves spaces before punctuation, and decode must invert encode.
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------
def make_model(hf_tokenizer, seed: int):
    """A Llama-3-shaped model (GQA, tied embeddings, rope theta 5e5), small enough to commit."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    vocab_size = -(-len(hf_tokenizer) // 64) * 64
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MODEL_MAX_LENGTH,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=True,
        bos_token_id=hf_tokenizer.bos_token_id,
        eos_token_id=hf_tokenizer.eos_token_id,
        pad_token_id=hf_tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=hf_tokenizer.bos_token_id,
        # A chat turn ends with <|eot_id|>, a document with <|end_of_text|>: generation stops at either.
        eos_token_id=[hf_tokenizer.eos_token_id, hf_tokenizer.convert_tokens_to_ids(EOT)],
        pad_token_id=hf_tokenizer.pad_token_id,
    )
    return model


# ---------------------------------------------------------------------------------------------------
def directory_size(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="where to write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()

    squad_dir = args.out / "squad-tiny"
    splits = make_squad_splits(SEED)
    write_squad(squad_dir, splits, SEED)

    model_dir = args.out / "tiny-llama"
    hf_tokenizer = wrap_for_transformers(train_tokenizer(tokenizer_corpus(splits["train"])))
    hf_tokenizer.save_pretrained(model_dir)
    model = make_model(hf_tokenizer, SEED)
    model.save_pretrained(model_dir)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"{squad_dir}: {len(splits['train'])} train, {len(splits['validation'])} validation rows, "
          f"{directory_size(squad_dir) / 1e6:.2f} MB")  # fmt: skip
    print(f"{model_dir}: vocab {len(hf_tokenizer)}, {n_params:,} parameters, {directory_size(model_dir) / 1e6:.2f} MB")
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
