"""A tiny byte-level text corpus that needs no download: the Python standard library's source.

Contract
--------
* ``load_stdlib_corpus(max_bytes, holdout_every)`` reads the ``*.py`` files under
  ``sysconfig.get_paths()["stdlib"]`` in sorted relative-path order, skipping
  ``site-packages``/``dist-packages`` (third-party code, differs per machine) and test
  directories (generated data, odd encodings). It stops once ``max_bytes`` bytes are
  read; the last file is cut at the budget. Same interpreter install -> same bytes.
* Tokens are the raw bytes (vocabulary 256, no tokenizer). Files are joined by one
  ``\\n``.
* Split by file, so no held-out text is seen in training: file ``i`` of the list goes to
  the held-out split when ``i % holdout_every == holdout_every - 1``, the others to the
  training split.
* ``sample_batch(tokens, batch_size, seq_len, generator)`` draws ``batch_size`` windows
  of ``seq_len`` consecutive tokens at uniformly random starts. It only uses
  ``generator``, so every rank that seeds its own generator identically gets the same
  batches in the same order (the global RNG is untouched).

Pseudo-code::

    corpus = load_stdlib_corpus(max_bytes=2_000_000)
    g = torch.Generator().manual_seed(seed)
    x = sample_batch(corpus.train, 32, 128, g)        # LongTensor [32, 128], values 0..255
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["VOCAB_SIZE", "ByteCorpus", "load_stdlib_corpus", "sample_batch", "stdlib_files"]

VOCAB_SIZE = 256  # one token per byte value
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@dataclass(frozen=True)
class ByteCorpus:
    """Byte tokens of the training and held-out files, and where they came from."""

    train: torch.Tensor  # uint8 [n_train]
    heldout: torch.Tensor  # uint8 [n_heldout]
    root: Path
    num_files: int  # files read (wholly or, for the last one, in part)
    num_heldout_files: int

    def describe(self) -> str:
        return (
            f"{self.num_files} files of {self.root} ({(len(self.train) + len(self.heldout)) / 1e6:.2f} MB): "
            f"train {len(self.train):,} bytes, held-out {len(self.heldout):,} bytes "
            f"({self.num_heldout_files} files)"
        )


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``*.py`` files, sorted by path relative to ``root``."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {root} does not exist (sysconfig 'stdlib' path)")
    files = [p for p in root.rglob("*.py") if not (_SKIP_DIRS & set(p.relative_to(root).parts[:-1]))]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_stdlib_corpus(max_bytes: int = 2_000_000, holdout_every: int = 10, root: Path | None = None) -> ByteCorpus:
    """Read up to ``max_bytes`` bytes of stdlib source and split it by file (see module docstring)."""
    if max_bytes < 1:
        raise ValueError(f"load_stdlib_corpus: max_bytes must be >= 1, got {max_bytes}")
    if holdout_every < 2:
        raise ValueError(f"load_stdlib_corpus: holdout_every must be >= 2 (1 would hold out everything), got {holdout_every}")
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else Path(root)
    train: list[bytes] = []
    heldout: list[bytes] = []
    used = 0
    count = 0
    for i, path in enumerate(stdlib_files(root)):
        if used >= max_bytes:
            break
        data = path.read_bytes()[: max_bytes - used] + b"\n"
        used += len(data)
        count += 1
        (heldout if i % holdout_every == holdout_every - 1 else train).append(data)
    if not heldout:
        raise ValueError(
            f"load_stdlib_corpus: max_bytes={max_bytes} reads only {count} file(s), fewer than holdout_every="
            f"{holdout_every}: no held-out file. Raise max_bytes or lower holdout_every."
        )

    def to_tensor(chunks: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)

    return ByteCorpus(to_tensor(train), to_tensor(heldout), root, count, len(heldout))


def sample_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` random windows of ``seq_len`` tokens of ``tokens``, as int64 ``[batch_size, seq_len]``."""
    if len(tokens) <= seq_len:
        raise ValueError(f"sample_batch: {len(tokens)} tokens cannot hold a window of seq_len={seq_len}")
    starts = torch.randint(0, len(tokens) - seq_len + 1, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len)
    return tokens[starts[:, None] + offsets].long()
