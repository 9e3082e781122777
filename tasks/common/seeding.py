"""One call that makes a run repeatable: Python, numpy and torch generators from one seed."""
import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def hash_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (run seed, epoch, rank), stable across processes."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))
