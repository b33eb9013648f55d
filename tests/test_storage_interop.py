"""ROME/MEMIT/AlphaEdit layer_stats interop: import gives sum / count, export writes what ROME writes, C is float64."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kis_lens.cache_job import cache_second_moments
from kis_lens.cli import main
from kis_lens.config import CacheOptions
from kis_lens.corpus import EMBEDDED_CORPUS, open_corpus
from kis_lens.errors import KisError
from kis_lens.layout import stats_path
from kis_lens.models import load_model
from kis_lens.stats import SecondMoment
from kis_lens.storage import (
    export_npz,
    import_layer_stats,
    load_second_moment,
    merge_caches,
    read_metadata,
    save_second_moment,
)

DIM = 16
ROWS = 1000
ROME_SAMPLE_SIZE = 37
CONSTRUCTOR = "util.runningstats.SecondMoment()"
# What an imported cache records (save_second_moment adds stats_dtype and kis_lens_version to every cache).
IMPORTED_KEYS = {
    "model_name",
    "layer",
    "hook",
    "d_mlp",
    "corpus",
    "prepend_bos",
    "max_length",
    "imported_from",
    "count",
    "texts",
    "model_fingerprint",
    "stats_dtype",
    "kis_lens_version",
}


def _rows(seed: int = 0, n: int = ROWS) -> np.ndarray:
    """Random float64 activation rows that float32 holds exactly (kis forms batch products in float32)."""
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32).astype(np.float64)


def _rome_npz(path: Path, rows: np.ndarray, dtype: type[np.floating] = np.float32, **extra: np.ndarray) -> Path:
    """Write the .npz ROME's tally(..., cache=) writes for a SecondMoment: state_dict() under "mom2." + sample_size."""
    arrays = {
        "mom2.mom2": (rows.T @ rows).astype(dtype),  # runningstats.SecondMoment: mom2 += aᵀa, the running SUM
        "mom2.count": np.array(len(rows)),
        "mom2.constructor": np.array(CONSTRUCTOR),  # np.savez stores the str as a 0-d '<U' array
        "sample_size": np.array(ROME_SAMPLE_SIZE),
        **extra,
    }
    np.savez(path, **arrays)
    return path


def _rome_moment(path: Path, sample_size: int) -> np.ndarray | None:
    """Return what ROME gets from a cached .npz: load_cached_state, SecondMoment.load_state_dict, then moment().

    None where ROME's loader refuses the file (sample_size missing or not the requested one) and recomputes.
    """
    data = dict(np.load(path))  # ROME: numpy.load with its default allow_pickle=False
    if "sample_size" not in data or data["sample_size"] != sample_size:
        return None
    state = {key[len("mom2.") :]: value for key, value in data.items() if key.startswith("mom2.")}  # pull_key_prefix
    count = int(state["count"])
    mom2 = torch.from_numpy(state["mom2"])
    return (mom2 / count).double().numpy()


def _kis_cache(path: Path, rows: np.ndarray, dtype: str = "float64", **metadata) -> Path:
    """Write a kis cache of these rows (fed in batches of 100) with identifying metadata; return its path."""
    moment = SecondMoment(DIM)
    for start in range(0, len(rows), 100):
        moment.update(torch.from_numpy(rows[start : start + 100]))
    identity = {
        "model_name": "tiny",
        "layer": 0,
        "hook": "blocks.0.mlp.hook_post",
        "d_mlp": DIM,
        "corpus": "c",
        "prepend_bos": False,
    }
    return save_second_moment(path, moment, {**identity, **metadata}, dtype=dtype)


def _stored_dtype(path: Path) -> torch.dtype:
    """Return the dtype of the statistic a cache file stores (its one tensor: ``mom2`` or the exact ``sum``)."""
    with safe_open(str(path), framework="pt") as handle:
        [name] = [name for name in handle.keys() if name in ("mom2", "sum")]
        return handle.get_tensor(name).dtype


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    """Max difference relative to the largest entry (float32 batch products round off-diagonal entries absolutely)."""
    return float(np.abs(got - want).max() / np.abs(want).max())


def _import_args(npz: Path, output: Path, *extra: str) -> list[str]:
    return ["import-stats", str(npz), "--model_name", "tiny-gpt2", "--layer", "1", "--output_dir", str(output), *extra]


# --- import ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_import_divides_rome_sum_by_count(tmp_path, capsys, dtype):
    rows = _rows()
    npz = _rome_npz(tmp_path / "transformer.h.1.mlp.c_proj_float32_mom2_37.npz", rows, dtype)
    assert main(_import_args(npz, tmp_path / "out", "--prepend_bos", "false", "--max_length", "1024")) == 0, (
        capsys.readouterr().err
    )
    path = stats_path(tmp_path / "out", "tiny-gpt2", "wikipedia", 1)
    moment, meta = load_second_moment(path)
    np.testing.assert_allclose(moment.compute(torch.float64).numpy(), rows.T @ rows / ROWS, rtol=1e-6)
    assert moment.count == ROWS
    assert set(meta) == IMPORTED_KEYS
    assert meta["texts"] == ROME_SAMPLE_SIZE and meta["count"] == ROWS
    assert meta["prepend_bos"] is False and meta["max_length"] == 1024
    assert meta["model_fingerprint"] is None  # JSON null: recorded on first use with a loaded model
    assert (
        meta["model_name"] == "tiny-gpt2"
        and meta["layer"] == 1
        and meta["hook"] == "blocks.1.mlp.hook_post"
        and meta["d_mlp"] == DIM
    )
    assert meta["imported_from"] == str(npz.resolve()) and meta["stats_dtype"] == "float64"
    assert _stored_dtype(path) == torch.float64


def test_import_without_sample_size_or_max_length_records_neither(tmp_path):
    rows = _rows(1)
    npz = tmp_path / "plain.npz"  # a hand re-saved file: the two arrays only, mom2.mom2 still ROME's sum
    np.savez(npz, **{"mom2.mom2": rows.T @ rows, "mom2.count": np.array(ROWS)})
    path = import_layer_stats(npz, "tiny-gpt2", 1, tmp_path / "out", prepend_bos=True)
    moment, meta = load_second_moment(path)
    np.testing.assert_allclose(moment.compute(torch.float64).numpy(), rows.T @ rows / ROWS, rtol=1e-12)
    assert set(meta) == IMPORTED_KEYS - {"texts", "max_length"}
    assert meta["prepend_bos"] is True and meta["model_fingerprint"] is None


def test_import_requires_prepend_bos(tmp_path, capsys):
    npz = _rome_npz(tmp_path / "layer.npz", _rows())
    code = main(_import_args(npz, tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("kis: error: ") and "--prepend_bos" in err and "BOS convention the cache was made with" in err
    assert not (tmp_path / "out").exists()


def test_import_refuses_another_statistic(tmp_path):
    npz = _rome_npz(tmp_path / "layer.npz", _rows(), **{"mom2.constructor": np.array("util.runningstats.Covariance()")})
    with pytest.raises(KisError, match="not a SecondMoment"):
        import_layer_stats(npz, "tiny-gpt2", 1, tmp_path / "out", prepend_bos=False)


# --- export ---------------------------------------------------------------------------------------------------


def test_export_writes_what_rome_writes(tmp_path, capsys):
    rows = _rows(2)
    cache = _kis_cache(tmp_path / "layer_0_mom2.safetensors", rows, texts=ROME_SAMPLE_SIZE)
    target = tmp_path / "out.npz"
    assert main(["export-stats", str(cache), "--output", str(target)]) == 0, capsys.readouterr().err
    with np.load(target, allow_pickle=False) as data:
        assert _relative(data["mom2.mom2"], rows.T @ rows) < 1e-6  # the SUM, as runningstats keeps it
        assert data["mom2.mom2"].dtype == np.float32  # ROME's default precision
        assert int(data["mom2.count"]) == ROWS
        assert set(data.files) == {"mom2.mom2", "mom2.count", "mom2.constructor", "sample_size"}
        assert data["mom2.constructor"].dtype.kind == "U" and str(data["mom2.constructor"]) == CONSTRUCTOR
        assert int(data["sample_size"]) == ROME_SAMPLE_SIZE
    rome = _rome_moment(target, ROME_SAMPLE_SIZE)
    assert rome is not None, "ROME's load_cached_state would refuse the file"
    assert _relative(rome, rows.T @ rows / ROWS) < 1e-6
    assert _rome_moment(target, ROME_SAMPLE_SIZE + 1) is None  # another mom2_n_samples: ROME recomputes
    assert "_float32_mom2_37.npz" in capsys.readouterr().out  # the file name ROME's layer_stats looks for


def test_export_sample_size_and_precision(tmp_path, capsys):
    rows = _rows(3, n=200)
    both = _kis_cache(tmp_path / "a" / "layer_0_mom2.safetensors", rows, texts=90, sample_size=100)
    export_npz(both, tmp_path / "a.npz")
    assert int(np.load(tmp_path / "a.npz")["sample_size"]) == 100  # the requested sample_size wins over texts read
    args = [
        "export-stats",
        str(both),
        "--output",
        str(tmp_path / "b.npz"),
        "--sample_size",
        "5",
        "--precision",
        "float64",
    ]
    assert main(args) == 0, capsys.readouterr().err
    with np.load(tmp_path / "b.npz", allow_pickle=False) as data:
        assert int(data["sample_size"]) == 5 and data["mom2.mom2"].dtype == np.float64
        assert _relative(data["mom2.mom2"], rows.T @ rows) < 1e-6
    unknown = _kis_cache(tmp_path / "c" / "layer_0_mom2.safetensors", rows)
    capsys.readouterr()
    assert main(["export-stats", str(unknown), "--output", str(tmp_path / "c.npz")]) == 2
    assert "--sample_size" in capsys.readouterr().err and not (tmp_path / "c.npz").exists()


def test_export_then_import_keeps_c(tmp_path):
    rows = _rows(4)
    cache = _kis_cache(tmp_path / "layer_0_mom2.safetensors", rows, texts=ROME_SAMPLE_SIZE)
    npz = export_npz(cache, tmp_path / "x.npz", precision="float64")
    back, meta = load_second_moment(import_layer_stats(npz, "tiny-gpt2", 0, tmp_path / "out", prepend_bos=False))
    original, _ = load_second_moment(cache)
    assert back.count == original.count and meta["texts"] == ROME_SAMPLE_SIZE
    np.testing.assert_allclose(back.compute(torch.float64).numpy(), original.compute(torch.float64).numpy(), rtol=1e-12)


# --- float64 C ------------------------------------------------------------------------------------------------


def test_save_second_moment_defaults_to_float64(tmp_path):
    moment = SecondMoment(DIM)
    moment.update(torch.from_numpy(_rows(5, n=50)))
    path = save_second_moment(tmp_path / "layer_0_mom2.safetensors", moment, {"layer": 0})
    assert _stored_dtype(path) == torch.float64 and read_metadata(path)["stats_dtype"] == "float64"


def test_merge_stores_float64_unless_asked(tmp_path, capsys):
    rows_a, rows_b = _rows(6, n=300), _rows(7, n=500)
    _kis_cache(tmp_path / "a" / "layer_0_mom2.safetensors", rows_a, dtype="float32", texts=3)
    _kis_cache(tmp_path / "b" / "layer_0_mom2.safetensors", rows_b, dtype="float32", texts=5)
    [merged] = merge_caches([tmp_path / "a", tmp_path / "b"], tmp_path / "m64")
    assert _stored_dtype(merged) == torch.float64
    moment, meta = load_second_moment(merged)
    rows = np.concatenate([rows_a, rows_b])
    assert moment.count == len(rows) and meta["texts"] == 8
    assert _relative(moment.compute(torch.float64).numpy(), rows.T @ rows / len(rows)) < 1e-6
    assert main(["merge-stats", str(tmp_path / "a"), str(tmp_path / "b"), "--output_dir", str(tmp_path / "cli64")]) == 0
    assert _stored_dtype(tmp_path / "cli64" / "layer_0_mom2.safetensors") == torch.float64
    args = [
        "merge-stats",
        str(tmp_path / "a"),
        str(tmp_path / "b"),
        "--output_dir",
        str(tmp_path / "m32"),
        "--stats_dtype",
        "float32",
    ]
    assert main(args) == 0, capsys.readouterr().err
    assert _stored_dtype(tmp_path / "m32" / "layer_0_mom2.safetensors") == torch.float32


def test_merge_refuses_a_cache_given_twice(tmp_path):
    cache = _kis_cache(tmp_path / "a" / "layer_0_mom2.safetensors", _rows(8, n=100), texts=1)
    with pytest.raises(KisError, match="given twice"):
        merge_caches([tmp_path / "a", cache], tmp_path / "m")
    assert not (tmp_path / "m").exists()


# --- with a real cache-cov job (moved from test_covariance_job.py, which asserted export wrote the mean) ---------


@pytest.fixture(scope="module")
def tiny_cli_model():
    """The model `--model_name tiny-gpt2` loads (same seed, same weights)."""
    return load_model("tiny-gpt2", device="cpu")


@pytest.mark.slow
def test_npz_round_trip_and_merge(tmp_path, tiny_cli_model):
    texts = list(open_corpus(EMBEDDED_CORPUS).texts(stop=16))
    for name, part in (("a", texts[:8]), ("b", texts[8:]), ("ab", texts)):
        (tmp_path / f"{name}.txt").write_text("\n".join(part), encoding="utf-8")
    request = dict(sample_size=None, max_tokens=None, batch_token=256, stats_dtype="float64", progress=False)
    reports = {
        name: cache_second_moments(
            tiny_cli_model,
            [1],
            CacheOptions(**{**request, "corpus": str(tmp_path / f"{name}.txt"), "output_dir": tmp_path / name}),
        )
        for name in ("a", "b", "ab")
    }
    merged = merge_caches([reports["a"].paths[1].parent, reports["b"].paths[1].parent], tmp_path / "merged")
    got, meta = load_second_moment(merged[0])
    want, _ = load_second_moment(reports["ab"].paths[1])
    assert got.count == want.count and meta["texts"] == 16
    assert float((got.sum - want.sum).abs().max() / want.sum.abs().max()) < 1e-6

    npz = export_npz(reports["ab"].paths[1], tmp_path / "layer_1.npz")
    with np.load(npz, allow_pickle=False) as data:
        np.testing.assert_allclose(
            data["mom2.mom2"], want.sum.numpy(), rtol=1e-6, atol=1e-6 * float(want.sum.abs().max())
        )
        assert int(data["mom2.count"]) == want.count and int(data["sample_size"]) == 16
    imported_path = import_layer_stats(npz, "tiny-gpt2", 1, tmp_path / "imported", corpus="ab", prepend_bos=False)
    imported, meta = load_second_moment(imported_path)
    assert (
        meta["model_name"] == "tiny-gpt2"
        and meta["layer"] == 1
        and imported.count == want.count
        and meta["texts"] == 16
    )
    with np.load(npz, allow_pickle=False) as data:
        rome_c = data["mom2.mom2"].astype(np.float64) / int(data["mom2.count"])
    np.testing.assert_allclose(imported.compute(torch.float64).numpy(), rome_c, rtol=1e-12)
    np.savez(tmp_path / "bad.npz", other=np.zeros(2))
    with pytest.raises(KisError, match="mom2.mom2"):
        import_layer_stats(tmp_path / "bad.npz", "tiny-gpt2", 1, tmp_path / "x", prepend_bos=False)
