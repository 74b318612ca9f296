"""Trees of tensors (dicts, lists and tuples of them: a method's state, a checkpoint's): where they live and
moving them, for the checkpoint chain, resume and the methods alike."""

from __future__ import annotations

import torch


def tree_to(tree, device, copy: bool = False):
    """Every tensor in a tree of dicts, lists and tuples moved to `device` (copied when `copy`: a state read
    from a memory-mapped checkpoint must not stay backed by the file)."""
    if torch.is_tensor(tree):
        return tree.to(device, copy=copy)
    if isinstance(tree, dict):
        return {k: tree_to(v, device, copy) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_to(v, device, copy) for v in tree)
    return tree


def tree_device(tree) -> str:
    """'cuda' if any tensor in the tree lives on a GPU, else 'cpu'."""
    if torch.is_tensor(tree):
        return tree.device.type
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (tuple, list)):
        return "cuda" if any(tree_device(v) == "cuda" for v in tree) else "cpu"
    return "cpu"
