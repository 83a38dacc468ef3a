"""Fixtures of the training tests: one tokenized corpus per session."""

import pytest
from train_helpers import build_corpus_run


@pytest.fixture(scope="session")
def corpus_run(tmp_path_factory: pytest.TempPathFactory):
    return build_corpus_run(tmp_path_factory)
