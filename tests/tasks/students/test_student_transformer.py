"""The transformer student (issue 15): built from a tiny random BERT teacher made here (4 layers, a WordPiece
vocabulary whose pieces split the fixture's words), its layer maps, trimmed vocabulary, losses and training."""

import math

import numpy as np
import pytest
import torch
from slimflow.flows.config import TransformerConfig
from slimflow.tasks.students.losses import (
    attention_mse,
    hidden_mse,
    kl,
    pkd,
    scheduled_temperature,
    scheduled_weight,
    transformer_loss,
)
from slimflow.tasks.students.train import load_student, train_student
from slimflow.tasks.students.transformer import (
    check_layers,
    from_teacher,
    layer_maps,
    teacher_rows,
    theseus_modules,
)
from slimflow.tasks.students.vocab import Vocab, build_vocab_from_shards

LABELS = ["neg", "pos"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# "w17" -> w ##1 ##7; no "##9": every word holding a 9 is [UNK] to the teacher, and so to the student.
PIECES = ["好", "差", "w"] + [f"##{d}" for d in range(9)]


def wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + PIECES)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(fitted teacher dir, the BERT, the tokenizers.Tokenizer JSON): a 4-layer random BERT, `fit: none`."""
    from slimflow.tasks.teacher.fit import adopt_pretrained
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    tok = wordpiece_tokenizer()
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                        id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    teacher_dir = str(root / "teacher")
    adopt_pretrained(teacher_dir, labels=LABELS, model=str(root / "bert"), device="cpu", dtype="fp32")
    return teacher_dir, model, tok.backend_tokenizer.to_str()


def _tok(tok_json):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tok_json)


TEXTS = ["好 w12 w3", "差 w9 w19 w0", "w88 好 差 w7", "", "w1 w2 w3 w4 w5 w6 w7 w8 w10 w11 w12"]


def test_student_with_every_teacher_layer_computes_the_teachers_states(teacher):
    _, bert, tok_json = teacher
    vocab = Vocab.from_texts(TEXTS, unit="subword", lang="en", tokenizer=tok_json)
    student, cfg = from_teacher(bert, _tok(tok_json), vocab.itos, 2, layers=range(4), max_len=32, dropout=0.0)
    student.eval()
    ids, lengths = vocab.encode_texts(TEXTS, 32)
    feats = student.features(torch.from_numpy(ids), torch.from_numpy(lengths))
    enc = [_tok(tok_json).encode(t).ids for t in TEXTS]
    width = max(map(len, enc))
    input_ids = torch.tensor([e + [0] * (width - len(e)) for e in enc])
    mask = (torch.arange(width)[None] < torch.tensor([len(e) for e in enc])[:, None]).long()
    with torch.no_grad():
        out = bert.bert(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    assert feats.mask.sum(1).tolist() == [len(e) for e in enc]
    for k in (0, 2, 4):  # embeddings, a middle layer, the last
        for i, e in enumerate(enc):
            torch.testing.assert_close(feats.hidden[k][i, : len(e)], out.hidden_states[k][i, : len(e)],
                                       atol=1e-5, rtol=1e-5)
    assert cfg["n_layers"] == 4 and cfg["hidden"] == 32 and cfg["max_positions"] == 34


def test_trimmed_vocabulary_encodes_every_text_to_the_same_pieces(teacher):
    _, bert, tok_json = teacher
    full = _tok(tok_json)
    texts = TEXTS + [f"w{i} 好" for i in range(40)]
    vocab = Vocab.from_texts(texts, unit="subword", lang="en", tokenizer=tok_json)
    assert len(vocab) < full.get_vocab_size()  # [MASK], [CLS], [SEP] and the unused "##x" pieces are cut
    rows, cls_id, sep_id = teacher_rows(full, vocab.itos, pad_id=0)
    student, _ = from_teacher(bert, full, vocab.itos, 2, layers=[1, 3], max_len=32)
    back = torch.tensor(rows + [cls_id, sep_id])  # student row -> teacher id
    ids, lengths = vocab.encode_texts(texts, 32)
    with_specials, mask = student.inputs(torch.from_numpy(ids), torch.from_numpy(lengths))
    for i, text in enumerate(texts):
        expect = full.encode(text).ids  # [CLS] pieces [SEP], [UNK] for words with a 9
        assert back[with_specials[i][mask[i]]].tolist() == expect, text
    # and the table rows are the teacher's rows for those pieces
    torch.testing.assert_close(student.embed.weight, bert.bert.embeddings.word_embeddings.weight[back])


def test_layers_the_teacher_does_not_have_fail_with_a_clear_error(teacher):
    _, bert, tok_json = teacher
    with pytest.raises(ValueError, match=r"layer\(s\) \[4, 7\] the teacher does not have: it has 4 layers"):
        from_teacher(bert, _tok(tok_json), ("[PAD]", "[UNK]"), 2, layers=[1, 4, 7], max_len=8)
    with pytest.raises(ValueError, match="strictly increasing"):
        check_layers([2, 1], 4)
    with pytest.raises(ValueError, match="empty"):
        check_layers([], 4)
    with pytest.raises(ValueError, match="exceeds the teacher's 64 positions"):
        from_teacher(bert, _tok(tok_json), ("[PAD]", "[UNK]"), 2, layers=[1], max_len=63)


def test_layer_maps_follow_the_init_layers():
    m = layer_maps([2, 5, 8, 11])
    assert m["hidden"] == [(0, 0), (1, 3), (2, 6), (3, 9), (4, 12)]  # TinyBERT: teacher layer i*k for student i
    assert m["attention"] == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert m["pooled"] == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert theseus_modules([2, 5, 8, 11], 12) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert theseus_modules([0, 2], 4) == [[0], [1, 2, 3]]


# ------------------------------------------------------------------------------------------ losses by hand
def test_hidden_mse_by_hand():
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, False]])
    # (1 + 4 + 9 + 16) / (2 real tokens * 2 dims); the padded token's 9s count for nothing
    assert hidden_mse(s, torch.zeros_like(s), mask).item() == pytest.approx(7.5)


def test_attention_mse_by_hand():
    s = torch.arange(9, dtype=torch.float32).view(1, 1, 3, 3)
    mask = torch.tensor([[True, True, False]])
    # real (query, key) pairs: the top-left 2x2 = 0, 1, 3, 4 -> (0 + 1 + 9 + 16) / (4 pairs * 1 head)
    assert attention_mse(s, torch.zeros_like(s), mask).item() == pytest.approx(6.5)
    two_heads = torch.cat([s, 2 * s], 1)  # second head: 0, 2, 6, 8 -> 104; (26 + 104) / (4 * 2)
    assert attention_mse(two_heads, torch.zeros_like(two_heads), mask).item() == pytest.approx(130 / 8)


def test_pkd_by_hand():
    s = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    # row 1: (0.6, 0.8) - (1, 0) -> 0.16 + 0.64 = 0.8; row 2: same direction -> 0; mean 0.4
    assert pkd(s, t).item() == pytest.approx(0.4)


def test_schedules_by_hand():
    assert scheduled_weight("constant", 2.0, 0.25) == 2.0
    assert scheduled_weight("linear_decay", 2.0, 0.25) == pytest.approx(1.5)
    assert scheduled_weight("linear_growth", 2.0, 0.25) == pytest.approx(0.5)
    assert scheduled_weight("linear_decay", 2.0, 1.7) == 0.0  # clamped at the end of training
    z = torch.zeros(2, 2)
    assert scheduled_temperature("linear_decay", 5.0, 0.5, z, z) == pytest.approx(3.0)
    assert scheduled_temperature("linear_growth", 5.0, 0.25, z, z) == pytest.approx(2.0)
    # flsw: cos(s, t) = 1 -> w = 0; cos = 0 -> w = 1 (gamma 2); tau = T + (mean(w) - w) * beta
    s, t = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(scheduled_temperature("flsw", 4.0, 0.0, s, t, beta=2.0), torch.tensor([5.0, 3.0]))
    # cwsm: p_max 0.5 and 0.75 -> w = 1 / (p_max + 1e-3)
    s = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    w = np.array([1 / 0.501, 1 / 0.751])
    torch.testing.assert_close(scheduled_temperature("cwsm", 1.0, 0.0, s, s),
                               torch.tensor(1.0 + (w.mean() - w), dtype=torch.float32))
    with pytest.raises(ValueError, match="linear_decay"):
        scheduled_weight("cosine", 1.0, 0.5)


def test_kl_with_per_row_temperatures_matches_the_scalar_one():
    torch.manual_seed(0)
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    assert kl(s, t, torch.full((5,), 3.0)).item() == pytest.approx(kl(s, t, 3.0).item(), rel=1e-6)
    # per row: each row's KL at its own T, times its T^2, then the mean
    temps = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    by_row = [kl(s[i : i + 1], t[i : i + 1], float(temps[i])).item() for i in range(5)]
    assert kl(s, t, temps).item() == pytest.approx(sum(by_row) / 5, rel=1e-6)


def test_transformer_loss_sums_the_weighted_parts(teacher):
    _, bert, tok_json = teacher
    vocab = Vocab.from_texts(TEXTS, unit="subword", lang="en", tokenizer=tok_json)
    s_model, cfg = from_teacher(bert, _tok(tok_json), vocab.itos, 2, layers=[1, 3], max_len=32, dropout=0.0)
    t_model, _ = from_teacher(bert, _tok(tok_json), vocab.itos, 2, layers=range(4), max_len=32, dropout=0.0)
    ids, lengths = (torch.from_numpy(a) for a in vocab.encode_texts(TEXTS, 32))
    fs, ft = s_model.features(ids, lengths), t_model.features(ids, lengths)
    logits_t, labels = torch.tensor([[1.0, -1.0]] * 5), torch.tensor([0, 1, 0, 1, 1])
    maps = layer_maps([1, 3])
    w = {"kl": 0.5, "mse": 2.0, "hidden_mse": 3.0, "attention_mse": 0.1, "pkd": 7.0}
    total, parts = transformer_loss(w, fs.logits, logits_t, labels, temperature=2.0, hard_label_weight=0.25,
                                    feats_s=fs, feats_t=ft, maps=maps)
    hid = sum(hidden_mse(fs.hidden[i], ft.hidden[j], fs.mask) for i, j in [(0, 0), (1, 2), (2, 4)]) / 3
    att = sum(attention_mse(fs.scores[i], ft.scores[j], fs.mask) for i, j in [(0, 1), (1, 3)]) / 2
    pk = sum(pkd(fs.pooled[i], ft.pooled[j]) for i, j in [(1, 2), (2, 4)]) / 2
    assert hid.item() == pytest.approx(parts["hidden_mse"], rel=1e-5) and hid.item() > 0
    assert parts["hidden_mse"] != pytest.approx(0.0)
    ce = torch.nn.functional.cross_entropy(fs.logits, labels)
    expect = (0.5 * kl(fs.logits, logits_t, 2.0) + 2.0 * torch.nn.functional.mse_loss(fs.logits, logits_t)
              + 3.0 * hid + 0.1 * att + 7.0 * pk + 0.25 * ce)
    assert total.item() == pytest.approx(expect.item(), rel=1e-5)
    assert set(parts) == {"kl", "mse", "hidden_mse", "attention_mse", "pkd", "hard_ce"}
    # the student's embeddings are the teacher's (pair 0 -> 0 contributes nothing); its layers are not yet
    assert hidden_mse(fs.hidden[0], ft.hidden[0], fs.mask).item() == pytest.approx(0.0, abs=1e-12)
    assert hidden_mse(fs.hidden[1], ft.hidden[2], fs.mask).item() > 1e-6


# ------------------------------------------------------------------------------------------------ training
class Interrupt(Exception):
    pass


@pytest.fixture
def data(make_shards, teacher):
    run_dir, train = make_shards("labelled", n_shards=2, rows=24, split="train", seed=0)
    _, dev = make_shards("segment", n_shards=1, rows=16, split="dev", seed=1)
    vocab = build_vocab_from_shards(run_dir, train, unit="subword", lang="en", tokenizer=teacher[2])
    return run_dir, train, dev, vocab


def _settings(**kw):
    return {**TransformerConfig(layers=[1, 3], max_len=16, epochs=2, patience=5, batch_size=8, lr=1e-3,
                                shuffle_buffer=16, device="cpu", threads=1).model_dump(mode="json"), **kw}


def _train(data, teacher, out_dir, mode="distilled", on_epoch_end=None, **kw):
    run_dir, train, dev, vocab = data
    return train_student(run_dir, kind="transformer", mode=mode, train_refs=train, dev_refs=dev, vocab=vocab,
                         labels=LABELS, out_dir=str(out_dir), transformer=_settings(**kw), teacher_dir=teacher[0],
                         on_epoch_end=on_epoch_end)


def _weights(out_dir, name="last.pt"):
    return torch.load(f"{out_dir}/{name}", weights_only=True)["model"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


EVERY_LOSS = {"kl": 1.0, "mse": 0.5, "ce": 0.1, "hidden_mse": 1.0, "attention_mse": 0.01, "pkd": 10.0}


@pytest.mark.parametrize("kw", [
    {"losses": EVERY_LOSS, "hard_label_weight": 0.5, "hard_label_weight_schedule": "linear_decay",
     "temperature": 4.0, "temperature_schedule": "flsw", "kd_weight_schedule": "linear_growth"},
    {"losses": {"kl": 1.0}, "temperature": 2.0, "temperature_schedule": "cwsm"},
    {"losses": {"kl": 1.0}, "method": "theseus", "theseus_rate": 0.5},
], ids=["every-loss", "kl-cwsm", "theseus"])
def test_every_loss_and_theseus_train_a_tiny_random_bert_student(data, teacher, tmp_path, kw):
    res = _train(data, teacher, tmp_path / "s", **kw)
    assert res["epochs_run"] == 2 and res["kind"] == "transformer"
    parts = res["history"][-1]["train_parts"]
    expect = set(kw["losses"]) | ({"hard_ce"} if kw.get("hard_label_weight") else set())
    assert set(parts) == expect and all(math.isfinite(v) for v in parts.values())
    model, vocab, labels, cfg = load_student(str(tmp_path / "s"))
    assert cfg["layers"] == [1, 3] and len(model.layers) == 2 and labels == LABELS
    ids, lengths = vocab.encode_texts(["好 w1", "差 w2 w3"], cfg["max_len"])
    assert model(torch.from_numpy(ids), torch.from_numpy(lengths)).shape == (2, 2)
    # the student moved away from its teacher-layer init
    init, _ = from_teacher(__import__("transformers").AutoModelForSequenceClassification.from_pretrained(
        f"{teacher[0]}/../bert"), _tok(teacher[2]), vocab.itos, 2, layers=[1, 3], max_len=16)
    assert not torch.equal(init.layers[0].query.weight, model.layers[0].query.weight)


def test_theseus_at_rate_one_is_the_student_alone_and_at_rate_zero_trains_no_student_layer(data, teacher, tmp_path):
    plain = {"losses": {"kl": 1.0}, "dropout": 0.0, "epochs": 1}
    _train(data, teacher, tmp_path / "distill", **plain)
    _train(data, teacher, tmp_path / "one", method="theseus", theseus_rate=1.0, theseus_slope=0.0, **plain)
    assert _same(_weights(tmp_path / "distill"), _weights(tmp_path / "one"))
    _train(data, teacher, tmp_path / "zero", method="theseus", theseus_rate=0.0, theseus_slope=0.0, **plain)
    w0 = _weights(tmp_path / "zero")
    init = torch.load(f"{tmp_path}/zero/best.pt", weights_only=True)  # 1 epoch: best is last
    assert _same(w0, init["model"])
    bert_l1 = teacher[1].bert.encoder.layer[1].attention.self.query.weight
    torch.testing.assert_close(w0["layers.0.query.weight"], bert_l1)  # never used, never moved
    assert not torch.equal(w0["out.weight"], _weights(tmp_path / "one")["out.weight"])


def test_theseus_rate_reaches_one_two_thirds_in_whatever_the_run_length_unless_a_slope_is_given():
    from slimflow.tasks.students.transformer_train import theseus_rate

    for total in (63, 1300, 100_000):  # the bench's comparison, its final training, a big corpus
        ramp = round(total * 2 / 3)
        assert theseus_rate(0, total, 0.3, None) == pytest.approx(0.3)
        assert theseus_rate(ramp // 2, total, 0.3, None) == pytest.approx(0.65, abs=0.02)
        assert theseus_rate(ramp - 1, total, 0.3, None) < 1.0
        assert theseus_rate(ramp + 1, total, 0.3, None) == theseus_rate(total, total, 0.3, None) == 1.0
    assert theseus_rate(500, 1300, 0.3, 0.0) == 0.3  # 0: constant
    assert theseus_rate(500, 1300, 0.3, 6e-4) == pytest.approx(0.6)  # Xu et al.'s per-step slope, given
    assert theseus_rate(5000, 1300, 0.3, 6e-4) == 1.0


def test_settings_of_another_method_do_not_key_a_training(data, teacher, tmp_path):
    first = _train(data, teacher, tmp_path / "a", losses={"kl": 1.0}, epochs=1)
    again = _train(data, teacher, tmp_path / "a", losses={"kl": 1.0}, epochs=1, theseus_rate=0.9, theseus_slope=0.0)
    assert again["fingerprint"] == first["fingerprint"]  # the finished training is reused, not redone
    other = _train(data, teacher, tmp_path / "b", losses={"kl": 1.0}, epochs=1, method="theseus")
    changed = _train(data, teacher, tmp_path / "c", losses={"kl": 1.0}, epochs=1, method="theseus", theseus_rate=0.9)
    assert other["fingerprint"] != changed["fingerprint"]


@pytest.mark.parametrize("kw", [{"losses": {"kl": 1.0, "hidden_mse": 1.0, "attention_mse": 0.1}},
                                {"losses": {"kl": 1.0}, "method": "theseus", "theseus_rate": 0.4},
                                {"losses": {"kl": 1.0, "attention_mse": 0.1}, "width": 0.5}],
                         ids=["features", "theseus", "pruned"])
def test_resume_from_a_checkpoint_gives_the_weights_of_an_uninterrupted_run(data, teacher, tmp_path, kw):
    kw = {**kw, "epochs": 3, "dropout": 0.2}
    straight = _train(data, teacher, tmp_path / "straight", **kw)

    def stop_after_first(entry):
        if entry["epoch"] == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        _train(data, teacher, tmp_path / "resumed", on_epoch_end=stop_after_first, **kw)
    assert torch.load(f"{tmp_path}/resumed/last.pt", weights_only=True)["epoch"] == 1
    resumed = _train(data, teacher, tmp_path / "resumed", **kw)
    assert _same(_weights(tmp_path / "straight"), _weights(tmp_path / "resumed"))
    assert _same(_weights(tmp_path / "straight", "best.pt"), _weights(tmp_path / "resumed", "best.pt"))
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in straight["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in resumed["history"]]


def test_baseline_mode_trains_on_gold_labels_and_a_words_vocabulary_is_refused(data, teacher, tmp_path):
    res = _train(data, teacher, tmp_path / "b", mode="baseline", epochs=1)
    assert set(res["history"][0]["train_parts"]) == {"ce"}
    run_dir, train, dev, _ = data
    words = build_vocab_from_shards(run_dir, train)
    with pytest.raises(ValueError, match="subword"):
        _train((run_dir, train, dev, words), teacher, tmp_path / "w")


def test_blockwise_down_projections_are_measured_and_only_kept_when_faithful(data, teacher, tmp_path, monkeypatch):
    """The down-projections' blockwise int8 is a measured choice: refused when it deviates more than the fp32-down
    file (a threshold of 0 here), and when the deviation allows it, kept exactly when it ran faster."""
    import onnx
    from slimflow.tasks.students import export as ex

    _train(data, teacher, tmp_path / "t", epochs=1)
    monkeypatch.setattr(ex, "DOWN_MAX_DEVIATION", 0.0)
    meta = ex.export_student(str(tmp_path / "t"), str(tmp_path / "export"), lang="en")
    down = meta["int8"]["down_projections"]
    assert down["chosen"] is False and down["as"] == "fp32" and down["deviation"] > 0
    int8_path = str(tmp_path / "export" / "model.int8.onnx")
    before = open(int8_path, "rb").read()
    nodes = ex.down_projections(str(tmp_path / "export" / "model.onnx"))
    inputs = ex._probe_inputs(meta["model"]["vocab_size"], meta["max_len"])
    reference = ex._probabilities(str(tmp_path / "export" / "model.onnx"), inputs)
    monkeypatch.setattr(ex, "DOWN_MAX_DEVIATION", float("inf"))
    rec = ex.blockwise_down_projections(int8_path, nodes, str(tmp_path / "cand.onnx"), inputs, reference, 1.0)
    assert rec["chosen"] == (rec["speedup_over_fp32_down"] > 1.0)
    ops = [n.op_type for n in onnx.load(int8_path).graph.node]
    assert (ops.count("MatMulNBits") == len(nodes)) == rec["chosen"]
    assert rec["chosen"] or open(int8_path, "rb").read() == before
    assert np.abs(ex._probabilities(int8_path, inputs) - reference).max() < 0.05


def test_every_export_of_one_checkpoint_ships_the_int8_choices_measured_first(data, teacher, tmp_path, monkeypatch):
    """The evaluate stage exports again to measure: timings that would now choose otherwise must not give it
    another file than the export stage's. A new checkpoint is measured afresh."""
    import json

    from slimflow.tasks.students import export as ex

    _train(data, teacher, tmp_path / "t", epochs=1)
    monkeypatch.setattr(ex, "DOWN_MAX_DEVIATION", 0.0)  # refused: fp32 down-projections
    first = ex.export_student(str(tmp_path / "t"), str(tmp_path / "e1"), lang="en")
    assert first["int8"]["down_projections"]["chosen"] is False
    # now blockwise would be kept: faithful enough and timed faster
    monkeypatch.setattr(ex, "DOWN_MAX_DEVIATION", float("inf"))
    monkeypatch.setattr(ex, "_seconds", lambda path, inputs: 0.5 if "blockwise" in path else 1.0)
    again = ex.export_student(str(tmp_path / "t"), str(tmp_path / "e2"), lang="en")
    assert again["int8"] == first["int8"]
    assert (tmp_path / "e2" / "model.int8.onnx").read_bytes() == (tmp_path / "e1" / "model.int8.onnx").read_bytes()
    record = tmp_path / "t" / ex.INT8_RECORD
    record.write_text(json.dumps({**json.loads(record.read_text()), "best_sha256": "another checkpoint"}))
    fresh = ex.export_student(str(tmp_path / "t"), str(tmp_path / "e3"), lang="en")
    assert fresh["int8"]["down_projections"]["chosen"] is True
    assert json.loads(record.read_text())["int8"] == fresh["int8"]


def test_onnx_export_agrees_with_pytorch_and_the_predictor_serves_it_int8(data, teacher, tmp_path):
    import os

    from slimflow.tasks.students.export import Predictor, export_student, predict_lines

    _train(data, teacher, tmp_path / "t", epochs=1)
    meta = export_student(str(tmp_path / "t"), str(tmp_path / "export"), lang="en")
    files = set(meta["files"])
    assert {"model.onnx", "model.int8.onnx", "model.bf16.ts", "vocab.json", "vocab.tokenizer.json",
            "labels.json"} <= files
    assert "model.ts" not in files
    assert os.path.getsize(tmp_path / "export" / "model.int8.onnx") < os.path.getsize(tmp_path / "export" /
                                                                                     "model.onnx")
    # the int8 weight type was measured, and the one shipped is the one the rule picks from the figures recorded
    from slimflow.tasks.students.export import INT8_WEIGHTS, choose_int8

    int8 = meta["int8"]
    assert set(int8["deviation"]) == set(INT8_WEIGHTS) and all(0 <= d < 0.5 for d in int8["deviation"].values())
    # each layer's FFN down-projection (intermediate -> hidden) is not quantised per call: it stays fp32, or runs
    # as blockwise int8 (MatMulNBits) where that measured faster and as faithful; every other layer MatMul is int8
    import onnx

    graph = onnx.load(str(tmp_path / "export" / "model.int8.onnx")).graph
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    fp32_mm = [n for n in graph.node if n.op_type == "MatMul" and any(len(shapes.get(x, ())) == 2 for x in n.input)]
    blockwise = [n for n in graph.node if n.op_type == "MatMulNBits"]
    down = int8["down_projections"]
    assert down["as"] == ("int8 blockwise" if down["chosen"] else "fp32")
    if down["chosen"]:
        assert int8["fp32_matmuls"] == len(fp32_mm) == 0 and len(blockwise) == meta["model"]["n_layers"]
        assert all({a.name: a.i for a in n.attribute}["K"] > {a.name: a.i for a in n.attribute}["N"]
                   for n in blockwise)
    else:
        assert int8["fp32_matmuls"] == len(fp32_mm) == meta["model"]["n_layers"] and not blockwise
        assert all(shapes[x][0] > shapes[x][1] for n in fp32_mm for x in n.input if len(shapes.get(x, ())) == 2)
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.node)
    assert int8["weights"] == choose_int8(int8["deviation"])
    model, vocab, _, cfg = load_student(str(tmp_path / "t"))
    texts = ["好 w12 w3", "差 w9 w19 w0 w4", "", "w1 " * 40, "w88 好 差 w7"]  # empty, and one cut at max_len
    ids, lengths = vocab.encode_texts(texts, cfg["max_len"])
    with torch.no_grad():
        expect = torch.softmax(model(torch.from_numpy(ids), torch.from_numpy(lengths)), -1).numpy()
    fp32 = Predictor(str(tmp_path / "export"), backend="onnx")
    np.testing.assert_allclose(fp32.predict_proba(texts), expect, atol=1e-5)
    served = Predictor(str(tmp_path / "export"))
    assert served.backend == meta["serve"]["backend"] in ("onnx_int8", "torchscript_bf16")  # as measured
    np.testing.assert_allclose(served.predict_proba(texts), expect, atol=0.05)
    for backend in ("onnx_int8", "torchscript_bf16"):
        np.testing.assert_allclose(Predictor(str(tmp_path / "export"), backend=backend).predict_proba(texts),
                                   expect, atol=0.05)
    lines = list(predict_lines(str(tmp_path / "export"), texts[:2]))
    assert [ln.split("\t")[1] in LABELS for ln in lines] == [True, True]


def test_the_bf16_torchscript_file_runs_new_sizes_like_the_eager_model(data, teacher, tmp_path):
    """Traced, not scripted: the trace must not have frozen the example's batch or length."""
    from slimflow.tasks.students import export as ex

    _train(data, teacher, tmp_path / "t", epochs=1)
    model = load_student(str(tmp_path / "t"))[0]
    path = str(tmp_path / "model.bf16.ts")
    ex.export_torchscript_bf16(model, path)
    traced = torch.jit.load(path)
    assert next(model.parameters()).dtype == torch.float32  # the export casts a copy
    g = torch.Generator().manual_seed(0)
    for b, t in ((1, 3), (5, 16), (3, 9)):  # up to the max_len of 16 it trained with
        ids = torch.randint(2, model.cls_id, (b, t), generator=g)
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        with torch.inference_mode():
            got, want = traced(ids, lengths), model(ids, lengths)
        assert got.dtype == torch.float32 and got.shape == want.shape
        np.testing.assert_allclose(torch.softmax(got, -1).numpy(), torch.softmax(want, -1).numpy(), atol=0.03)


@pytest.mark.parametrize("slow", ["onnx_int8", "torchscript_bf16"])
def test_the_served_file_is_the_one_measured_faster_and_every_export_keeps_it(data, teacher, tmp_path, monkeypatch,
                                                                               slow):
    from slimflow.tasks.students import export as ex

    _train(data, teacher, tmp_path / "t", epochs=1)
    monkeypatch.setattr(ex, "_seconds", lambda path, inputs: 1.0 if slow == "onnx_int8" else 0.01)
    monkeypatch.setattr(ex, "_ts_seconds", lambda path, inputs: 1.0 if slow == "torchscript_bf16" else 0.01)
    monkeypatch.setattr(ex, "DOWN_MAX_DEVIATION", float("inf"))  # fidelity aside: this is about speed
    meta = ex.export_student(str(tmp_path / "t"), str(tmp_path / "e1"), lang="en")
    fast = "torchscript_bf16" if slow == "onnx_int8" else "onnx_int8"
    assert meta["serve"]["backend"] == fast and meta["serve"]["seconds"][slow] == 1.0
    assert ex.Predictor(str(tmp_path / "e1")).backend == fast
    # timings that would now choose the other: the same checkpoint keeps its first choice
    monkeypatch.setattr(ex, "_seconds", lambda path, inputs: 0.01 if slow == "onnx_int8" else 1.0)
    monkeypatch.setattr(ex, "_ts_seconds", lambda path, inputs: 0.01 if slow == "torchscript_bf16" else 1.0)
    assert ex.export_student(str(tmp_path / "t"), str(tmp_path / "e2"), lang="en")["serve"] == meta["serve"]
    # bf16 is refused where it deviates from fp32 more than int8 does, however fast
    monkeypatch.setattr(ex, "_seconds", lambda path, inputs: 1.0)
    monkeypatch.setattr(ex, "_ts_seconds", lambda path, inputs: 0.01)
    monkeypatch.setattr(ex, "DOWN_MAX_DEVIATION", 0.0)
    model = load_student(str(tmp_path / "t"))[0]
    served = ex.choose_served(model, str(tmp_path / "e1"), model.cls_id, 16, meta["int8"])
    assert served["backend"] == "onnx_int8" and served["deviation"]["bf16"] > 0


def test_an_export_timed_on_another_machine_is_timed_again_where_it_is_served(data, teacher, tmp_path, monkeypatch):
    import json

    from slimflow.tasks.students import export as ex

    _train(data, teacher, tmp_path / "t", epochs=1)
    monkeypatch.setattr(ex, "_seconds", lambda path, inputs: 1.0)
    monkeypatch.setattr(ex, "_ts_seconds", lambda path, inputs: 0.01)
    monkeypatch.setattr(ex, "DOWN_MAX_DEVIATION", float("inf"))
    export = tmp_path / "e"
    assert ex.export_student(str(tmp_path / "t"), str(export), lang="en")["serve"]["backend"] == "torchscript_bf16"

    def no_timing(call, runs=5):
        raise AssertionError("timed again on the machine that exported it")

    monkeypatch.setattr(ex, "_best_of", no_timing)
    assert ex.Predictor(str(export)).backend == "torchscript_bf16"
    meta = json.loads((export / "student.json").read_text())
    meta["serve"]["machine"] = {"cpu": "another CPU", "cpu_capability": "AVX2", "flags": []}
    (export / "student.json").write_text(json.dumps(meta))
    timed = []

    def int8_faster(call, runs=5):  # bf16 emulated there: int8 is the faster file
        timed.append(call())
        return 0.01 if len(timed) == 1 else 1.0

    monkeypatch.setattr(ex, "_best_of", int8_faster)
    p = ex.Predictor(str(export))
    assert p.backend == "onnx_int8" and len(timed) == 2  # both files ran on the probe here
    assert p.meta["serve"]["machine"] == ex.serving_machine()
    assert ex.Predictor(str(export), backend="torchscript_bf16").backend == "torchscript_bf16"  # asked for: kept


def test_config_section_names_the_valid_losses_and_reads_subwords():
    from pydantic import ValidationError
    from slimflow.flows.config import StudentConfig

    with pytest.raises(ValidationError, match="'mse', 'kl', 'ce', 'hidden_mse', 'attention_mse' or 'pkd'"):
        TransformerConfig(losses={"kl": 1.0, "hiden_mse": 1.0})
    with pytest.raises(ValidationError, match="at least one > 0"):
        TransformerConfig(losses={"kl": 0.0})
    assert TransformerConfig().layers == [2, 5, 8, 11]
    assert StudentConfig(unit="words").unit_of("transformer", "zh") == "subword"


def test_the_int8_weight_type_is_the_more_faithful_one_unless_both_are():
    from slimflow.tasks.students.export import choose_int8

    # U8S8 saturating (as on x86 without VNNI: 0.042 against 0.014 on the bench's student): U8U8 is shipped
    assert choose_int8({"int8": 0.042, "uint8": 0.014}) == "uint8"
    # both faithful: U8S8, the kernel VNNI / AMX run natively
    assert choose_int8({"int8": 0.010, "uint8": 0.009}) == "int8"
    assert choose_int8({"int8": 0.010, "uint8": 0.020}) == "int8"


@pytest.mark.parametrize("amp", ["bf16", "fp32"])
def test_training_runs_under_the_measured_autocast_dtype_and_keys_it(data, teacher, tmp_path, monkeypatch, amp):
    """The probe's dtype (injected here) is the autocast of every step, recorded, and part of the fingerprint:
    a run made under another dtype is not taken for this one's."""
    from slimflow.tasks.students import transformer_train as tt

    seen = []
    real = tt._step_loss

    def spy(model, batch, step, ctx):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return real(model, batch, step, ctx)

    other = "fp32" if amp == "bf16" else "bf16"
    monkeypatch.setattr(tt, "_step_loss", spy)
    monkeypatch.setattr(tt, "_precision", lambda *a: {"requested": "auto", "dtype": other, "device": "cpu"})
    first = _train(data, teacher, tmp_path / "s", losses={"kl": 1.0}, epochs=1)
    monkeypatch.setattr(tt, "_precision", lambda *a: {"requested": "auto", "dtype": amp, "device": "cpu"})
    seen.clear()
    res = _train(data, teacher, tmp_path / "s", losses={"kl": 1.0}, epochs=1)
    assert seen and set(seen) == {torch.bfloat16 if amp == "bf16" else torch.float32}  # trained again, in amp
    assert res["params"]["amp"] == amp and res["precision"]["dtype"] == amp
    assert res["fingerprint"] != first["fingerprint"]


# ------------------------------------------------------------------------------------- width pruning (prune.py)
def _student_and_batches(data, teacher, n=3):
    from slimflow.tasks.students.data import ShardStream

    run_dir, train, _, vocab = data
    model, cfg = from_teacher(teacher[1], _tok(teacher[2]), vocab.itos, 2, layers=[1, 3], max_len=16, dropout=0.0)
    stream = ShardStream(run_dir, train, mode="distilled", vocab=vocab, labels=LABELS, batch_size=8, max_len=16,
                         shuffle=False)
    return model, cfg, list(stream.epoch(0))[:n]


def _kl(m, b):
    return kl(m(torch.from_numpy(b.ids), torch.from_numpy(b.lengths)), torch.from_numpy(b.logits_t))


def test_importance_is_the_loss_gradient_of_a_mask_on_each_head_and_neuron(data, teacher):
    from slimflow.tasks.students.prune import importance

    model, _, batches = _student_and_batches(data, teacher)
    heads, neurons = importance(model, batches, _kl)
    layer = model.layers[1]
    d = layer.head_dim
    # by hand: dL/d(xi) at xi = 1 of a multiplier xi on one head's (one neuron's) output, |.| summed over batches
    for kind, unit, width in (("head", 2, d), ("neuron", 5, 1)):
        total = 0.0
        for b in batches:
            xi = torch.ones((), requires_grad=True)
            lin = layer.attn_out if kind == "head" else layer.ffn_out
            param = lin.weight
            other = torch.ones(param.size(1))  # 0 on the columns that read the unit's output
            other[unit * width : (unit + 1) * width] = 0
            del lin.weight  # a plain tensor in its place: the unit's columns times xi
            lin.weight = param.detach() * other + param.detach() * (1 - other) * xi
            (g,) = torch.autograd.grad(_kl(model, b), xi)
            del lin.weight
            lin.weight = param
            total += abs(float(g))
        got = heads[1][unit] if kind == "head" else neurons[1][unit]
        assert float(got) == pytest.approx(total, rel=1e-4, abs=1e-9)


def test_pruning_keeps_the_top_heads_and_neurons_and_equals_the_full_student_with_the_rest_masked(data, teacher):
    from slimflow.tasks.students.prune import importance, prune
    from slimflow.tasks.students.transformer import build_from_config

    model, cfg, batches = _student_and_batches(data, teacher)
    with torch.no_grad():  # a dead head (0 of layer 0) and a dead neuron (7 of layer 1) must go first
        d = model.layers[0].head_dim
        model.layers[0].attn_out.weight[:, :d] = 0
        model.layers[1].ffn_out.weight[:, 7] = 0
    heads, neurons = importance(model, batches, _kl)
    assert heads[0][0] == 0 and neurons[1][7] == 0
    small, small_cfg = prune(model, cfg, heads, neurons, 0.5)
    assert (small_cfg["heads"], small_cfg["ffn"], small_cfg["head_dim"]) == (2, 32, d)
    assert all(len(k) == 2 and k == sorted(k) for k in small_cfg["kept_heads"]) and 0 not in small_cfg["kept_heads"][0]
    # the pruned student computes exactly what the full one does with the dropped heads' and neurons' outputs zeroed
    masked = build_from_config(cfg)
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for i, layer in enumerate(masked.layers):
            keep_h = set(small_cfg["kept_heads"][i])
            for h in set(range(layer.heads)) - keep_h:
                layer.attn_out.weight[:, h * d : (h + 1) * d] = 0
            keep_n = set(neurons[i].topk(32).indices.tolist())
            for n in set(range(layer.ffn_in.out_features)) - keep_n:
                layer.ffn_out.weight[:, n] = 0
        assert 7 not in set(neurons[1].topk(32).indices.tolist())
        b = batches[0]
        ids, lengths = torch.from_numpy(b.ids), torch.from_numpy(b.lengths)
        torch.testing.assert_close(small.eval()(ids, lengths), masked.eval()(ids, lengths), atol=1e-5, rtol=1e-5)
    # rebuilt from its config (as load_student does), it has the pruned shapes
    again = build_from_config(small_cfg)
    again.load_state_dict(small.state_dict())
    assert again.layers[0].query.weight.shape == (2 * d, cfg["hidden"])


def test_a_pruned_student_trains_exports_and_serves(data, teacher, tmp_path):
    from slimflow.tasks.students.export import Predictor, export_student

    res = _train(data, teacher, tmp_path / "t", epochs=1, width=0.5,
                 losses={"kl": 1.0, "hidden_mse": 1.0, "attention_mse": 0.1})
    assert res["params"]["width"] == 0.5 and set(res["history"][0]["train_parts"]) == {"kl", "hidden_mse",
                                                                                        "attention_mse"}
    full = _train(data, teacher, tmp_path / "f", epochs=1, losses={"kl": 1.0, "hidden_mse": 1.0, "attention_mse": 0.1})
    assert "width" not in full["params"] and full["fingerprint"] != res["fingerprint"]
    model, vocab, _, cfg = load_student(str(tmp_path / "t"))
    assert (cfg["heads"], cfg["ffn"], len(cfg["kept_heads"])) == (2, 32, 2)
    assert model.layers[0].ffn_in.weight.shape == (32, cfg["hidden"])
    export_student(str(tmp_path / "t"), str(tmp_path / "export"), lang="en")
    texts = ["好 w12 w3", "差 w9 w19 w0 w4", "", "w1 " * 40]
    ids, lengths = vocab.encode_texts(texts, cfg["max_len"])
    with torch.no_grad():
        expect = torch.softmax(model(torch.from_numpy(ids), torch.from_numpy(lengths)), -1).numpy()
    np.testing.assert_allclose(Predictor(str(tmp_path / "export"), backend="onnx").predict_proba(texts), expect,
                               atol=1e-5)


def test_width_outside_zero_to_one_is_refused_with_the_range():
    from pydantic import ValidationError
    from slimflow.tasks.students.prune import kept_counts

    for bad in (0, 1.5):
        with pytest.raises(ValidationError):
            TransformerConfig(width=bad)
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            kept_counts(12, 1536, bad)
    assert kept_counts(12, 1536, 2 / 3) == (8, 1024) and kept_counts(12, 1536, 1.0) == (12, 1536)
    assert kept_counts(4, 64, 0.01) == (1, 1)
