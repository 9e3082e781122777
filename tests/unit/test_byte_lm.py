import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.byte_lm import HELD_OUT, AustenBytes, byte_lm

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = {"emma": "Emma Woodhouse, handsome, clever, and rich. " * 20, HELD_OUT: "Anne Elliot. " * 40}


def test_windows_are_next_byte_pairs_and_the_held_out_novel_is_only_evaluated():
    d = AustenBytes(TEXTS).splits(context=16, seed=3)
    assert d.num_classes == 256 and d.input_shape == (16,)
    for x, y in ((d.train_x, d.train_y), (d.val_x, d.val_y), (d.test_x, d.test_y)):
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # y is x one byte on
    emma, held = TEXTS["emma"].encode(), TEXTS[HELD_OUT].encode()
    assert len(d.train_x) == (len(emma) - 1) // 16
    assert len(d.val_x) + len(d.test_x) == (len(held) // 2 - 1) // 16 + (len(held) - len(held) // 2 - 1) // 16
    assert bytes(d.val_x[0].astype(np.uint8)) == held[:16]


def test_cross_entropy_over_dim_1_is_the_language_model_loss():
    # the train job's classification loss on [batch, vocab, positions] logits is next-token prediction
    torch.manual_seed(0)
    model = byte_lm(num_classes=256, layers=1, hidden=32, heads=2, kv_heads=1, context=16).eval()
    seq = torch.randint(0, 256, (3, 17))
    x, y = seq[:, :-1], seq[:, 1:]
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (3, 256, 16)
        ours = F.cross_entropy(logits, y)
        theirs = model.lm(input_ids=x, labels=x).loss  # transformers shifts the labels itself: 15 targets
        first15 = F.cross_entropy(logits[:, :, :-1], y[:, :-1])
    torch.testing.assert_close(first15, theirs, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(ours)
