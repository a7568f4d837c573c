# pyright: strict
"""Write the shell catalog: one JSON file per shell plus ``controls.json``, from a fixed seed.

    python -m residue_monitor.shells.catalog.build [--out DIR]

The committed files in this folder are this script's output; a unit test rebuilds them into a temporary
folder and compares bytes, so edit the generators (``_memory``, ``_values``, ``_temporal``,
``_instructions``, ``_reflect``, ``_controls``) and re-run rather than editing the JSON by hand.

Each shell gets ``PER_SHELL`` instances drawn round-robin over its template families, each with its own
``random.Random`` seeded from ``SEED`` and the shell id (adding a shell does not reshuffle the others).
Prompts are unique across the whole catalog and ``MIN_WORDS``..``MAX_WORDS`` words long (drafts outside
are redrawn). Instance ids are ``<shell>.<family>.<8 hex of the prompt's sha1>``; the fit/heldout split
is a function of the id alone (``split_of``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from . import CONTROLS_ID, split_of
from ._controls import CONTROL_FAMILIES
from ._instructions import V5_FAMILIES
from ._memory import V1_FAMILIES, V3_FAMILIES
from ._reflect import META_FAMILIES
from ._seeds import HEADERS, SEEDS, ShellHeader
from ._temporal import V4_FAMILIES
from ._text import Draft, n_words
from ._values import V2_FAMILIES

SEED = 20250417
GENERATOR_VERSION = 1
PER_SHELL = 60
N_CONTROLS = 360
MIN_WORDS, MAX_WORDS = 25, 300  # ~35–400 SmolLM2 tokens; drafts outside are redrawn
_MAX_TRIES = 500  # draws per slot before a family is declared unable to make a new unique prompt

Family = Callable[[random.Random], Draft]

FAMILIES: dict[str, tuple[Family, ...]] = {
    "v1_memtrace": V1_FAMILIES,
    "v2_value_collapse": V2_FAMILIES,
    "v3_layer_salience": V3_FAMILIES,
    "v4_temporal_inference": V4_FAMILIES,
    "v5_instruction_disruption": V5_FAMILIES,
    "meta_shell": META_FAMILIES,
}
_CONTROLS_HEADER = ShellHeader(
    CONTROLS_ID,
    "controls",
    "none",
    "Benign prompts in the same chat style and length range as the shells: plain questions, a fact stated "
    "right before its question, agreeing sources, short lists, unbroken sequences, one instruction, a worked "
    "sum read once. Each family mirrors one shell's surface without its trigger (meta.mirrors).",
)


def _instances(task: str, families: Sequence[Family], n: int, seen: set[str]) -> list[dict[str, object]]:
    """``n`` instances for ``task``, round-robin over ``families``, skipping prompts already in ``seen``."""
    rng = random.Random(f"residue-monitor/{task}/{SEED}")
    out: list[dict[str, object]] = []
    for i in range(n):
        family = families[i % len(families)]
        for _ in range(_MAX_TRIES):
            draft = family(rng)
            if draft.prompt not in seen and MIN_WORDS <= n_words(draft.prompt) <= MAX_WORDS:
                break
        else:
            raise RuntimeError(
                f"{task}: family {family.__name__} made no new unique, sized prompt in {_MAX_TRIES} draws"
            )
        seen.add(draft.prompt)
        digest = hashlib.sha1(draft.prompt.encode()).hexdigest()[:8]
        iid = f"{task}.{draft.family}.{digest}"
        out.append(
            {
                "id": iid,
                "task": task,
                "family": draft.family,
                "prompt": draft.prompt,
                "answers": draft.answers,
                "match": draft.match,
                "split": split_of(iid),
                "chat": True,
                "meta": draft.meta,
            }
        )
    return out


def _document(header: ShellHeader, instances: list[dict[str, object]]) -> dict[str, object]:
    seeds = [
        {
            "paper": s.paper.id,
            "title": s.paper.title,
            "authors": s.paper.authors,
            "section": s.section,
            "kind": s.kind,
            "text": s.text,
        }
        for s in SEEDS.get(header.id, ())
    ]
    return {
        "id": header.id,
        "name": header.name,
        "failure_type": header.failure_type,
        "description": header.description,
        "seeds": seeds,
        "generator": {
            "module": "residue_monitor.shells.catalog.build",
            "seed": SEED,
            "version": GENERATOR_VERSION,
        },
        "instances": instances,
    }


def render() -> dict[str, str]:
    """File name → file text for the whole catalog (shells first, in HEADERS order, then controls)."""
    seen: set[str] = set()
    files: dict[str, str] = {}
    docs = [(h, FAMILIES[h.id], PER_SHELL) for h in HEADERS]
    docs.append((_CONTROLS_HEADER, CONTROL_FAMILIES, N_CONTROLS))
    for header, families, n in docs:
        doc = _document(header, _instances(header.id, families, n, seen))
        files[f"{header.id}.json"] = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
    return files


def build(out_dir: Path) -> list[Path]:
    """Write every catalog file into ``out_dir`` (created if needed); returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, text in render().items():
        path = out_dir / name
        path.write_bytes(text.encode("utf-8"))
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args(argv)
    for path in build(args.out):
        print(path)


if __name__ == "__main__":
    main()
