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


def test_uint32_tokens_for_large_vocabularies(tmp_path):
    """data.token_dtype=uint32: ids over 65,535 (Llama 3's 128,256-id vocabulary) read back as
    written, in the windows the trainer samples; a file of the wrong size, the wrong dtype's ids and
    the field off data.source=bin are named."""
    tokens = (np.arange(6000, dtype=np.uint32) * 37) % 128_256
    tokens.astype("<u4").tofile(tmp_path / "big.bin")
    c = load_corpus(DataConfig(source="bin", path=str(tmp_path / "big.bin"), token_dtype="uint32", seq_len=32))
    assert c.train.dtype == np.dtype("<u4") and len(c.train) == 5700 and int(c.train.max()) == int(tokens[:5700].max())
    assert np.array_equal(np.asarray(c.val), tokens[5700:])
    check_vocab(c, 128_256)
    x, y = sample_batch(c.train, 4, 32, seed=0, stream=(0,))
    assert int(x.max()) > 65_535 and x.dtype == torch.int64
    assert all(np.array_equal(x[i].numpy(), tokens[s : s + 32]) for i, s in
               enumerate(int(np.flatnonzero(tokens == int(x[i, 0]))[0]) for i in range(4)))
    as16 = load_corpus(DataConfig(source="bin", path=str(tmp_path / "big.bin"), seq_len=32))  # read as uint16
    with pytest.raises(ValueError, match=r"must be > the largest token id .*"):
        check_vocab(as16, 50_000)
    (tmp_path / "odd.bin").write_bytes(b"\0" * 4002)
    with pytest.raises(ValueError, match=r"has 4002 bytes, not a multiple of 4: not a flat uint32 token file"):
        load_corpus(DataConfig(source="bin", path=str(tmp_path / "odd.bin"), token_dtype="uint32"))
    with pytest.raises(ValueError, match=r"data.token_dtype \('int8'\) must be one of 'uint16', 'uint32'"):
        DataConfig(source="bin", path=str(tmp_path / "big.bin"), token_dtype="int8")
    with pytest.raises(ValueError, match=r"data.token_dtype \('uint32'\) applies to data.source=bin only"):
        DataConfig(token_dtype="uint32")
    c = load_corpus(DataConfig(source="bin", path=str(tmp_path / "big.bin"), token_dtype="uint32", seq_len=32))
    with pytest.raises(ValueError, match=rf"model.vocab_size \(65536\) must be > the largest token id in data.path "
                                         rf"\({int(tokens.max())}\); or is data.token_dtype \(uint32\) not the file's\?"):
        check_vocab(c, 65_536)


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
