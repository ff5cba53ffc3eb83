"""
The Alpaca prompt LLM-Adapters fine-tunes and evaluates with, and a training example as token ids with its
loss mask.

One training sequence: BOS, the prompt's ids p1..pn, the response's ids r1..rm, EOS. Each position's
label is the id that follows it, or -100 (no loss) while that id is still part of the prompt:

    position   0     1     ...   n-1    n     n+1   ...   n+m
    tokens     <s>   p1    ...   pn-1   pn    r1    ...   rm
    labels     -100  -100  ...   -100   r1    r2    ...   </s>

so labels[i] == tokens[i + 1] wherever it is not -100, and the loss is a plain cross-entropy over
(logits, labels) with ignore_index=-100: no shifting left to do. n_prompt = n + 1 counts BOS.

Why mask the prompt: the model is asked to answer, not to reproduce questions; this is LLM-Adapters'
train_on_inputs=False (its finetune.py defaults to True, training on the prompt too; we do not).
LLM-Adapters writes its template as indented triple-quoted strings, so its prompts also carry the
source code's indentation; we use the clean Alpaca text. What matters is that training and evaluation
see the same prompt, and here they do by construction: eval_prompt_tokens() is exactly the prefix of
every training sequence.
"""

IGNORE_INDEX = -100  # targets that add nothing to the loss: F.cross_entropy's default ignore_index

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


# ChatML, the chat format of instruction-tuned models such as SmolLM2 and Qwen: one user turn, then the assistant's
# turn is opened. The response ends with the tokenizer's EOS, which for those models is <|im_end|>. No system turn:
# a model's own template may add a default one, which a fine-tuned model does not need
CHATML_WITH_INPUT = "<|im_start|>user\n{instruction}\n\n{input}<|im_end|>\n<|im_start|>assistant\n"
CHATML_NO_INPUT = "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"

PROMPT_FORMATS = {"alpaca": (PROMPT_NO_INPUT, PROMPT_WITH_INPUT), "chatml": (CHATML_NO_INPUT, CHATML_WITH_INPUT)}


def format_prompt(example: dict, fmt: str = "alpaca") -> str:
    """Everything the model is given before its response: up to "### Response:\\n" (alpaca), or the opened
    assistant turn (chatml)."""
    no_input, with_input = PROMPT_FORMATS[fmt]
    if example.get("input"):
        return with_input.format(instruction=example["instruction"], input=example["input"])
    return no_input.format(instruction=example["instruction"])


def eval_prompt_tokens(tokenizer, example: dict, fmt: str = "alpaca") -> list:
    """BOS (if the tokenizer's model has one) + prompt: what generation starts from at evaluation."""
    return tokenizer.encode(format_prompt(example, fmt), bos=True, eos=False)


def example_ids(tokenizer, example: dict, fmt: str = "alpaca") -> tuple:
    """BOS + prompt + response + EOS, and n_prompt: how many of those ids are BOS + prompt."""
    prompt_ids = eval_prompt_tokens(tokenizer, example, fmt)
    ids = tokenizer.encode(format_prompt(example, fmt) + example["output"], bos=True, eos=True)
    # Encoding the text in one piece tokenises the response as it reads after the prompt. SentencePiece
    # could in principle merge across the boundary; then the evaluation prompt would not be a prefix of
    # the training sequence, so fall back to the response encoded on its own.
    if ids[:len(prompt_ids)] != prompt_ids:
        ids = prompt_ids + tokenizer.encode(example["output"], bos=False, eos=True)
    return ids, len(prompt_ids)


def inputs_and_labels(ids: list, n_prompt: int, max_seq_len: int):
    """(tokens, labels) of at most max_seq_len positions, or None when no response id fits.

    Like LLM-Adapters' cutoff_len, a long example is cut at the end: the model still learns the start of
    its response, and the cut sequence has no EOS (it must not learn to stop mid-answer)."""
    ids = ids[:max_seq_len + 1]  # max_seq_len inputs need max_seq_len + 1 ids: each input's target is the next
    if len(ids) <= n_prompt:
        return None  # the prompt alone fills the window: nothing of the response would be learned
    tokens = ids[:-1]
    labels = [IGNORE_INDEX] * (n_prompt - 1) + ids[n_prompt:]
    return tokens, labels


def tokenize_example(tokenizer, example: dict, max_seq_len: int, fmt: str = "alpaca"):
    """(tokens, labels), two lists of the same length <= max_seq_len with labels[i] the target of tokens[i]
    (-100 where the target is a prompt token), or None when the prompt leaves no room for the response."""
    ids, n_prompt = example_ids(tokenizer, example, fmt)
    return inputs_and_labels(ids, n_prompt, max_seq_len)


def tokenize_dataset(tokenizer, examples: list, max_seq_len: int, fmt: str = "alpaca") -> tuple:
    """([(tokens, labels), ...], n_truncated, n_dropped): dropped examples are left out of the list,
    truncated ones (at least one target cut away) are kept; the counts are there to be reported."""
    pairs, n_truncated, n_dropped = [], 0, 0
    for example in examples:
        ids, n_prompt = example_ids(tokenizer, example, fmt)
        pair = inputs_and_labels(ids, n_prompt, max_seq_len)
        if pair is None:
            n_dropped += 1
            continue
        n_truncated += len(ids) - 1 > max_seq_len
        pairs.append(pair)
    return pairs, n_truncated, n_dropped
