"""What the real Llama 3.2 Vision answered in published runs, quoted verbatim, attributed and graded.

No real weights run on a CPU seat, so these are the real answers a learner can look at: each one keeps the
source (walk-through, model size, precision, generation settings), the exact prompt, the source's picture in
words (the sources' pictures are not ours: `input/` holds different images, some under the same file names),
the task of ours it corresponds to, and the grade a careful person gives it, with the reason.

    from llama_vision_helpers.published import grade_published, published_answers

    for answer in published_answers("charts"):
        print(answer.citation)
        print(grade_published(answer))

Only the model's answers (and the prompts that produced them) are quoted. A trailing end-of-turn marker that
a source printed because it decoded with special tokens is not part of the answer and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import parsing
from .defaults import DEFAULT_INSTRUCTION
from .inputs import (
    SOURCE_CAPTION, SOURCE_INVOICE, SOURCE_REVENUE, SOURCE_STEP_BY_STEP, SOURCE_STEP_EXPLANATION,
)
from .scoring import Score, parse_answer, score_parsed, unparsed_score

# The grades a person gives; `grade_published` reports our scorers' verdict in the same words.
CORRECT, PARTLY_CORRECT, WRONG, UNVERIFIABLE = "correct", "partly correct", "wrong", "unverifiable"
GRADES = (CORRECT, PARTLY_CORRECT, WRONG, UNVERIFIABLE)
NOT_SCORED = "not scored"  # our verdict on free text that none of our scorers takes


@dataclass(frozen=True)
class Source:
    """A published run: where it was printed and how the model was run."""

    key: str
    title: str
    publisher: str
    date: str
    url: str | None
    model: str
    precision: str
    settings: str

    def cite(self) -> str:
        """One line naming the source, the model, its precision and its generation settings."""
        return f"{self.title} ({self.publisher}, {self.date}): {self.model}, {self.precision}, {self.settings}"


SOURCES: dict[str, Source] = {
    "unsloth-gradio": Source(
        key="unsloth-gradio",
        title="Llama 3.2 Vision with Unsloth and a Gradio app",
        publisher="DebuggerCafe",
        date="2024",
        url=None,
        model="Llama 3.2 11B Vision Instruct",
        precision="bnb 4-bit (unsloth/Llama-3.2-11B-Vision-Instruct-bnb-4bit, via unsloth FastVisionModel)",
        settings="generate with temperature=1.5, min_p=0.1, max_new_tokens=1024",
    ),
    "rocm-blog": Source(
        key="rocm-blog",
        title="Inference with Llama 3.2 Vision LLMs on AMD GPUs Using ROCm",
        publisher="AMD ROCm blog, Sean Song",
        date="23 October 2024",
        url="https://github.com/ROCm/rocm-blogs/tree/release/blogs/artificial-intelligence/llama3_2_vision",
        model="Llama 3.2 90B Vision Instruct",
        precision="bf16 on an AMD MI300X",
        settings="transformers generate with the checkpoint's default generation settings, only max_new_tokens set",
    ),
}


@dataclass(frozen=True)
class PublishedAnswer:
    """One verbatim answer of the real model, with everything needed to cite it and grade it.

    `question` is in the ground-truth form our scorers take (kind, answer, options, tolerance); its `answer` is
    the truth for the *source's* picture as far as the source establishes it, or None when nobody can check it.
    `reads_as` is what a careful reader takes the model's answer to be (None: free text, nothing to extract).
    """

    id: str
    source: Source
    prompt: str
    answer: str
    picture: str
    task: str | None
    question: dict | None
    reads_as: Any
    grade: str
    grade_reason: str
    max_new_tokens: int
    finished: bool
    chat_template: bool = True
    history: tuple[dict, ...] = ()
    our_input: str | None = None  # the input/ image our notebooks ask the same kind of question about
    notes: str = ""

    @property
    def citation(self) -> str:
        """Source, model size, precision and settings, plus this answer's own token budget."""
        ending = "ended by itself" if self.finished else f"cut off at max_new_tokens={self.max_new_tokens}"
        template = "" if self.chat_template else ", prompt written by hand without the chat template"
        return f"{self.source.cite()}; max_new_tokens={self.max_new_tokens}, {ending}{template}"


@dataclass
class PublishedGrade:
    """Our parsers' and scorers' reading of a published answer, beside the person's grade."""

    answer: PublishedAnswer
    parsed: Any
    score: Score | None
    error: str | None

    @property
    def verdict(self) -> str:
        """Our scorers' grade in the person's words (correct, partly correct, wrong, unverifiable), or
        'not scored' for free text."""
        if self.answer.question is None:
            return NOT_SCORED
        if self.score is None:
            return UNVERIFIABLE
        if self.score.correct:
            return CORRECT
        return PARTLY_CORRECT if self.score.value > 0 else WRONG

    @property
    def agrees(self) -> bool | None:
        """Whether our verdict is the person's grade (None for free text, which we do not score)."""
        return None if self.verdict == NOT_SCORED else self.verdict == self.answer.grade

    @property
    def read_as(self) -> str:
        """What our parser took from the answer, in words: a number, a list, the keywords found, or why not."""
        if self.answer.question is None:
            return "(free text)"
        if self.error:
            return f"(no answer found: {self.error})"
        if self.answer.question["kind"] == "keywords":
            found = self.score.details.get("keywords_found", []) if self.score else []
            return "mentions " + (", ".join(found) or "none of the keywords")
        if isinstance(self.parsed, float) and self.parsed.is_integer():
            return str(int(self.parsed))
        return ", ".join(map(str, self.parsed)) if isinstance(self.parsed, (list, tuple)) else str(self.parsed)

    def __str__(self) -> str:
        return (f"{self.answer.id}: read as {self.read_as}; our verdict: {self.verdict}; "
                f"person's grade: {self.answer.grade} ({self.answer.grade_reason})")


_UNSLOTH = SOURCES["unsloth-gradio"]
_ROCM = SOURCES["rocm-blog"]

_DOG_SHOW_ANSWER = (
    "This image depicts a dog show, where two individuals are walking their dogs in a grassy area. The woman on "
    "the left is dressed in a blue outfit and has short brown hair, while the man beside her wears a tan suit. The "
    "woman on the right sports a purple outfit and has short brown hair as well.\n\n"
    "In the background, several tents and canopies are visible, with people standing around them. A few cars are "
    "parked nearby, and trees can be seen in the distance. The overall atmosphere suggests a casual outdoor event, "
    "possibly a local dog show or pet fair."
)

ANSWERS: tuple[PublishedAnswer, ...] = (
    PublishedAnswer(
        id="unsloth-mirror-caption",
        source=_UNSLOTH,
        prompt=DEFAULT_INSTRUCTION,
        answer=(
            "The image presents a circular mirror reflection on a beach, with the mirror itself placed on the sand "
            "and rocks, surrounded by a large rock formation. In the foreground, a circular mirror is positioned on "
            "the sand, near a cluster of large rocks. The mirror is made of reflective metal or glass, and its round "
            "shape is defined by a thin brown frame. Inside the mirror, a man is reflected, looking upwards towards "
            "the sky, where clear blue conditions can be seen. He has dark hair and is dressed in a white, "
            "open-necked shirt with the top button undone. In the middle ground, the rock formation dominates the "
            "scene, with a large rock formation rising behind the mirror. The rock formation is dark, with moss "
            "covering parts of its surface, creating a natural and rugged landscape. In front of the mirror, there "
            "is a small rock formation, composed of sand and rocks. The ground around the mirror appears wet, with "
            "small pools of water reflecting the light. In the background, the beach stretches out, with more rocks "
            "and a shoreline. The overall atmosphere suggests a serene and peaceful environment, with the calm ocean "
            "waves and the mirror reflecting the sky creating a sense of tranquility. The mood and composition of "
            "the image evoke a sense of wonder and awe, inviting the viewer to reflect on their own life and "
            "surroundings. The use of the circular mirror as a framing device adds to the sense of introspection and "
            "contemplation, while the natural surroundings create a sense of harmony and balance."
        ),
        picture=("the walk-through's own input/image_2.jpg, a photo of a round mirror standing on a beach among "
                 "rocks (our input/image_2.jpg is a different picture: a cup of coffee)"),
        task="caption",
        question={"kind": "keywords", "answer": ["mirror", "beach|shore", "rock"]},
        reads_as=None,
        grade=CORRECT,
        grade_reason="the source checked it against its picture: 'The model describes the image accurately.'",
        max_new_tokens=1024,
        finished=True,
        our_input="image_2.jpg",
        notes="The last three sentences interpret the mood rather than describe what is visible.",
    ),
    PublishedAnswer(
        id="rocm-dog-show-description",
        source=_ROCM,
        prompt="Please describe this image.",
        answer=_DOG_SHOW_ANSWER,
        picture="a photo of people walking dogs at an outdoor dog show (the source credits the ImageNet LSVRC 2017 page)",
        task="caption",
        question={"kind": "keywords", "answer": ["dog", "show|fair|event", "grass"]},
        reads_as=None,
        grade=CORRECT,
        grade_reason=("the source: 'The model's response accurately describes the image.' A careful reader also "
                      "notes it says 'two individuals' and then describes three people"),
        max_new_tokens=200,
        finished=True,
        our_input="image_1.jpg",
    ),
    PublishedAnswer(
        id="rocm-dog-show-follow-up",
        source=_ROCM,
        prompt="What do you think the relationship between the two women in the foreground?",
        answer=(
            "The two women in the foreground appear to be competitors in the dog show, as they are both walking "
            "their dogs in a similar manner and are dressed in attire that suggests they are participating in a "
            "formal event. The woman on the left is wearing a blue outfit, while the woman on the right is wearing a "
            "purple outfit, which may indicate that they are representing different breeds or teams. However, it is "
            "also possible that they are simply friends or acquaintances who happen to be participating in the same "
            "event."
        ),
        picture="the same dog-show photo, second user turn (the first answer given back as the assistant turn)",
        task=None,
        question=None,
        reads_as=None,
        grade=UNVERIFIABLE,
        grade_reason=("an opinion about people in a photo, hedged both ways; nothing in the picture can confirm "
                      "or refute a relationship. It follows the question's 'two women' although its first answer "
                      "called one of the people a man"),
        max_new_tokens=150,
        finished=True,
        history=(
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Please describe this image."}]},
            # The source sent the first answer back with its paragraph break replaced by a space.
            {"role": "assistant", "content": _DOG_SHOW_ANSWER.replace("\n\n", " ")},
        ),
    ),
    PublishedAnswer(
        id="rocm-clevr-count",
        source=_ROCM,
        prompt=("Subtract all green cubes and all red matte blocks from the set. How many objects remain? "
                + SOURCE_STEP_EXPLANATION),
        answer=(
            "To determine the number of objects that remain after subtracting all green cubes and red matte blocks "
            "from the set, we need to identify and count each type of object in the image.\n\n"
            "**Step 1: Identify Green Cubes**\n"
            "There is one green cube in the image.\n\n"
            "**Step 2: Identify Red Matte Blocks**\n"
            "There are two red matte blocks in the image.\n\n"
            "**Step 3: Count Remaining Objects**\n"
            "After removing the green cube and red matte blocks, we are left with the following objects:\n\n"
            "*   Blue sphere\n"
            "*   Purple sphere\n"
            "*   Yellow cylinder (left)\n"
            "*   Yellow cylinder (right)\n\n"
            "**Step 4: Calculate Total Remaining Objects**\n"
            "By adding up the remaining objects, we get a total of 4 objects.\n\n"
            "Therefore, after subtracting all green cubes and red matte blocks from the set, there are **4 objects** "
            "that remain."
        ),
        picture=("a rendered scene of coloured cubes, spheres and cylinders, from the MMMU data set as the source "
                 "credits it"),
        task="shapes",
        question={"kind": "number", "answer": 4},
        reads_as=4,
        grade=CORRECT,
        grade_reason="the source: 'The model answered the question correctly.' Its steps add up (4 objects listed)",
        max_new_tokens=250,
        finished=True,
        our_input="shapes.png",
    ),
    PublishedAnswer(
        id="rocm-car-vs-walk",
        source=_ROCM,
        prompt=f"Approximately how many more students ride in a car than walk? {SOURCE_STEP_BY_STEP}",
        answer=(
            "To find the difference between the number of students who ride in a car and those who walk, we need to "
            "subtract the number of students who walk from the number of students who ride in a car.\n\n"
            "**Step 1: Identify the number of students who walk.**\n"
            "The number of students who walk is approximately 50.\n\n"
            "**Step 2: Identify the number of students who ride in a car.**\n"
            "The number of students who ride in a car is approximately 150.\n\n"
            "**Step 3: Subtract the number of students who walk from the number of students who ride in a car.**\n"
            "150 (students who ride in a car) - 50 (students who walk) = 100\n\n"
            "Therefore, approximately **100 more students ride in a car than walk**."
        ),
        picture=("a bar chart counting students by how they travel (the question asks about car and walk), from the "
                 "MMMU data set (Math) as the source credits it"),
        task="charts",
        question={"kind": "number", "answer": None},
        reads_as=100,
        grade=UNVERIFIABLE,
        grade_reason=("the arithmetic is right (150 - 50 = 100), but whether the bars read about 150 and 50 cannot "
                      "be checked: the chart is not reproduced in the text and the source gives no verdict"),
        max_new_tokens=350,
        finished=True,
        our_input="chart-transport.png",
    ),
    PublishedAnswer(
        id="rocm-market-share-trend",
        source=_ROCM,
        prompt="Help me to understand the trend of Company A and B for the desktop market share from 2004 to 2023",
        answer=(
            "Based on the line graph, here is a detailed description of the trend for Company A and Company B from "
            "2004 to 2023:\n\n"
            "**Company A (Orange Line)**\n\n"
            "* The trend for Company A starts at around 0.4 in 2004 and remains relatively stable until 2007.\n"
            "* From 2007 to 2008, there is a significant increase in market share, reaching a peak of around 0.55.\n"
            "* However, this peak is short-lived, and the market share drops sharply to around 0.2 in 2009.\n"
            "* From 2009 to 2013, the market share remains relatively low, fluctuating between 0.1 and 0.2.\n"
            "* Starting from 2014, there is a gradual increase in market share, with some fluctuations, reaching "
            "around 0.35 in 2018.\n"
            "* From 2018 to 2023, the market share continues to rise, with some minor fluctuations, reaching around "
            "0.65 in 2023.\n\n"
            "**Company B (Grey Line)**\n\n"
            "* The trend for Company B starts at around 0.6 in 2004 and remains relatively stable until 2007.\n"
            "* From 2007 to 2008, there is a significant increase in market share, reaching a peak of around 0.8.\n"
            "* The market share remains high until 2011, with some minor fluctuations.\n"
            "* From 2011 to 2015"
        ),
        picture="a line chart of two companies' desktop market share, 2004-2023 (an AMD chart, as the source credits it)",
        task="charts",
        question=None,
        reads_as=None,
        grade=PARTLY_CORRECT,
        grade_reason=("the source calls the analysis accurate, but the answer stops mid-sentence at "
                      "max_new_tokens=300: Company B's trend after 2011 is missing"),
        max_new_tokens=300,
        finished=False,
        our_input="chart-market-share.png",
    ),
    PublishedAnswer(
        id="rocm-revenue-sort",
        source=_ROCM,
        prompt=SOURCE_REVENUE,
        answer=(
            "Based on the bar chart, here is a breakdown of the revenue for each item and the sorted list in "
            "descending order:\n\n"
            "**Item Revenue Breakdown:**\n\n"
            "* Item 1: $18\n* Item 2: $23\n* Item 3: $17\n* Item 4: $18\n"
            "* Item 5: $16\n* Item 6: $14\n* Item 7: $33\n* Item 8: $24\n\n"
            "**Sorted List in Descending Order:**\n\n"
            "1. Item 7: $33\n2. Item 8: $24\n3. Item 2: $23\n4. Item 1: $18\n"
            "5. Item 4: $18\n6. Item 3: $17\n7. Item 5: $16\n8. Item 6: $14\n\n"
            "This analysis shows that Item 7 has the highest revenue at $33, while Item 6 has the lowest revenue at "
            "$14."
        ),
        picture="a bar chart of revenue for eight items, Item 1 to Item 8",
        task="charts",
        question={"kind": "order",
                  "answer": ["Item 7", "Item 8", "Item 2", "Item 1", "Item 4", "Item 3", "Item 5", "Item 6"]},
        reads_as=["Item 7", "Item 8", "Item 2", "Item 1", "Item 4", "Item 3", "Item 5", "Item 6"],
        grade=CORRECT,
        grade_reason=("the source: the model 'accurately interpreted the visual information'; the sorted list "
                      "follows its own readings (Items 1 and 4 tie at $18). The first list is in chart order and "
                      "is not the answer"),
        max_new_tokens=300,
        finished=True,
        our_input="chart-revenue.png",
    ),
    PublishedAnswer(
        id="rocm-invoice-no-template",
        source=_ROCM,
        prompt=f"<|image|><|begin_of_text|> {SOURCE_INVOICE}",
        answer=(
            "The invoice date is 11/02/2019 and the due date is 26/02/2019. Therefore, the time between the invoice "
            "date and the due date is 15 days. (26-11=15) *Answer*: 15 days. *Answer*: 15 days. *Answer*: 15 days. "
            "*Answer*: 15 days. *Answer*: 15 days. *Answer*: 15 days. *Answer*: 15 days. *Answer*:"
        ),
        picture=("an invoice with an invoice date and a due date (the source loads invoice.png from the Hugging "
                 "Face data set huggingface/release-assets)"),
        task="invoice",
        question={"kind": "number", "answer": 15},
        reads_as=15,
        grade=CORRECT,
        grade_reason=("15 days follows from the dates it read (11/02/2019 to 26/02/2019) and the source says it "
                      "interpreted the image accurately; but it is not 'short and concise': without the chat "
                      "template it repeats '*Answer*: 15 days.' until max_new_tokens=100"),
        max_new_tokens=100,
        finished=False,
        chat_template=False,
        our_input="invoice.png",
    ),
    PublishedAnswer(
        id="rocm-coco-caption",
        source=_ROCM,
        prompt=SOURCE_CAPTION,
        answer=(
            "The image depicts a dog sitting on the sidewalk next to a bicycle parked in front of a red building. The "
            "dog is white with black spots and wears a black collar, facing right towards the camera. It sits on a "
            "gray brick sidewalk, positioned to the right of the image.\n\n"
            "To the left of the dog, a bicycle leans against the wall of the building. The bike features a green bag "
            "attached to its back and has a red frame with silver accents. The building behind the bike is painted "
            "bright red, with two windows visible above the bike's handlebars. Through the windows, people can be "
            "seen inside the building, although they are not clearly defined due to the reflection of the outside "
            "environment on the glass.\n\n"
            "In the background, the building's red door is partially visible on the right side of the image, "
            "accompanied by some illegible graffiti. Overall, the scene appears to be set in an urban environment, "
            "possibly during the daytime given the lighting conditions."
        ),
        picture="a COCO photo (id 49097): a dog sitting on a sidewalk beside a bicycle in front of a red building",
        task="caption",
        question={"kind": "keywords", "answer": ["dog", "bicycle|bike", "red"]},
        reads_as=None,
        grade=CORRECT,
        grade_reason="the source: 'The response is accurate, providing a detailed description of the image.'",
        max_new_tokens=300,
        finished=True,
        our_input="image_3.jpg",
        notes="Asked for a caption, it writes three paragraphs of description.",
    ),
)


def published_answers(task: str | None = None, source: str | None = None) -> list[PublishedAnswer]:
    """The published answers, optionally only those of one of our tasks (`caption`, `charts`, ...) or one source
    (a key of `SOURCES`)."""
    if source is not None and source not in SOURCES:
        raise ValueError(f"Unknown source {source!r}; choose one of {', '.join(SOURCES)}.")
    return [a for a in ANSWERS if (task is None or a.task == task) and (source is None or a.source.key == source)]


def published_answer(answer_id: str) -> PublishedAnswer:
    """One published answer by its id (e.g. 'rocm-revenue-sort')."""
    for answer in ANSWERS:
        if answer.id == answer_id:
            return answer
    raise KeyError(f"No published answer {answer_id!r}; known: {', '.join(a.id for a in ANSWERS)}.")


def grade_published(answer: PublishedAnswer) -> PublishedGrade:
    """Run a published answer through our parser and scorer for its kind.

    Free-text answers (no `question`) are returned unparsed; an answer whose truth nobody can check is parsed
    but not scored.
    """
    if answer.question is None:
        return PublishedGrade(answer, None, None, None)
    try:
        parsed = parse_answer(answer.question, answer.answer)
    except parsing.ParseError as err:
        return PublishedGrade(answer, None, unparsed_score(answer.question), str(err))
    if answer.question.get("answer") is None:
        return PublishedGrade(answer, parsed, None, None)
    return PublishedGrade(answer, parsed, score_parsed(answer.question, parsed), None)


def published_table(task: str | None = None):
    """A table of the published answers (one row each): source, prompt, what we read, our verdict, the grade."""
    import pandas as pd

    rows = []
    for answer in published_answers(task):
        graded = grade_published(answer)
        rows.append({
            "id": answer.id, "source": answer.source.title, "model": answer.source.model,
            "precision": answer.source.precision, "task": answer.task or "(none of ours)", "prompt": answer.prompt,
            "read_as": graded.read_as,
            "our_verdict": graded.verdict, "person_grade": answer.grade, "why": answer.grade_reason,
        })
    return pd.DataFrame(rows)
