import pytest
from slimflow.storage.schema import PAD, UNK
from slimflow.tasks.students.vocab import PAD_ID, UNK_ID, Vocab, build_vocab_from_shards, pad_batch


def test_build_orders_by_count_then_word_and_applies_min_count_and_max_size():
    lists = [["b", "a", "c"], ["a", "c"], ["a", "d"], [UNK, "e"]]
    v = Vocab.build(lists, min_count=2)
    assert v.itos == (PAD, UNK, "a", "c")  # a:3, c:2; b, d, e seen once; [UNK] in the rows is not re-added
    assert Vocab.build(lists, max_size=4).itos == (PAD, UNK, "a", "c")
    assert Vocab.build(lists).itos[2:] == ("a", "c", "b", "d", "e")
    assert v.stoi[PAD] == PAD_ID == 0 and v.stoi[UNK] == UNK_ID == 1


def test_encode_maps_unknown_to_unk_and_cuts_at_max_len():
    v = Vocab.build([["x", "y"]])
    assert v.encode(["y", "zzz", "x", UNK, "x"], max_len=4) == [v.stoi["y"], UNK_ID, v.stoi["x"], UNK_ID]
    assert v.encode([], max_len=4) == []


def test_lowercase_folds_case_at_build_and_encode():
    v = Vocab.build([["Good", "good", "BAD"]], lowercase=True)
    assert "Good" not in v.stoi and v.itos[2:] == ("good", "bad")
    assert v.encode(["GOOD", UNK], 5) == [v.stoi["good"], UNK_ID]


def test_lowercase_keeps_special_tokens_out_of_the_words():
    v = Vocab.build([["A", UNK, UNK, PAD]], lowercase=True)
    assert v.itos == (PAD, UNK, "a")


@pytest.mark.parametrize("lowercase", [False, True])
def test_encode_batch_equals_padded_encode(lowercase):
    import random

    rng = random.Random(0)
    pool = ["a", "B", "c", "D", UNK, "zz", "Q"]
    v = Vocab.build([pool[:4]], lowercase=lowercase)
    for _ in range(50):
        lists = [[rng.choice(pool) for _ in range(rng.randint(0, 9))] for _ in range(rng.randint(1, 6))]
        ids, lengths = v.encode_batch(lists, max_len=5)
        want_ids, want_lengths = pad_batch([v.encode(w, 5) for w in lists])
        assert ids.tolist() == want_ids.tolist() and lengths.tolist() == want_lengths.tolist()
    assert v.encode(["b", "B"], 5) == ([v.stoi["b"]] * 2 if lowercase else [UNK_ID, v.stoi["B"]])


def test_save_load_round_trip(tmp_path):
    v = Vocab.build([["好", "差", "好"]], lowercase=True)
    v.save(str(tmp_path / "vocab.json"))
    w = Vocab.load(str(tmp_path / "vocab.json"))
    assert w == v and w.stoi == v.stoi and w.fingerprint == v.fingerprint


def test_invalid_vocab_raises():
    with pytest.raises(ValueError, match="must start with"):
        Vocab(itos=("a", "b"))
    with pytest.raises(ValueError, match="max_size"):
        Vocab.build([["a"]], max_size=2)


def test_pad_batch_pads_to_longest_and_at_least_one():
    ids, lengths = pad_batch([[5, 6, 7], [], [8]])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 0], [8, 0, 0]] and lengths.tolist() == [3, 0, 1]
    ids, lengths = pad_batch([[]])
    assert ids.shape == (1, 1) and lengths.tolist() == [0]


def test_build_from_shards_streams_the_words_column(make_shards):
    run_dir, refs = make_shards("segment", n_shards=2, rows=10)
    v = build_vocab_from_shards(run_dir, refs)
    assert {"好", "差"} <= set(v.itos) and v.itos[:2] == (PAD, UNK)
