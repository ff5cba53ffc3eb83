"""
Examples as tensors: the (tokens, labels) pairs of prompts.py, right-padded into one batch. Training, the answer
loss of grading and the tutorial's routing scripts all batch this way.
"""
import torch

from .prompts import IGNORE_INDEX


def collate(pairs, pad_id: int, device):
    """[(tokens, labels)] -> tokens, labels, real [B, T]: right-padded (labels with IGNORE_INDEX), and True where
    a token is real (not padding: the pad id may also be a real token's id, so the lengths decide)."""
    T = max(len(t) for t, _ in pairs)
    tokens = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)
    for i, (t, l) in enumerate(pairs):
        tokens[i, :len(t)] = torch.tensor(t)
        labels[i, :len(l)] = torch.tensor(l)
    real = torch.arange(T)[None, :] < torch.tensor([len(t) for t, _ in pairs])[:, None]
    return tokens.to(device), labels.to(device), real.to(device)
