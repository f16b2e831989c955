import os

import pytest

os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


@pytest.fixture(scope="session")
def small_alphabet(tmp_path_factory):
    """A small alphabet prepared once per session: {split: Prepared}."""
    from study.data.beton import prepare

    out = tmp_path_factory.mktemp("data")
    return prepare("alphabet", out, params=dict(train_per_class=12, test_per_class=4), workers=1)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A ResNet-18 trained for a few epochs on a small alphabet, and its test batches."""
    import torch

    from study.data.beton import prepare
    from study.data.loaders import make_loader
    from study.engine import Trainer, TrainSettings
    from study.models import build_model

    data = prepare("alphabet", tmp_path_factory.mktemp("attack-data"),
                   params=dict(train_per_class=60, test_per_class=4), workers=1)
    torch.manual_seed(0)
    train = make_loader(data["train"].beton, train=True, resolution=32, batch_size=64,
                        workers=1, seed=0)
    test = make_loader(data["test"].beton, train=False, resolution=32, batch_size=104, workers=1)
    model = build_model("resnet18", 26)
    Trainer(model, TrainSettings(epochs=6, lr_f=0.05, lr_g=0.05), "scratch", len(train)).fit(
        train, progress=False)
    return model.eval(), [(x.clone(), y.clone()) for x, y in test]  # FFCV reuses its buffers


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs) for the whole test session."""
    import ray

    ray.init(address="local", num_cpus=2, dashboard_host="127.0.0.1")  # never a stale cluster
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend) on 127.0.0.1 for the session."""
    from study.tracking import LocalServer

    root = tmp_path_factory.mktemp("mlflow")
    with LocalServer(root) as server:
        yield server.uri
