"""Shared fixtures: a session-wide tiny model and synthetic text (no network, seconds to build)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from residue_monitor.service.models import PreparedModel, build_tiny_llama

_WORDS = tuple(
    " ".join(
        [
            "the a river key door box market monday tuesday answer model layer token quiet bright old new",
            "red green blue stone bridge kitchen shelf meeting calendar letter word count seven five twelve",
            "capital city is was runs keeps opens closed said moved showed forgets contradicts stops fails",
            "under past before after in on",
        ]
    ).split()
)


def synthetic_texts(n_docs: int, words_per_doc: int = 400, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English documents for training tiny transcoders offline."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        n = 0
        while n < words_per_doc:
            k = rng.randint(5, 14)
            sentences.append(" ".join(rng.choice(_WORDS) for _ in range(k)).capitalize() + ".")
            n += k
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("residue_home")


@pytest.fixture(scope="session")
def tiny_model(tiny_home: Path) -> PreparedModel:
    return build_tiny_llama(seed=0, home=tiny_home)


@pytest.fixture(scope="session")
def tiny_hf(tiny_model: PreparedModel):
    from residue_monitor.service.models import load_hf

    return load_hf(tiny_model.path)


@pytest.fixture()
def residue_home_tmp(tiny_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point $RESIDUE_HOME at the session's temp home (tiny model already built there)."""
    monkeypatch.setenv("RESIDUE_HOME", str(tiny_home))
    return tiny_home
