"""The tokenizers of the offline checkpoints: byte-level BPE trained on a fixed built-in corpus, and their chat
template.

Owns: the corpus, the special tokens (ids 0, 1, 2 in every tokenizer built here), the ChatML template and
`build_tokenizer`. Does not know checkpoints, configs or weights (`testing.py` writes those). Changing the corpus
changes every tokenizer: bump `testing.FORMAT_VERSION`.
"""

from __future__ import annotations

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 in every tokenizer built here

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The pre-tokenizer regex of Qwen2 tokenizers (transformers' Qwen2Tokenizer rebuilds it for model_type qwen2).
_QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# A fixed corpus: English prose and Python code. Changing it changes every tokenizer (bump testing.FORMAT_VERSION).
_CORPUS = r'''
The team met in the morning to plan the week. Each agent had a name, a model and a short list of duties.
The planner wrote the outline, the writer filled in the details, and the critic read every line twice.
When the work was done, they wrote a summary for the people who would read it later, in plain words.
A good summary says what was found, what is still unknown, and what should happen next.
It was a quiet town by the river. In the spring the water rose and the fields turned green again.
Children walked to school along the old road, past the mill and the bakery, and the smell of bread
followed them all the way to the bridge. The teacher asked them to write about the things they saw.
One wrote about the birds, one about the boats, and one about the clock on the tower that never told
the right time. "Why does it stop?" she asked. "Because nobody winds it," said the baker, "and nobody
remembers who should." The question stayed with her for years, until she learned to fix clocks herself.
Memory is a shared resource. Every request needs pages for its keys and values, and the scheduler decides
who runs next. If there is not enough memory, a request waits, or another one is paused and resumed later.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 3.14 2.718 1e-6 -1 +1 = < > <= >= != == % # @ & * ^ ~ `
Questions and answers: What is the capital of France? Paris. How many legs does a spider have? Eight.
Is the sky blue? Usually, during the day. Explain why the sea is salty in two sentences or less.
Une phrase en français, ein Satz auf Deutsch, una frase en español, 日本語の文, 中文句子, русский текст.

def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    out = [0, 1]
    while len(out) < n:
        out.append(out[-1] + out[-2])
    return out[:n]


class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, step=1):
        self.value += step
        return self.value

    def __repr__(self):
        return f"Counter(value={self.value})"


def read_lines(path):
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            yield line


import json
from dataclasses import dataclass, field


@dataclass
class Config:
    name: str = "default"
    size: int = 64
    tags: list = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "size": self.size, "tags": self.tags}, indent=2)


for i in range(10):
    if i % 2 == 0:
        print(i, "is even")
    else:
        print(i, "is odd")

result = {key: value for key, value in zip(["a", "b", "c"], [1, 2, 3])}
try:
    x = result["d"]
except KeyError as error:
    print("missing key:", error)
finally:
    print("done")
'''


def build_tokenizer(vocab_size: int = 384, style: str = "gpt2"):
    """The byte-level BPE `tokenizers.Tokenizer` trained on the built-in corpus.

    `style="gpt2"`: GPT-2's byte-level pre-tokenizer and no normalizer, so any text round-trips exactly.
    `style="qwen2"`: NFC normalizer and Qwen2's split regex, as real Qwen2 tokenizers have (and as transformers 5
    imposes on every `model_type="qwen2"` checkpoint, whatever its tokenizer.json says); NFC text round-trips.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif style == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        raise ValueError(f"unknown tokenizer style {style!r}; use 'gpt2' or 'qwen2'")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(
            f"tokenizer_vocab={vocab_size}: the built-in corpus yields a byte-level BPE vocabulary of "
            f"{tok.get_vocab_size()} tokens; choose a size between {256 + len(SPECIAL_TOKENS)} and that"
        )
    return tok
