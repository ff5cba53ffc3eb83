"""
The data side of the LLM-Adapters protocol: the 15 tasks (7 math, 8 commonsense) and where their files come from
(tasks.py), the two families' training mixtures and their test sets (mixtures.py), the Alpaca-style prompt and the
tokenised training example with its loss mask (prompts.py), those examples right-padded into tensors (batches.py),
what a run trains on (training.py), and the answer grading of LLM-Adapters' evaluation scripts (grading.py).
"""
