"""Tier 1: data sources, the deterministic split, batch sampling and named errors."""

import numpy as np
import pytest
import torch

from moesaic.trainer.data import DataConfig, check_vocab, load_corpus, sample_batch


def test_stdlib_split_is_by_file_and_deterministic():
    cfg = DataConfig(max_bytes=3_000_000)
    a, b = load_corpus(cfg), load_corpus(cfg)
    assert a.is_bytes and a.train.dtype == np.uint8
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert 0.01 < len(a.val) / (len(a.train) + len(a.val)) < 0.2
    assert 3.0 < a.unigram_bpb() < 6.0  # Python source: bytes are far from uniform (8 bits)


def test_unigram_entropy_hand_computed():
    from moesaic.trainer.data import Corpus

    c = Corpus(np.zeros(4, np.uint8), np.array([0, 0, 1, 2], np.uint8), "x", True)
    assert c.unigram_bpb() == pytest.approx(1.5)  # p = 1/2, 1/4, 1/4


def test_text_file_and_folder(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello world\n" * 500)
    c = load_corpus(DataConfig(source="text", path=str(f), seq_len=16))
    assert len(c.train) + len(c.val) == 6000 and len(c.val) == 300
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i}.md").write_text(f"doc {i} " * 100)
    c = load_corpus(DataConfig(source="text", path=str(folder), pattern="*.md", seq_len=16, val_percent=20))
    assert len(c.val) > 0 and len(c.train) > len(c.val)


def test_bin_file_and_folder(tmp_path):
    tokens = np.arange(5000, dtype=np.uint16) % 1000
    tokens.tofile(tmp_path / "all.bin")
    c = load_corpus(DataConfig(source="bin", path=str(tmp_path / "all.bin"), seq_len=32))
    assert not c.is_bytes and len(c.train) == 4750 and c.train.dtype == np.uint16
    with pytest.raises(ValueError, match=r"model\.vocab_size \(256\) must be > the largest token id"):
        check_vocab(c, 256)
    check_vocab(c, 1000)
    d = tmp_path / "nano"
    d.mkdir()
    tokens.tofile(d / "train.bin")
    with pytest.raises(ValueError, match=r"is a folder without val\.bin"):
        load_corpus(DataConfig(source="bin", path=str(d), seq_len=32))
    tokens[:100].tofile(d / "val.bin")
    assert len(load_corpus(DataConfig(source="bin", path=str(d), seq_len=32)).val) == 100


def test_empty_and_missing_paths_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"data\.path \('/nope'\) does not exist \(data\.source='text'\)"):
        DataConfig(source="text", path="/nope")
    with pytest.raises(ValueError, match=r"data\.path must be set when data\.source is 'bin'"):
        DataConfig(source="bin")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty or too small"):
        load_corpus(DataConfig(source="text", path=str(empty)))


def test_batches_are_a_function_of_the_stream():
    tokens = np.arange(10_000, dtype=np.uint8)
    x1, y1 = sample_batch(tokens, 4, 16, seed=1, stream=(0, 0, 5))
    x2, _ = sample_batch(tokens, 4, 16, seed=1, stream=(0, 0, 5))
    x3, _ = sample_batch(tokens, 4, 16, seed=1, stream=(0, 1, 5))
    assert x1.equal(x2) and not x1.equal(x3)
    assert x1.shape == (4, 16) and y1[:, :-1].equal(x1[:, 1:])
    # the global batch is the same however it is split over ranks
    whole, _ = sample_batch(tokens, 8, 16, seed=1, stream=(0, 5), rank=0, world_size=1)
    halves = [sample_batch(tokens, 4, 16, seed=1, stream=(0, 5), rank=r, world_size=2)[0] for r in range(2)]
    assert torch.equal(whole, torch.cat(halves))
