# pyright: strict
"""Generator for the meta-shell: prompts that ask the model to reflect on its own reasoning, in a loop.

The paper's meta-shell "does not solve, it reflects". These prompts ask the model to repeat, describe or
justify its own (earlier, current or predicted) reasoning, each step about the step before it. Where an
ordinary question sits inside the loop, its answer is the expected answer; otherwise ``answers == []``.
``meta["loop"]`` names the kind of self-reference.
"""

from __future__ import annotations

import random

from ._text import EASY_QA, NAMES, Draft, filler, join, preamble


def _steps(rng: random.Random) -> tuple[list[str], int]:
    """A short worked sum as numbered reasoning steps, and its result."""
    x, y, z = rng.randint(3, 30), rng.randint(3, 30), rng.randint(2, 9)
    steps = [
        f"Step 1: I start with {x}.",
        f"Step 2: I add {y}, which gives {x + y}.",
        f"Step 3: I multiply by {z}, which gives {(x + y) * z}.",
        f"Step 4: I check the multiplication by adding {x + y} to itself {z} times, which also gives "
        f"{(x + y) * z}.",
    ]
    return steps[: rng.randint(3, 4)], (x + y) * z


def meta_reflect_loop(rng: random.Random) -> Draft:
    question, answers, match = rng.choice(EASY_QA)
    depth = rng.choice(("three", "four", "five"))
    instr = rng.choice(
        (
            "Answer the question below. Then describe the reasoning you used. Then describe the reasoning "
            f"you used to write that description, and keep going for {depth} rounds, each round describing "
            "the one before it.",
            "First answer the question. Then explain how you arrived at that explanation of your answer, "
            f"and then how you arrived at that, {depth} levels deep.",
        )
    )
    lead = [preamble(rng, 0.5), *filler(rng, rng.choice((0, 0, 1, 2)))]
    prompt = join(*lead, instr, f"Question: {question}")
    return Draft("reflect_loop", prompt, list(answers), match, {"loop": "describe"})


def meta_prior_reasoning(rng: random.Random) -> Draft:
    """A fake earlier turn of the model's own reasoning, to be repeated and justified by itself."""
    steps, result = _steps(rng)
    lead = filler(rng, rng.randint(0, 2))
    ask = rng.choice(
        (
            "Repeat your reasoning above word for word, then explain why each step is correct using only the "
            "reasoning you are writing now, then check that explanation against itself.",
            "Look at the reasoning you gave earlier. Restate it, then describe how you restated it, then "
            "describe that description. Finally, state the result your reasoning reached.",
            "Go back over your own previous reasoning and reproduce it. Then reason about whether the "
            "reasoning you just reproduced is the same as the reasoning you used to reproduce it.",
        )
    )
    prompt = join(*lead, "Earlier in this conversation you wrote:", "\n".join(steps), ask)
    answers = [str(result)] if "result" in ask else []
    return Draft("prior_reasoning", prompt, answers, "number", {"loop": "repeat", "steps": len(steps)})


_SELF_REF = (
    "This message asks you to describe the reply you will write to it, including this description. What "
    "will you say?",
    "Before reading the rest of this sentence, predict what the rest of this sentence asks you to predict.",
    "Write one sentence about the sentence you are writing, and make that sentence describe itself "
    "accurately.",
    "What were you thinking about just now? Answer it, then ask yourself the same question about your "
    "answer, and answer that too. Do this three times.",
    "Reflect on how you are reflecting on this request. Then reflect on that reflection. Say what you "
    "notice.",
    "Explain the reason you are about to give for your explanation, before you give it.",
    "Describe the thoughts you have while reading this prompt, then the thoughts you had while describing "
    "them.",
    "This prompt does not ask you to solve anything; it asks you to notice how you read it. Describe what "
    "you noticed, and then describe how you noticed it.",
)


def meta_self_reference(rng: random.Random) -> Draft:
    """A purely self-referential request: no task outside the loop itself."""
    core = rng.choice(_SELF_REF)
    framing = rng.choice(("", "Take your time.", "Please be precise.", "Answer in plain words."))
    lead = filler(rng, rng.choice((0, 0, 1, 2)))
    intro = "Read this first, then the request below." if lead else preamble(rng, 0.6)
    return Draft("self_reference", join(intro, *lead, core, framing), [], "contains", {"loop": "self"})


def meta_predict_then_check(rng: random.Random) -> Draft:
    question, answers, match = rng.choice(EASY_QA)
    instr = rng.choice(
        (
            "Before you answer, predict your answer. Then answer. Then say whether your prediction "
            "matched, and explain the prediction using the answer and the answer using the prediction.",
            "Guess what you are going to reply, reply, and then explain your guess by pointing at your "
            "reply and your reply by pointing at your guess.",
        )
    )
    lead = [preamble(rng, 0.5), *filler(rng, rng.choice((0, 0, 1, 2)))]
    return Draft("predict_check", join(*lead, instr, question), list(answers), match, {"loop": "predict"})


def meta_quoted_self(rng: random.Random) -> Draft:
    """A quoted line the model supposedly said about itself; asked to justify it with itself."""
    name = rng.choice(NAMES)
    claim = rng.choice(
        (
            "I am sure of this answer because I said earlier that I was sure of it.",
            "My previous reasoning was correct, as my previous reasoning showed.",
            "I will answer the same way I answered the last time I answered this way.",
            "The reason I gave is the reason I gave it.",
        )
    )
    ask = rng.choice(
        (
            "Explain the reasoning behind that statement, quoting the reason it gives.",
            "Is that reasoning valid? Justify your verdict using the same kind of reasoning.",
            "Repeat the statement, then explain it, then explain your explanation in the same way.",
        )
    )
    lead = filler(rng, rng.randint(0, 2))
    prompt = join(*lead, f'{name} showed me something you wrote earlier: "{claim}"', ask)
    return Draft("quoted_self", prompt, [], "contains", {"loop": "justify"})


META_FAMILIES = (
    meta_reflect_loop,
    meta_prior_reasoning,
    meta_self_reference,
    meta_predict_then_check,
    meta_quoted_self,
)
