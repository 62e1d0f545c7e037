"""Byte-level text corpora: an embedded default, user text files, and random training windows.

Tokens are raw UTF-8 bytes (vocabulary 256), stored as ``torch.uint8`` to keep large corpora
small in memory and widened to ``int64`` one batch at a time.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 256
EMBEDDED_CORPUS = "cpython-docs"
SPLIT_CHUNK_BYTES = 4096
MIN_SPLIT_CHUNKS = 20
# Room for one window of 256 tokens plus its shifted target in each split; `get_batch`
# checks against the seq_len actually used.
DEFAULT_MIN_TOKENS = 257


class DataError(ValueError):
    """A corpus or batch request that cannot be served; the message names the source and why."""


@dataclass
class TokenCorpus:
    train: torch.Tensor  # uint8, 1-D
    val: torch.Tensor  # uint8, 1-D
    source: str  # EMBEDDED_CORPUS or the file paths, in reading order
    sha256: str  # of the raw bytes, so a run records exactly which text it saw
    n_bytes: int
    files: tuple[str, ...] = ()  # the paths as read; `source` joins them for a reader, ambiguously

    def describe(self) -> dict:
        """Plain values for a run's config (no tensors)."""
        return {
            "source": self.source,
            **({"files": list(self.files)} if self.files else {}),
            "sha256": self.sha256,
            "n_bytes": self.n_bytes,
            "n_train": len(self.train),
            "n_val": len(self.val),
            "vocab_size": VOCAB_SIZE,
            "context_free_loss": self.context_free_loss,
        }

    @property
    def context_free_loss(self) -> float:
        """The loss of predicting every byte from the training text's byte frequencies
        alone (the unigram entropy, in nats): what a model reaches that reads no context."""
        return unigram_loss(self.train)


def unigram_loss(tokens: torch.Tensor, *, by_position: bool = False) -> float:
    """The entropy (nats) of the tokens' empirical distribution: the cross-entropy of the
    best prediction that ignores every other token. Any shape; negative ids (an ignore
    index such as -100) are not tokens and are left out.

    ``by_position``: ``tokens`` is (examples, positions), and the prediction may know the
    position, as a model with position embeddings does that reads no input: the entropy at
    each position, weighted by its tokens (H(token | position)). That is the context-free
    loss of a task scored at fixed positions, an answer after a prompt; on text, where a
    window starts anywhere, the two agree."""
    tokens = torch.as_tensor(tokens).long()
    if not by_position:
        return _entropy(tokens.reshape(-1))
    if tokens.dim() != 2:
        raise ValueError(f"unigram_loss(by_position=True) needs (examples, positions) token ids; "
                         f"got shape {tuple(tokens.shape)}")
    columns = [column[column >= 0] for column in tokens.T]
    total = sum(len(column) for column in columns)
    if total == 0:
        raise ValueError("unigram_loss needs at least one token id >= 0")
    return sum(len(column) * _entropy(column) for column in columns if len(column)) / total


def _entropy(tokens: torch.Tensor) -> float:
    tokens = tokens[tokens >= 0]
    if len(tokens) == 0:
        raise ValueError("unigram_loss needs at least one token id >= 0")
    counts = torch.bincount(tokens).double()
    probabilities = counts[counts > 0] / counts.sum()
    return float(-(probabilities * probabilities.log()).sum())


def embedded_corpus_bytes() -> bytes:
    """CPython's documentation topics (``pydoc_data``): real English prose, on every install.

    The text follows the interpreter's version, which is why a corpus records its sha256.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def expand_globs(names: Iterable[str | Path]) -> list[str]:
    """Each data file as given, or the files a glob among them matches, in name order: a
    suite records the list itself, so a file added later does not change what a rerun reads."""
    files = []
    for name in map(str, names):
        if not any(char in name for char in "*?["):
            files.append(name)
            continue
        matches = sorted(match for match in glob.glob(name, recursive=True) if Path(match).is_file())
        if not matches:
            raise DataError(f"{name!r} matches no file")
        files += matches
    return files


def _read_text_file(path: Path) -> bytes:
    # Directories are refused rather than globbed: an explicit list fixes which files are
    # read and in what order, and so which bytes the sha256 covers.
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; pass the text files themselves (in a suite or "
                        f"`--data`, a quoted glob such as '{path}/*.txt' takes them in name order)")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise DataError(f"{path}: contains NUL bytes; looks binary, expected UTF-8 text")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        reason = f"{err.reason} at byte {err.start}"
        raise DataError(f"{path}: not valid UTF-8 text ({reason})") from None
    return raw


def _split_every_nth_chunk(
    tokens: torch.Tensor, val_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    chunk_bytes = max(1, min(SPLIT_CHUNK_BYTES, len(tokens) // MIN_SPLIT_CHUNKS))
    every = round(1 / val_fraction)
    chunks = torch.split(tokens, chunk_bytes)
    train = [chunk for i, chunk in enumerate(chunks) if i % every != every // 2]
    val = [chunk for i, chunk in enumerate(chunks) if i % every == every // 2]
    empty = torch.empty(0, dtype=torch.uint8)
    return (torch.cat(train) if train else empty), (torch.cat(val) if val else empty)


def load_corpus(
    paths: Sequence[str | Path] | str | Path | None = None,
    val_fraction: float = 0.1,
    min_tokens: int = DEFAULT_MIN_TOKENS,
) -> TokenCorpus:
    """Load text as byte tokens and split it into train and validation.

    ``paths=None`` loads the embedded corpus (``"cpython-docs"``); several files are
    concatenated in the given order, byte for byte.

    Split rule: the bytes are cut into chunks of 4096 bytes (smaller for texts under
    80 KB, so that there are always at least 20 chunks) and every n-th chunk, with
    n = round(1 / val_fraction) and starting at chunk n // 2, goes to validation; the rest,
    in order, is the training set. Validation is thus drawn evenly from the whole text, the
    two sets share no byte, and the split depends only on the bytes and ``val_fraction``.
    The realised fraction is 1/n (0.1 → every 10th chunk).

    Each split must hold at least ``min_tokens`` tokens, else ``DataError``.
    """
    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    if paths is None:
        raw, source = embedded_corpus_bytes(), EMBEDDED_CORPUS
    else:
        # A lone path is a str, itself a Sequence: wrap it rather than read its characters.
        path_list = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        if not path_list:
            raise DataError("no corpus files given; pass paths=None for the embedded corpus")
        texts = [_read_text_file(path) for path in path_list]
        # An empty file among others adds no byte (a package's empty __init__.py in a glob);
        # text made of empty files alone is a mistake worth naming.
        if not any(texts):
            raise DataError(f"{path_list[0]}: file is empty" if len(path_list) == 1
                            else f"all {len(path_list)} files are empty ({path_list[0]}, ...)")
        raw = b"".join(texts)
        source = ", ".join(str(path) for path in path_list)

    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    train, val = _split_every_nth_chunk(tokens, val_fraction)
    for split_name, split in (("training", train), ("validation", val)):
        if len(split) < min_tokens:
            raise DataError(
                f"{source}: corpus too small: its {split_name} split holds {len(split)} of the "
                f"text's {len(raw)} bytes; one training window needs {min_tokens}"
            )
    files = () if paths is None else tuple(str(path) for path in path_list)
    return TokenCorpus(train, val, source, hashlib.sha256(raw).hexdigest(), len(raw), files)


def get_batch(
    tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: ``x`` (B, T) int64 and ``y`` = the next token after each ``x`` position."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if len(tokens) < seq_len + 1:
        raise DataError(
            f"{len(tokens)} tokens cannot hold one window of seq_len + 1 = {seq_len + 1} "
            "(inputs plus the shifted target); use a larger corpus or a shorter seq_len"
        )
    starts = torch.randint(len(tokens) - seq_len, (batch_size,), generator=generator)
    windows = tokens[starts[:, None] + torch.arange(seq_len + 1)].long()  # (B, T + 1)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def fixed_batches(
    tokens: torch.Tensor, batch_size: int, seq_len: int, n_batches: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same ``n_batches`` windows on every call, so successive validation losses compare."""
    generator = torch.Generator().manual_seed(seed)
    return [get_batch(tokens, batch_size, seq_len, generator) for _ in range(n_batches)]
