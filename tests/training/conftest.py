import pytest

from tests.training.runs import write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("data") / "tokens")
