import pytest

from distributed_harness import init_world_of_one


@pytest.fixture
def model_parallel_world_of_one():
    init_world_of_one()
