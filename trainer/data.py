"""Training data: byte-level text (the embedded default is the Python standard library's own
source), or a nanoGPT-style flat `.bin` token file (uint16, or uint32 for vocabularies over 65,536).
Windows are sampled at seeded random offsets, so a batch is a pure function of (seed, rank, step):
resuming needs only the step.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SOURCES = ("stdlib", "text", "bin")
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(kw_only=True)
class DataConfig:
    """Where tokens come from and how they are cut into training windows."""

    source: str = "stdlib"
    """`stdlib` (the Python standard library's .py files, as bytes), `text` (a file or folder of text
    files, as bytes) or `bin` (flat tokens of `token_dtype`: a file, or a folder with train.bin and
    val.bin)."""
    path: str | None = None
    """File or folder for `text` and `bin`; unused for `stdlib`."""
    pattern: str = "**/*"
    """Glob of files to read when `path` is a folder of text files."""
    token_dtype: str = "uint16"
    """data.source=bin: the tokens' type, `uint16` (nanoGPT's; ids below 65,536) or `uint32` (larger
    vocabularies, such as Llama 3's 128,256 or Qwen's 151,936 ids), little-endian."""
    seq_len: int = 128
    """Tokens per training window."""
    val_percent: float = 5.0
    """Share held out for validation: by a hash of each file's path, or the tail of a single file."""
    max_bytes: int = 0
    """Read at most this many bytes of text (0: all)."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source ({self.source!r}) must be one of {', '.join(map(repr, SOURCES))}")
        if self.token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"data.token_dtype ({self.token_dtype!r}) must be one of {', '.join(map(repr, TOKEN_DTYPES))}")
        if self.token_dtype != "uint16" and self.source != "bin":
            raise ValueError(f"data.token_dtype ({self.token_dtype!r}) applies to data.source=bin only, not "
                             f"{self.source!r} (text is read as bytes)")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len ({self.seq_len}) must be >= 2")
        if not 0 < self.val_percent < 100:
            raise ValueError(f"data.val_percent ({self.val_percent}) must be in (0, 100)")
        if self.max_bytes < 0:
            raise ValueError(f"data.max_bytes ({self.max_bytes}) must be >= 0")
        if self.source != "stdlib":
            if not self.path:
                raise ValueError(f"data.path must be set when data.source is {self.source!r}")
            if not Path(self.path).expanduser().exists():
                raise ValueError(f"data.path ({self.path!r}) does not exist (data.source={self.source!r})")


@dataclass
class Corpus:
    train: np.ndarray  # 1-D tokens (uint8 bytes or uint16 ids)
    val: np.ndarray
    name: str
    is_bytes: bool

    def unigram_bpb(self) -> float:
        """Entropy of the validation set's own token distribution, bits per token."""
        counts = np.bincount(self.val, minlength=256).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log2(p)).sum())


def _is_val(rel_path: str, val_percent: float) -> bool:
    h = int.from_bytes(hashlib.sha1(rel_path.encode()).digest()[:8], "little")
    return (h % 10_000) < val_percent * 100


def _read_files(files: list[tuple[str, Path]], cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    train, val, total = [], [], 0
    for rel, path in sorted(files):
        data = path.read_bytes()
        if cfg.max_bytes and total + len(data) > cfg.max_bytes:
            data = data[: cfg.max_bytes - total]
        total += len(data)
        (val if _is_val(rel, cfg.val_percent) else train).append(data)
        if cfg.max_bytes and total >= cfg.max_bytes:
            break
    return np.frombuffer(b"".join(train), np.uint8), np.frombuffer(b"".join(val), np.uint8)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[tuple[str, Path]]:
    root, out = stdlib_root(), []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                p = Path(dirpath) / name
                out.append((p.relative_to(root).as_posix(), p))
    return out


def _split_tail(tokens: np.ndarray, val_percent: float) -> tuple[np.ndarray, np.ndarray]:
    cut = int(len(tokens) * (1 - val_percent / 100))
    return tokens[:cut], tokens[cut:]


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read the configured source; raise ValueError naming `data.*` if it is unusable."""
    if cfg.source == "stdlib":
        train, val = _read_files(_stdlib_files(), cfg)
        corpus = Corpus(train, val, f"stdlib:{stdlib_root()}", True)
    elif cfg.source == "text":
        root = Path(cfg.path).expanduser()
        if root.is_dir():
            files = [(p.relative_to(root).as_posix(), p) for p in root.glob(cfg.pattern) if p.is_file()]
            train, val = _read_files(files, cfg)
            if len(train) and not len(val):  # too few files for a hash split: hold out the tail
                train, val = _split_tail(train, cfg.val_percent)
        else:
            data = np.frombuffer(root.read_bytes()[: cfg.max_bytes or None], np.uint8)
            train, val = _split_tail(data, cfg.val_percent)
        corpus = Corpus(train, val, f"text:{root}", True)
    else:
        root = Path(cfg.path).expanduser()
        if root.is_dir():
            missing = [n for n in ("train.bin", "val.bin") if not (root / n).is_file()]
            if missing:
                raise ValueError(f"data.path ({cfg.path!r}) is a folder without {' and '.join(missing)}")
            train, val = (_tokens(root / n, cfg) for n in ("train.bin", "val.bin"))
        else:
            train, val = _split_tail(_tokens(root, cfg), cfg.val_percent)
        corpus = Corpus(train, val, f"bin:{root}", False)
    for split, arr in (("training", corpus.train), ("validation", corpus.val)):
        if len(arr) <= cfg.seq_len + 1:
            raise ValueError(
                f"data.path ({cfg.path or str(stdlib_root())!r}) gives {len(arr)} {split} tokens, "
                f"fewer than data.seq_len + 2 ({cfg.seq_len + 2}): empty or too small"
            )
    return corpus


def _tokens(path: Path, cfg: DataConfig) -> np.ndarray:
    """A flat token file, memory-mapped (nothing read until a window is)."""
    dtype = np.dtype(TOKEN_DTYPES[cfg.token_dtype]).newbyteorder("<")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ValueError(f"data.path ({str(path)!r}) has {size} bytes, not a multiple of {dtype.itemsize}: not a "
                         f"flat {cfg.token_dtype} token file (data.token_dtype={cfg.token_dtype!r})")
    if size == 0:  # np.memmap refuses an empty file; the size check below names it
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def check_vocab(corpus: Corpus, vocab_size: int) -> None:
    top = int(np.max(corpus.train)) if len(corpus.train) else 0
    top = max(top, int(np.max(corpus.val)) if len(corpus.val) else 0)
    if top >= vocab_size:
        hint = (f"; or is data.token_dtype ({corpus.train.dtype.name}) not the file's?" if not corpus.is_bytes
                and top >= 1 << 16 else "")
        raise ValueError(f"model.vocab_size ({vocab_size}) must be > the largest token id in data.path ({top}){hint}")


def sample_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, *, seed: int, stream: tuple[int, ...],
    rank: int = 0, world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's `batch_size` windows of the global batch (batch_size * world_size windows at offsets
    drawn from SeedSequence([seed, *stream])). The global batch does not depend on how it is split:
    4 ranks x 4 sequences and 2 ranks x 8 see the same data. Returns (x, y) int64."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *stream])))
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size * world_size)
    starts = starts[rank * batch_size : (rank + 1) * batch_size]
    windows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(windows)
    return t[:, :-1], t[:, 1:]


TRAIN_STREAM, VAL_STREAM = 0, 1
