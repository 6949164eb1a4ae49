import numpy as np
import pytest

from moeload.errors import InputError
from moeload.workloads import corpus


def test_corpus_is_real_stdlib_text_and_deterministic(tmp_path, monkeypatch):
    tokens = corpus.load_corpus()
    assert tokens.dtype == np.uint8 and tokens.ndim == 1
    assert len(tokens) > 1_000_000
    text = bytes(tokens[:2_000_000])
    assert b"def " in text and b"import " in text
    # Rebuilt from scratch into an empty cache directory: identical bytes.
    monkeypatch.setenv("MOELOAD_CACHE", str(tmp_path))
    corpus.load_corpus.cache_clear()
    try:
        rebuilt = corpus.load_corpus()
        assert list(tmp_path.glob("stdlib-*.npy")), "disk cache was not written"
    finally:
        corpus.load_corpus.cache_clear()
    assert np.array_equal(np.asarray(rebuilt), np.asarray(tokens))


def test_file_list_sorted_and_excludes_installed_packages():
    root = corpus.stdlib_root()
    files = corpus.stdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    assert not any("site-packages" in r or "__pycache__" in r for r in rel)
    assert "os.py" in rel


def test_split_and_sampler_deterministic():
    tokens = corpus.load_corpus()
    train, val = corpus.split(tokens, 0.05)
    assert len(train) + len(val) == len(tokens)
    assert abs(len(val) / len(tokens) - 0.05) < 1e-3
    a = corpus.batch_iterator(train, 3, 16, seed=7)
    b = corpus.batch_iterator(train, 3, 16, seed=7)
    c = corpus.batch_iterator(train, 3, 16, seed=8)
    (xa, ya), (xb, yb), (xc, _) = next(a), next(b), next(c)
    assert xa.shape == (3, 16) and xa.dtype == np.int64
    assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert not np.array_equal(xa, xc)
    assert np.array_equal(xa[:, 1:], ya[:, :-1])


def test_bad_inputs_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="val_fraction"):
        corpus.split(np.zeros(10, np.uint8), 1.5)
    with pytest.raises(InputError, match="no .py files"):
        corpus.load_corpus(str(tmp_path))
    with pytest.raises(InputError, match="seq_len"):
        corpus.sample_batch(np.zeros(10, np.uint8), 2, 16, np.random.default_rng(0))
