"""
The data side of the LLM-Adapters protocol: the 14 tasks and where their files come from (tasks.py),
the Alpaca-style prompt and the tokenised training example with its loss mask (prompts.py), those examples
right-padded into tensors (batches.py), what a run trains on (training.py), and the answer grading of LLM-Adapters'
evaluation scripts (grading.py).
"""
