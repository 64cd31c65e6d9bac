"""Dask: the scoring job on a cluster, map_blocks and GridSearchCV.

One ``LocalCluster(n_workers=2, threads_per_worker=1)`` of worker processes
on 127.0.0.1 for the module; every result is compared with the same
computation in this process.
"""

import contextlib
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, make_images, shared
from sklearn.model_selection import GridSearchCV

from sk_covvae import CovarianceVAE
from sk_covvae.cli import main
from sk_covvae.scoring import read_metadata, score_alerts

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
pd = pytest.importorskip("pandas")

# Two epochs: the tiny models' latent spaces may collapse, which is no matter here.
pytestmark = pytest.mark.filterwarnings("ignore::sk_covvae.LatentCollapseWarning")


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def pipe_file(ztf_pipeline_file):
    path, pipe, X = ztf_pipeline_file
    return path, pipe, X[:60]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """30 ZTF packets and a truncated one."""
    files = sorted(shared("ztf_alert_archive").glob("*.avro"))
    folder = tmp_path_factory.mktemp("alerts")
    for path in files[:30]:
        (folder / path.name).symlink_to(path)
    data = files[30].read_bytes()
    (folder / "truncated.avro").write_bytes(data[:1000])
    return folder


@pytest.fixture(scope="module")
def local_scores(pipe_file, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "local.parquet"
    with pytest.warns(UserWarning, match="truncated"):
        score_alerts(pipe_file[0], [inputs], out, on_error="skip", latents=True)
    return out


def test_dask_engine_writes_the_local_bytes(client, pipe_file, inputs, local_scores):
    out = local_scores.with_name("dask.parquet")
    summary = score_alerts(
        pipe_file[0],
        [inputs],
        out,
        on_error="skip",
        latents=True,
        engine="dask",
        scheduler=client,
        files_per_task=4,  # 8 tasks, the truncated file in the last
    )
    assert out.read_bytes() == local_scores.read_bytes()
    assert summary.n_alerts == 30 and summary.engine == "dask"
    assert [Path(s).name for s, _ in summary.skipped] == ["truncated.avro"]
    assert read_metadata(out)["skipped"][0]["source"].endswith("truncated.avro")


def test_dask_engine_raises_naming_the_file(client, pipe_file, inputs, tmp_path):
    from sk_covvae.datasets import AlertReadError

    with pytest.raises(AlertReadError, match="truncated.avro"):
        score_alerts(
            pipe_file[0],
            [inputs],
            tmp_path / "x.parquet",
            engine="dask",
            scheduler=client,
        )
    assert not list(tmp_path.iterdir())


def test_cli_dask_with_a_scheduler_address(client, pipe_file, inputs, local_scores):
    out = local_scores.with_name("cli.parquet")
    address = client.scheduler.address
    assert address.startswith("tcp://127.0.0.1:")
    args = ["score", str(pipe_file[0]), str(inputs), "--out", str(out)]
    args += ["--latents", "--on-error", "skip", "--engine", "dask"]
    assert main([*args, "--scheduler", address]) == 0
    assert out.read_bytes() == local_scores.read_bytes()


def test_default_cluster_is_local_on_loopback(client, monkeypatch):
    """Without an address: a LocalCluster of 2 single-thread processes on
    127.0.0.1 (the module's cluster stands in for it, to save a start)."""
    from sk_covvae import scoring

    made = {}

    @contextlib.contextmanager
    def fake_cluster(**kwargs):
        made.update(kwargs)
        yield client.cluster

    monkeypatch.setattr(distributed, "LocalCluster", fake_cluster)
    with scoring._dask_client(None) as c:
        assert c.scheduler.address == client.scheduler.address
    assert made == dict(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    )


def test_map_blocks_score_samples_and_transform(client, pipe_file):
    _, pipe, X = pipe_file
    Xd = da.from_array(X, chunks=(16, -1))
    scores = Xd.map_blocks(pipe.score_samples, drop_axis=1, dtype=np.float64)
    Z = Xd.map_blocks(pipe.transform, chunks=(Xd.chunks[0], (2,)), dtype=np.float32)
    got_scores, got_Z = da.compute(scores, Z)
    np.testing.assert_array_equal(got_scores, pipe.score_samples(X))
    np.testing.assert_array_equal(got_Z, pipe.transform(X))
    # the same on the read-only blocks a worker may hold
    X_read_only = X.copy()
    X_read_only.flags.writeable = False
    np.testing.assert_array_equal(pipe.score_samples(X_read_only), got_scores)


def test_grid_search_on_the_dask_backend(client):
    X, _ = make_images(n=96, seed=0)
    grid = {"n_components": [1, 2]}
    params = {**TINY_MODEL, "channels": (2, 4), "hidden_units": 8, "max_epochs": 1}
    search = GridSearchCV(CovarianceVAE(**params), grid, cv=2)
    with joblib.parallel_backend("dask"):
        search.fit(X)
    # the nanny runs torch on one thread per worker: so does the reference
    # (training on more threads sums in another order: last bits differ)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = GridSearchCV(CovarianceVAE(**params), grid, cv=2).fit(X)
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(
        search.cv_results_["mean_test_score"], ref.cv_results_["mean_test_score"]
    )
    assert search.best_params_ == ref.best_params_
