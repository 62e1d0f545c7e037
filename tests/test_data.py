import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from loopdiag.data import (
    EMBEDDED_CORPUS,
    DataError,
    embedded_corpus_bytes,
    fixed_batches,
    get_batch,
    load_corpus,
    unigram_loss,
)
from loopdiag.store.reference import context_free_loss


def numbered_lines(n_lines: int) -> bytes:
    """Text whose every line is unique and 11 bytes long, so a line locates its origin."""
    return "".join(f"line {i:05d}\n" for i in range(n_lines)).encode()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def whole_lines(split: torch.Tensor) -> set[str]:
    pieces = bytes(split.tolist()).decode().split("\n")
    return {piece for piece in pieces if len(piece) == 10}


def test_embedded_corpus_is_english_text():
    corpus = load_corpus()
    assert corpus.source == EMBEDDED_CORPUS
    assert corpus.n_bytes > 400_000
    raw = embedded_corpus_bytes()
    assert corpus.sha256 == hashlib.sha256(raw).hexdigest()
    printable = sum(32 <= byte < 127 or byte in b"\n\t" for byte in raw)
    assert printable / len(raw) > 0.99
    text = raw.decode()
    assert text.count(" the ") > 1000


def test_split_sizes_add_up_and_fraction_holds():
    corpus = load_corpus(val_fraction=0.1)
    assert corpus.train.dtype == corpus.val.dtype == torch.uint8
    assert len(corpus.train) + len(corpus.val) == corpus.n_bytes
    assert 0.08 < len(corpus.val) / corpus.n_bytes < 0.12


def test_split_is_deterministic():
    first, second = load_corpus(), load_corpus()
    assert torch.equal(first.train, second.train)
    assert torch.equal(first.val, second.val)
    assert first.describe() == second.describe()


def test_split_is_disjoint_and_spread_over_the_text(tmp_path):
    n_lines = 20_000
    corpus = load_corpus([write(tmp_path, "lines.txt", numbered_lines(n_lines))])
    train_lines, val_lines = whole_lines(corpus.train), whole_lines(corpus.val)
    assert val_lines and not train_lines & val_lines
    val_numbers = sorted(int(line.split()[1]) for line in val_lines)
    assert val_numbers[0] < 0.2 * n_lines and val_numbers[-1] > 0.8 * n_lines


def test_user_file_round_trip(tmp_path):
    raw = numbered_lines(2000)
    path = write(tmp_path, "notes.txt", raw)
    corpus = load_corpus(str(path))  # a lone path, not wrapped in a list
    assert corpus.n_bytes == len(raw)
    assert corpus.sha256 == hashlib.sha256(raw).hexdigest()
    assert str(path) in corpus.source
    both = torch.cat([corpus.train, corpus.val])
    assert torch.equal(both.sort().values, torch.tensor(list(raw), dtype=torch.uint8).sort().values)


def test_several_files_concatenate_in_order(tmp_path):
    first = write(tmp_path, "a.txt", numbered_lines(1000))
    second = write(tmp_path, "b.txt", "ünïcode text\n".encode() * 500)
    corpus = load_corpus([first, second])
    assert corpus.sha256 == hashlib.sha256(first.read_bytes() + second.read_bytes()).hexdigest()
    assert corpus.source.index(str(first)) < corpus.source.index(str(second))
    assert load_corpus([second, first]).sha256 != corpus.sha256


def test_describe_is_plain_json():
    described = load_corpus().describe()
    assert json.loads(json.dumps(described)) == described
    assert described["n_train"] + described["n_val"] == described["n_bytes"]


def test_context_free_loss_is_the_training_texts_unigram_entropy(tmp_path):
    assert unigram_loss(torch.tensor([1, 2, 3, 4] * 10, dtype=torch.uint8)) == pytest.approx(math.log(4))
    assert unigram_loss(torch.tensor([7] * 5)) == 0.0
    assert unigram_loss([[3, 3, -100], [4, -100, 4]]) == pytest.approx(math.log(2))  # ignore index
    with pytest.raises(ValueError, match="at least one token"):
        unigram_loss(torch.full((4,), -100))
    corpus = load_corpus(write(tmp_path, "ab.txt", b"ab" * 5000))
    assert corpus.context_free_loss == pytest.approx(math.log(2), abs=1e-4)
    assert corpus.describe()["context_free_loss"] == corpus.context_free_loss
    # English prose: well below the 8 bits of a byte, above what context brings
    assert 3.0 < load_corpus().context_free_loss < 3.5


def test_context_free_loss_by_position_is_what_a_model_that_knows_only_the_position_reaches():
    # Position 0 is always 5, position 1 is 6 or 7: pooled, three tokens; by position, one
    # bit at position 1 only. Position 2 is never scored.
    answers = torch.tensor([[5, 6, -100], [5, 7, -100]] * 4)
    assert unigram_loss(answers, by_position=True) == pytest.approx(math.log(2) / 2)
    assert unigram_loss(answers) > unigram_loss(answers, by_position=True)
    # Positions weigh by the tokens scored there: 4 certain at 0, 2 even ones at 1.
    uneven = torch.tensor([[1, 2], [1, 3], [1, -100], [1, -100]])
    assert unigram_loss(uneven, by_position=True) == pytest.approx(2 * math.log(2) / 6)
    with pytest.raises(ValueError, match="examples, positions"):
        unigram_loss(torch.tensor([1, 2, 3]), by_position=True)
    with pytest.raises(ValueError, match="at least one token"):
        unigram_loss(torch.full((2, 3), -100), by_position=True)


def test_a_config_recorded_without_the_context_free_loss_gets_it_rebuilt_where_it_can():
    embedded = load_corpus()
    recorded = embedded.describe()
    assert context_free_loss({"data": recorded}) == recorded["context_free_loss"]
    older = {key: value for key, value in recorded.items() if key != "context_free_loss"}
    assert context_free_loss({"data": older}) == pytest.approx(embedded.context_free_loss)
    assert context_free_loss({"data": {**older, "sha256": "0" * 64}}) is None  # other text
    assert context_free_loss({"data": {"source": "/gone/notes.txt"}}) is None
    assert context_free_loss({}) is None


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("missing.txt", None, "no such file"),
        ("empty.txt", b"", "empty"),
        ("nul.bin", b"text\x00" * 1000, "NUL"),
        ("latin1.txt", "café ".encode("latin-1") * 1000, "UTF-8"),
    ],
    ids=["missing", "empty", "nul", "not-utf8"],
)
def test_bad_file_raises_data_error_naming_path(tmp_path, name, data, reason):
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(DataError, match=reason) as caught:
        load_corpus([path])
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_an_empty_file_among_others_adds_nothing_and_files_all_empty_are_refused(tmp_path):
    text, empty = tmp_path / "module.py", tmp_path / "__init__.py"
    text.write_text("def f():\n    return 1\n" * 2000)
    empty.write_bytes(b"")
    with_empty, alone = load_corpus([empty, text]), load_corpus([text])
    assert with_empty.sha256 == alone.sha256 and torch.equal(with_empty.train, alone.train)
    assert with_empty.files == (str(empty), str(text))  # the list read stays on record
    second = tmp_path / "other.py"
    second.write_bytes(b"")
    with pytest.raises(DataError, match=r"all 2 files are empty"):
        load_corpus([empty, second])


def test_directory_is_refused(tmp_path):
    with pytest.raises(DataError, match="directory") as caught:
        load_corpus([tmp_path])
    assert str(tmp_path) in str(caught.value)


def test_too_small_corpus_is_refused(tmp_path):
    path = write(tmp_path, "tiny.txt", b"hello world\n" * 10)
    with pytest.raises(DataError, match="too small") as caught:
        load_corpus([path])
    assert str(path) in str(caught.value)
    corpus = load_corpus([path], min_tokens=4)  # a lower bar accepts it
    assert corpus.n_bytes == 120


@pytest.mark.parametrize("val_fraction", [0.0, 0.9, -0.1])
def test_bad_val_fraction(val_fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(val_fraction=val_fraction)


def test_no_paths_is_an_error():
    with pytest.raises(DataError, match="no corpus files"):
        load_corpus([])


def test_batch_shapes_and_shift():
    tokens = load_corpus().val
    x, y = get_batch(tokens, batch_size=4, seq_len=16, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = tokens.long().unfold(0, 17, 1)  # every contiguous window of T + 1 tokens
    for row_x, row_y in zip(x, y):
        window = torch.cat([row_x, row_y[-1:]])
        assert (windows == window).all(dim=1).any()


def test_batch_is_deterministic_given_generator():
    tokens = load_corpus().train
    a = get_batch(tokens, 8, 32, torch.Generator().manual_seed(7))
    b = get_batch(tokens, 8, 32, torch.Generator().manual_seed(7))
    c = get_batch(tokens, 8, 32, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_batch_from_exactly_one_window():
    tokens = torch.arange(11, dtype=torch.uint8)
    x, y = get_batch(tokens, 3, 10, torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.arange(10).expand(3, 10))
    assert torch.equal(y, torch.arange(1, 11).expand(3, 10))


def test_batch_too_short_is_a_clear_error():
    with pytest.raises(DataError, match="seq_len"):
        get_batch(torch.zeros(10, dtype=torch.uint8), 2, 10, torch.Generator())


@pytest.mark.parametrize("batch_size, seq_len", [(0, 8), (2, 0)], ids=["batch0", "seq0"])
def test_batch_rejects_nonpositive_sizes(batch_size, seq_len):
    with pytest.raises(ValueError):
        get_batch(torch.zeros(100, dtype=torch.uint8), batch_size, seq_len, torch.Generator())


def test_fixed_batches_repeat_exactly():
    tokens = load_corpus().val
    first = fixed_batches(tokens, batch_size=4, seq_len=16, n_batches=3, seed=1)
    second = fixed_batches(tokens, batch_size=4, seq_len=16, n_batches=3, seed=1)
    assert len(first) == 3
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(first[0][0], first[1][0])
