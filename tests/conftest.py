import os

import pytest

os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


@pytest.fixture(scope="session")
def small_alphabet(tmp_path_factory):
    """A small alphabet prepared once per session: {split: Prepared}."""
    from study.data.beton import prepare

    out = tmp_path_factory.mktemp("data")
    return prepare("alphabet", out, params=dict(train_per_class=12, test_per_class=4), workers=1)
