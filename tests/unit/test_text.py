import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.common.model_io import load_model, save_model
from tasks.common.registry import data_kwargs, lookup
from tasks.common.text import load_text_dataset, tokenize
from tasks.minimoe import relation_kd_loss
from tasks.text_models import bert_student, minilm_classifier, tokenizer

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def teacher():
    return minilm_classifier(num_classes=2).eval()


@pytest.fixture(scope="module")
def fine_foods():
    return load_text_dataset("fine_foods", seed=0)


def test_fine_foods_is_the_real_modeldata_split(fine_foods):
    d = fine_foods
    assert d.kind == "text" and not d.synthetic and d.classes == ("great", "other") and d.num_classes == 2
    assert (len(d.train_texts), len(d.val_texts), len(d.test_texts)) == (3600, 400, 1000)
    assert len(d.train_y) == 3600 and d.train_y.dtype == np.int64
    assert np.bincount(d.test_y).tolist() == [658, 342]
    assert np.bincount(np.concatenate([d.train_y, d.val_y])).tolist() == [2600, 1400]
    assert np.bincount(d.val_y).tolist() == [260, 140]  # stratified: 10% of each class
    assert all(isinstance(t, str) and len(t) >= 50 and "<br />" not in t for t in d.val_texts)


def test_text_splits_depend_only_on_the_seed(fine_foods):
    again, other = load_text_dataset("fine_foods", seed=0), load_text_dataset("fine_foods", seed=1)
    assert again.val_texts == fine_foods.val_texts and np.array_equal(again.train_y, fine_foods.train_y)
    assert other.val_texts != fine_foods.val_texts
    assert other.test_texts == fine_foods.test_texts  # the official test split never moves
    assert sorted(other.train_texts + other.val_texts) == sorted(fine_foods.train_texts + fine_foods.val_texts)


def test_fortunes_has_43_categories_and_a_stratified_test_split():
    d = load_text_dataset("fortunes", seed=0)
    assert d.num_classes == 43 and len(d.train_texts) + len(d.val_texts) + len(d.test_texts) == 15_218
    people = d.classes.index("people")
    assert sum(int((y == people).sum()) for y in (d.train_y, d.val_y, d.test_y)) == 1251
    assert abs(int((d.test_y == people).sum()) - 0.2 * 1251) <= 1


def test_text_sources_are_registered_with_a_kind():
    raw = lookup("dataset", "fine_foods")()
    assert raw.kind == "text" and len(raw.texts) == 4000 and len(raw.test_texts) == 1000
    with pytest.raises(TypeError, match="not a text dataset"):
        load_text_dataset("digits")


def test_tokenize_pads_and_truncates_to_max_length(tok):
    long = " ".join(["delicious"] * 300)
    ids, mask = tokenize(SENTENCES[:1] + [long], tok, max_length=16)
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == mask.dtype == np.int64
    # [CLS] a man is eating food . [SEP] then [PAD] = 0 with mask 0
    assert ids[0, :8].tolist() == [101, 1037, 2158, 2003, 5983, 2833, 1012, 102]
    assert mask[0].tolist() == [1] * 8 + [0] * 8 and (ids[0, 8:] == 0).all()
    assert mask[1].all() and ids[1, 0] == 101 and ids[1, -1] == 102  # truncated, [SEP] kept


def test_minilm_embeddings_are_the_real_pretrained_ones(tok, teacher):
    ids, mask = tokenize(SENTENCES, tok, max_length=16)
    with torch.no_grad():
        e = F.normalize(teacher.embed(torch.from_numpy(ids), torch.from_numpy(mask)), dim=-1)
    cos = e @ e.T
    assert abs(cos[0, 1].item() - 0.755) < 0.005  # offline-data.md: 0.755 and 0.004
    assert abs(cos[0, 2].item() - 0.004) < 0.005
    assert sum(p.numel() for p in teacher.encoder.parameters()) == 22_713_216 - 384 * 384 - 384  # no pooler


def test_registered_text_models_take_num_classes_from_the_data():
    for name in ("minilm_classifier", "bert_student"):
        fn = lookup("model", name)
        assert "num_classes" in inspect.signature(fn).parameters and fn.input_kind == "tokens"
        assert data_kwargs(name, (128,), 5) == {"num_classes": 5}


def test_student_and_teacher_qkv_feed_relation_distillation(tok, teacher):
    ids, mask = (torch.from_numpy(a) for a in tokenize(SENTENCES, tok, max_length=24))
    torch.manual_seed(0)
    student = bert_student(num_classes=2).eval()  # eval: no dropout, so the checks below are exact
    assert sum(p.numel() for p in student.parameters()) == 4_320_514
    s_logits, s_qkv = student(ids, mask, return_qkv=True)
    last = student.encoder.encoder.layer[-1].attention.self
    assert not (last.query._forward_hooks or last.key._forward_hooks or last.value._forward_hooks)  # removed
    with torch.no_grad():
        t_logits, t_qkv = teacher(ids, mask, return_qkv=True)
    assert s_logits.shape == t_logits.shape == (3, 2)
    assert [tuple(x.shape) for x in t_qkv] == [(3, 24, 384)] * 3
    assert [tuple(x.shape) for x in s_qkv] == [(3, 24, 128)] * 3
    # the captured tensors are the last layer's projections of that layer's input
    with torch.no_grad():
        h = student.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        for proj, got in zip((last.query, last.key, last.value), s_qkv):
            torch.testing.assert_close(proj(h), got)
        torch.testing.assert_close(student(ids, mask), s_logits)
    loss = relation_kd_loss(t_qkv, s_qkv, 32, mask)
    assert torch.isfinite(loss) and loss.item() > 0.01
    loss.backward()
    assert last.query.weight.grad.abs().sum() > 0 and last.value.weight.grad.abs().sum() > 0
    assert relation_kd_loss(t_qkv, t_qkv, 32, mask).item() < 1e-5  # teacher vs itself: no loss


def test_student_round_trips_through_model_io(tok, tmp_path):
    ids, mask = (torch.from_numpy(a) for a in tokenize(SENTENCES, tok, max_length=32))
    torch.manual_seed(1)
    kwargs = {"num_classes": 3, "num_layers": 2, "hidden": 64, "heads": 2, "intermediate": 128}
    model = bert_student(**kwargs).eval()
    loaded, spec = load_model(save_model(model, tmp_path / "s", "bert_student", kwargs))
    assert spec["model"] == "bert_student"
    with pytest.raises(ValueError, match="exceed this encoder's 128 positions"):
        loaded(torch.zeros(1, 129, dtype=torch.long))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), model(ids, mask), rtol=0, atol=0)


def test_minilm_rebuilds_without_pretrained_weights(tok, teacher):
    ids, mask = (torch.from_numpy(a) for a in tokenize(SENTENCES, tok, max_length=16))
    bare = minilm_classifier(num_classes=2, pretrained=False).eval()
    with torch.no_grad():
        assert not torch.allclose(bare.embed(ids, mask), teacher.embed(ids, mask))
        bare.load_state_dict(teacher.state_dict(), strict=True)
        torch.testing.assert_close(bare(ids, mask), teacher(ids, mask), rtol=0, atol=0)
