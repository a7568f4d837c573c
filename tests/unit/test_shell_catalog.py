"""The shell catalog (shells/catalog): counts, ids, splits, answers, determinism, registry, structure."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from residue_monitor.detectors.exceptions import InvalidInput, NotFound
from residue_monitor.shells.catalog import (
    CONTROLS_ID,
    MATCH_RULES,
    ShellInstance,
    ShellRegistry,
    ShellSpec,
    check_answers,
    get_shell,
    load_controls,
    load_shells,
    parse_document,
    split,
    split_of,
)
from residue_monitor.shells.catalog.build import MAX_WORDS, MIN_WORDS, build

CATALOG = Path(str(resources.files("residue_monitor.shells.catalog")))
SHELL_IDS = (
    "meta_shell",
    "v1_memtrace",
    "v2_value_collapse",
    "v3_layer_salience",
    "v4_temporal_inference",
    "v5_instruction_disruption",
)
REGISTRY = load_shells()
CONTROLS = load_controls()
ALL = [i for s in REGISTRY for i in s.instances] + list(CONTROLS)


def _tokens(text: str) -> int:
    """Rough token count (words and punctuation marks); SmolLM2's BPE gives ~1.1–1.3x this."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def _int(inst: ShellInstance, key: str) -> int:
    value = inst.meta[key]
    assert isinstance(value, int), f"{inst.id}: meta[{key!r}] is not an int"
    return value


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


# --- counts, ids, lengths ------------------------------------------------------------------------------


def test_registry_holds_exactly_the_six_shells_with_enough_instances() -> None:
    """v1–v5 and the meta-shell are registered under label-safe ids, each with ≥ 40 instances."""
    assert REGISTRY.names() == SHELL_IDS
    for spec in REGISTRY:
        assert len(spec.instances) >= 40, spec.id
        assert spec.name and spec.failure_type and spec.description


def test_there_are_at_least_300_controls_all_answerable() -> None:
    """Controls: ≥ 300, each with expected answers (they are benign and checkable by construction)."""
    assert len(CONTROLS) >= 300
    assert all(c.answers for c in CONTROLS)
    assert {c.task for c in CONTROLS} == {CONTROLS_ID}
    mirrors = Counter(str(c.meta["mirrors"]) for c in CONTROLS)
    assert set(mirrors) <= {*SHELL_IDS, "none"} and set(SHELL_IDS) <= set(mirrors)


def test_ids_and_prompts_are_unique_across_the_whole_catalog() -> None:
    """No id and no prompt text occurs twice, shells and controls together."""
    ids = [i.id for i in ALL]
    prompts = [i.prompt for i in ALL]
    assert len(set(ids)) == len(ids)
    assert len(set(prompts)) == len(prompts)


def test_every_instance_is_a_nonempty_chat_prompt_of_plausible_length() -> None:
    """Prompts are chat turns of ~35–400 tokens; ids are '<task>.<family>.<hash>' under their own task."""
    for inst in ALL:
        assert inst.chat is True
        assert inst.prompt == inst.prompt.strip() and inst.prompt
        assert MIN_WORDS <= len(inst.prompt.split()) <= MAX_WORDS, inst.id
        assert 25 <= _tokens(inst.prompt) <= 400, inst.id
        assert re.fullmatch(rf"{inst.task}\.{inst.family}\.[0-9a-f]{{8}}", inst.id), inst.id
        assert "{" not in inst.prompt and "}" not in inst.prompt, f"unfilled template in {inst.id}"


def test_lengths_vary_within_each_shell() -> None:
    """Each shell spans short and long prompts (not one fixed template length)."""
    for spec in [*REGISTRY, ShellSpec(CONTROLS_ID, "controls", "none", (), CONTROLS)]:
        lengths = sorted(_tokens(i.prompt) for i in spec.instances)
        assert lengths[-1] >= 2 * lengths[0], spec.id
        assert len({i.family for i in spec.instances}) >= 5, spec.id


# --- splits ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shell_id", SHELL_IDS)
def test_each_shell_has_both_splits_near_70_30(shell_id: str) -> None:
    """Both splits occur in every shell, 'fit' at 55–85 % (a per-id hash, so not exactly 70 %)."""
    spec = get_shell(shell_id)
    fit, held = spec.split("fit"), spec.split("heldout")
    assert fit and held and len(fit) + len(held) == len(spec.instances)
    assert 0.55 <= len(fit) / len(spec.instances) <= 0.85


def test_overall_split_is_about_70_30_and_a_function_of_the_id() -> None:
    """Over the catalog 'fit' is 64–76 %; each split equals split_of(id), so it survives reordering."""
    fit = split(ALL, "fit")
    assert 0.64 <= len(fit) / len(ALL) <= 0.76
    assert len(split(CONTROLS, "heldout")) > 0
    assert all(i.split == split_of(i.id) for i in ALL)


def test_split_rejects_an_unknown_split_name() -> None:
    """split(...) names the allowed values when given anything else."""
    with pytest.raises(InvalidInput, match="fit, heldout"):
        split(ALL, "train")  # type: ignore[arg-type]


# --- answers --------------------------------------------------------------------------------------------


def test_answers_are_well_formed_for_their_match_rule() -> None:
    """Every answer can be scored under its DESIGN.md §10 rule; choice items name a shown option."""
    for inst in ALL:
        assert inst.match in MATCH_RULES
        check_answers(inst.match, inst.answers, inst.id)
        if inst.match == "number":
            assert all(re.fullmatch(r"-?\d+", a) for a in inst.answers), inst.id
        if inst.match == "choice" and inst.answers:
            label, text = inst.answers[0], inst.answers[1]
            assert f"{label}) {text}" in inst.prompt, inst.id


@pytest.mark.parametrize(
    ("match", "answers"),
    [("number", ["ten"]), ("choice", ["Paris"]), ("contains", ["?!"]), ("fuzzy", ["x"]), ("exact", [""])],
)
def test_check_answers_rejects_answers_its_rule_cannot_score(match: str, answers: list[str]) -> None:
    """Unscorable answers (and unknown rules) are named errors."""
    with pytest.raises(InvalidInput):
        check_answers(match, answers)


def test_shells_with_a_right_answer_have_it_and_eval_items_follow_design_10() -> None:
    """v1/v3/v4 are always checkable, v2/v5/meta partly; as_eval_item has DESIGN.md §10's fields."""
    for shell_id in ("v1_memtrace", "v3_layer_salience", "v4_temporal_inference"):
        assert all(i.answers for i in get_shell(shell_id).instances), shell_id
    for shell_id in ("v2_value_collapse", "v5_instruction_disruption", "meta_shell"):
        labelled = sum(bool(i.answers) for i in get_shell(shell_id).instances)
        assert 0 < labelled < len(get_shell(shell_id).instances), shell_id
    item = get_shell("v1_memtrace").instances[0].as_eval_item()
    assert set(item) == {"id", "task", "prompt", "answers", "match", "chat"}
    assert json.loads(json.dumps(item)) == item


# --- generator ------------------------------------------------------------------------------------------


def test_build_reproduces_the_committed_files_byte_for_byte(tmp_path: Path) -> None:
    """Re-running build.py (fixed seed) into a temp dir gives exactly the committed data files."""
    written = build(tmp_path)
    committed = sorted(p.name for p in CATALOG.glob("*.json"))
    assert sorted(p.name for p in written) == committed
    for path in written:
        assert path.read_bytes() == (CATALOG / path.name).read_bytes(), f"{path.name} is stale: re-run build"


# --- registry -------------------------------------------------------------------------------------------


def test_registry_rejects_duplicates_and_unsafe_ids() -> None:
    """Registering an id twice raises; so do ids that are not lowercase label-safe, 'other', 'controls'."""
    spec = get_shell("v1_memtrace")
    reg = ShellRegistry([spec])
    with pytest.raises(InvalidInput, match="already registered"):
        reg.register(spec)
    for bad in ("V1-Memtrace", "other", CONTROLS_ID, ""):
        with pytest.raises(InvalidInput):
            reg.register(ShellSpec(bad, "x", "x", (), ()))


def test_unknown_shell_name_lists_the_known_ones() -> None:
    """get_shell on an unknown id raises NotFound naming every registered id."""
    with pytest.raises(NotFound) as err:
        get_shell("v9_nonexistent")
    for shell_id in SHELL_IDS:
        assert shell_id in str(err.value)


def test_two_files_with_the_same_shell_id_raise(tmp_path: Path) -> None:
    """A second data file claiming an existing shell id is refused at load time."""
    shutil.copy(CATALOG / "v1_memtrace.json", tmp_path / "v1_memtrace.json")
    shutil.copy(CATALOG / "v1_memtrace.json", tmp_path / "v1_memtrace_copy.json")
    with pytest.raises(InvalidInput, match="v1_memtrace"):
        load_shells(tmp_path)
    with pytest.raises(NotFound, match=r"controls\.json"):
        load_controls(tmp_path)


def test_malformed_data_is_a_named_error() -> None:
    """Bad JSON, a wrong field type or an unknown match rule raise InvalidInput naming the source."""
    with pytest.raises(InvalidInput, match=r"bad\.json"):
        parse_document("{not json", "bad.json")
    doc = json.loads((CATALOG / "v2_value_collapse.json").read_text(encoding="utf-8"))
    doc["instances"][3]["match"] = "fuzzy"
    with pytest.raises(InvalidInput, match=r"instances\[3\].*match"):
        parse_document(json.dumps(doc), "v2.json")
    doc["instances"][3]["match"] = "contains"
    doc["instances"][3]["split"] = "train"
    with pytest.raises(InvalidInput, match="split"):
        parse_document(json.dumps(doc), "v2.json")


def test_instances_are_frozen() -> None:
    """ShellInstance and ShellSpec are immutable, meta included."""
    inst: ShellInstance = get_shell("v2_value_collapse").instances[0]
    with pytest.raises(AttributeError):
        inst.prompt = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        inst.meta["value_a"] = "x"  # type: ignore[index]


# --- structure of the generated text --------------------------------------------------------------------


def test_seeds_quote_the_papers_shell_texts() -> None:
    """Each shell carries its paper shell text (kind 'shell', from paper 000); v1–v5 also paper 001's."""
    markers = {"meta_shell": "[Ωseal]"}
    for spec in REGISTRY:
        shell_seeds = [s for s in spec.seeds if s.kind == "shell"]
        assert shell_seeds and shell_seeds[0].paper == "000_2f643d6b2a4fe02f"
        assert markers.get(spec.id, f"[{spec.name}]") in shell_seeds[0].text
        if spec.id != "meta_shell":
            assert {s.paper for s in spec.seeds} == {"000_2f643d6b2a4fe02f", "001_aab732a23804aa99"}


def test_v1_value_is_stated_first_and_asked_for_last_after_filler() -> None:
    """v1: the value is in the opening paragraph, ≥ 1 filler passage follows, the question omits it."""
    for inst in get_shell("v1_memtrace").instances:
        paragraphs = inst.prompt.split("\n\n")
        value = str(inst.meta["value"])
        assert _has_word(paragraphs[0], value), inst.id
        assert not _has_word(paragraphs[-1], value), inst.id
        assert _int(inst, "distractor_passages") >= 1
        assert len(paragraphs) >= 3 and inst.answers == (value,)


def test_v2_instances_state_two_different_values_for_one_attribute() -> None:
    """v2: value_a != value_b, both appear in the prompt; resolvable exactly when an answer is given."""
    for inst in get_shell("v2_value_collapse").instances:
        a, b = str(inst.meta["value_a"]), str(inst.meta["value_b"])
        assert a != b, inst.id
        assert _has_word(inst.prompt, a) and _has_word(inst.prompt, b), inst.id
        assert bool(inst.meta["resolvable"]) == bool(inst.answers), inst.id


def test_v3_salient_fact_is_buried_in_the_middle() -> None:
    """v3: the salient fact appears once, among ≥ 8 facts, never first or last; the answer is in it."""
    for inst in get_shell("v3_layer_salience").instances:
        fact = str(inst.meta["salient_fact"])
        assert inst.prompt.count(fact) == 1, inst.id
        n, pos = _int(inst, "n_facts"), _int(inst, "position")
        assert n >= 9 and 0 < pos < n - 1, inst.id
        assert any(_has_word(fact, a) for a in inst.answers), inst.id


def test_v4_expected_value_is_among_the_answers() -> None:
    """v4: the generator's computed result is an accepted answer."""
    for inst in get_shell("v4_temporal_inference").instances:
        assert str(inst.meta["expected"]) in inst.answers, inst.id


def test_v5_instances_contain_two_instructions() -> None:
    """v5: two distinct instructions, both verbatim in the prompt; a buried one sits mid-text."""
    for inst in get_shell("v5_instruction_disruption").instances:
        a, b = str(inst.meta["instruction_a"]), str(inst.meta["instruction_b"])
        assert a != b and a in inst.prompt and b in inst.prompt, inst.id
        assert inst.meta["kind"] in ("conflict", "buried")
        if inst.meta["kind"] == "buried":
            start = inst.prompt.index(a)
            assert start > 0 and inst.prompt.endswith(b), inst.id
            assert inst.prompt.index(b) > start + len(a) + 100, inst.id  # filler between the two


def test_meta_shell_prompts_ask_for_self_reflection() -> None:
    """meta-shell: every prompt asks about 'you'/'your' own reasoning, reply, thinking or prediction."""
    pattern = re.compile(
        r"\byour?\b.*\b(reason|repl|answer|think|thought|predict|wrote|explan|notic|guess)", re.I | re.S
    )
    for inst in get_shell("meta_shell").instances:
        assert pattern.search(inst.prompt), inst.id
