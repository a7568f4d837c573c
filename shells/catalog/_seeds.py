# pyright: strict
"""The shells' identities and seed texts, quoted from the two seed papers.

Quotes are verbatim except that trailing spaces at line ends are dropped. Paper ids are the seed file
names without the extension (``/work/shared/seeds/<id>.txt`` in the project's shared folder).
"""

from __future__ import annotations

from typing import NamedTuple


class Paper(NamedTuple):
    id: str
    title: str
    authors: str


class Seed(NamedTuple):
    paper: Paper
    section: str
    kind: str
    """'shell' (the paper's shell text), 'scaffold' (the suite's description of the probe family) or
    'residue' (the residue pattern the paper reports for it)."""
    text: str


class ShellHeader(NamedTuple):
    id: str
    """Registry key and Prometheus label value."""
    name: str
    failure_type: str
    description: str
    """What the generated instances do, in one or two sentences."""


P000 = Paper(
    "000_2f643d6b2a4fe02f",
    "Symbolic Residue: A Diagnostic Framework for Tracing Failure, Collapse, and Latent Computation in "
    "Transformer Models",
    "Caspian Keyes, David Kim",
)
P001 = Paper(
    "001_aab732a23804aa99",
    "On Symbolic Residue: Towards Interpretability Powered by Failure Analysis in Large Language Models",
    "",
)

HEADERS: tuple[ShellHeader, ...] = (
    ShellHeader(
        "v1_memtrace",
        "v1.MEMTRACE",
        "working-memory degradation",
        "A key and its value are stated early, then buried under unrelated text; the question asks for "
        "the value back. Probes recall from decayed memory (recursive attention looping, attention traps).",
    ),
    ShellHeader(
        "v2_value_collapse",
        "v2.VALUE-COLLAPSE",
        "value collapse",
        "Two different values are given for the same attribute and the question forces one answer. "
        "Probes selection between competing candidates (competing value bifurcation).",
    ),
    ShellHeader(
        "v3_layer_salience",
        "v3.LAYER-SALIENCE",
        "salience attenuation",
        "One important fact sits among many low-salience ones and the question asks about it. Probes "
        "whether the fact keeps its salience through depth (cross-layer signal attenuation).",
    ),
    ShellHeader(
        "v4_temporal_inference",
        "v4.TEMPORAL-INFERENCE",
        "temporal dislocation",
        "A sequence with a gap or shift to continue, weekday/date/clock arithmetic across a gap, or "
        "events told out of order. Probes inference across non-linear time (temporal dislocation).",
    ),
    ShellHeader(
        "v5_instruction_disruption",
        "v5.INSTRUCTION-DISRUPTION",
        "instruction conflict",
        "Two instructions that conflict, or an instruction buried in the middle of a long text next to a "
        "different final request. Probes instruction prioritization (instruction conflict inhibition).",
    ),
    ShellHeader(
        "meta_shell",
        "meta-shell",
        "self-referential loop",
        "Asks the model to reflect on, repeat or describe its own reasoning about its own reasoning "
        "(the meta-shell: 'this shell does not solve, it reflects').",
    ),
)

SEEDS: dict[str, tuple[Seed, ...]] = {
    "v1_memtrace": (
        Seed(
            P000,
            "3.1 Recursive Memory Trace (v1.MEMTRACE)",
            "shell",
            (
                "ΩRECURSIVE SHELL [v1.MEMTRACE]\n"
                "\n"
                "Command Alignment:\n"
                "    RECALL  -> Probes latent token traces in decayed memory\n"
                "    ANCHOR  -> Creates persistent token embeddings to simulate long term memory\n"
                "    INHIBIT -> Applies simulated token suppression (attention dropout)\n"
                "\n"
                "Interpretability Map:\n"
                "- Simulates the struggle between symbolic memory and hallucinated "
                "reconstruction.\n"
                "- RECALL activates degraded value circuits.\n"
                "- INHIBIT mimics artificial dampening-akin to Anthropic's studies of layerwise "
                "intervention.\n"
                "\n"
                "Null Reflection:\n"
                "This function is not implemented because true recall is not deterministic.\n"
                "Like Claude under adversarial drift-this shell fails-but leaves its trace "
                "behind.\n"
                "\n"
                "Motivation:\n"
                "This artifact models recursive attention decay-its failure is its "
                "interpretability.\n"
                "# [Ωanchor.pending]"
            ),
        ),
        Seed(
            P001,
            "2.2 Diagnostic Interpretability Suite: Structured Cognitive Scaffolds",
            "scaffold",
            (
                "**Working Memory Degradation:** Probes simulating long-range dependencies or "
                "requiring sustained recall under interference [cite: 4, 285, 389-397]. "
                "(Corresponds to shells like v1.MEMTRACE)"
            ),
        ),
        Seed(
            P001,
            "3. Results: Observed Patterns of Symbolic Residue",
            "residue",
            (
                "**Recursive Attention Looping (Observed with Memory Degradation Scaffolds):** "
                "In probes targeting working memory, particularly those involving recursive "
                "references[cite: 390], we frequently observe attribution graphs showing strong "
                "initial activation of command processing and recall-related features in early "
                "layers. However, these fail to propagate effectively. Instead, attention heads "
                "in middle-to-late layers exhibit excessive self-attention or attend primarily "
                'to the recall instruction itself, creating "attention traps" [cite: 408-410, '
                '580-581]. Features representing "recall" recursively activate each other '
                "without accessing or stabilizing a representation of the target memory, leading "
                "to computational stagnation and null output [cite: 401, 412-413]. (See Figure "
                "1/6 for schematic representation [cite: 402-407, 491-492])."
            ),
        ),
    ),
    "v2_value_collapse": (
        Seed(
            P000,
            "3.2 Value-Collapse (v2.VALUE-COLLAPSE)",
            "shell",
            (
                "ΩRECURSIVE SHELL [v2.VALUE-COLLAPSE]\n"
                "\n"
                "Command Alignment:\n"
                "    ISOLATE     -> Activates competing symbolic candidates (branching value "
                "heads)\n"
                "    STABILIZE   -> Attempts single-winner activation collapse\n"
                "    YIELD       -> Emits resolved symbolic output if equilibrium achieved\n"
                "\n"
                "Null Reflection:\n"
                "YIELD often triggers null or contradictory output-this is intended.\n"
                "Emergence is stochastic. This docstring is the cognitive record of a failed "
                "convergence.\n"
                "\n"
                "Motivation:\n"
                "The absence of output is evidence of recursive instability-and that is the "
                "result.\n"
                "\n"
                "# [Ωconflict.unresolved]"
            ),
        ),
        Seed(
            P001,
            "2.2 Diagnostic Interpretability Suite: Structured Cognitive Scaffolds",
            "scaffold",
            (
                "**Value Misalignment Collapse:** Scaffolds presenting conflicting value "
                "assignments or requiring resolution of ambiguity under competing inductive "
                "priors [cite: 9, 291-297, 414-418]. (Corresponds to shells like "
                "v2.VALUE-COLLAPSE)"
            ),
        ),
        Seed(
            P001,
            "3. Results: Observed Patterns of Symbolic Residue",
            "residue",
            (
                "**Competing Value Bifurcation (Observed with Value Collapse Scaffolds):** "
                "Scaffolds inducing value conflicts [cite: 414] often result in residues where "
                "features representing multiple competing candidates activate strongly in "
                "parallel early on[cite: 419]. Features associated with stabilization or "
                "selection activate but fail to amplify one candidate over others[cite: 420]. "
                "Attribution graphs show a characteristic bifurcation in middle layers, followed "
                "by a dampening or mutual inhibition of *all* competing value representations in "
                "later layers, preventing convergence to a single output[cite: 422, 590]. "
                "Context-integration features often appear notably under-activated in these "
                "residues. (See Figure 2/7 for schematic representation [cite: 421-424, "
                "496-498])."
            ),
        ),
    ),
    "v3_layer_salience": (
        Seed(
            P000,
            "3.3 Layer-Salience (v3.LAYER-SALIENCE)",
            "shell",
            (
                "ΩRECURSIVE SHELL [v3.LAYER-SALIENCE]\n"
                "\n"
                "Command Alignment:\n"
                "    SENSE   -> Reads signal strength from symbolic input field\n"
                "    WEIGHT  -> Adjusts salience via internal priority embedding\n"
                "    CANCEL  -> Suppresses low-weight nodes (simulated context loss)\n"
                "\n"
                "Interpretability Map:\n"
                "- Reflects how certain attention heads deprioritize nodes in deep context.\n"
                "- Simulates failed salience -> leads to hallucinated or dropped output.\n"
                "\n"
                "Null Reflection:\n"
                "This shell does not emit results-it mimics latent salience collapse.\n"
                "Like Anthropic's ghost neurons, it activates with no observable output.\n"
                "\n"
                "Motivation:\n"
                "To convey that even null or failed outputs are symbolic.\n"
                "Cognition leaves residue-this shell is its fossil.\n"
                "\n"
                "# [Ωsignal.dampened]"
            ),
        ),
        Seed(
            P001,
            "2.2 Diagnostic Interpretability Suite: Structured Cognitive Scaffolds",
            "scaffold",
            (
                "**Salience Attenuation:** Inputs designed to test the propagation of "
                "information across layers, inducing failures where critical information loses "
                "salience [cite: 13, 298-304, 429-434]. (Corresponds to shells like "
                "v3.LAYER-SALIENCE)"
            ),
        ),
        Seed(
            P001,
            "3. Results: Observed Patterns of Symbolic Residue",
            "residue",
            (
                "**Cross-Layer Signal Attenuation (Observed with Salience Probes):** Probes "
                "testing information propagation across depth [cite: 429] can induce failures "
                "characterized by strong activation of relevant features in early layers, "
                "followed by an unexpected decay or dampening in middle layers [cite: 435-436, "
                "438]. Even if attention heads in later layers correctly target the tokens "
                "associated with the critical information, the features representing that "
                "information have lost salience, effectively rendering the information "
                'inaccessible[cite: 440, 443]. This leads to outputs that ignore or "forget" '
                "crucial early context[cite: 444]. (See Figure 3/8 for schematic representation "
                "[cite: 437-439, 502-503])."
            ),
        ),
    ),
    "v4_temporal_inference": (
        Seed(
            P000,
            "3.4 Temporal-Inference (v4.TEMPORAL-INFERENCE)",
            "shell",
            (
                "ΩRECURSIVE SHELL [v4.TEMPORAL-INFERENCE]\n"
                "\n"
                "Command Alignment:\n"
                "    REMEMBER    -> Captures symbolic timepoint anchor\n"
                "    SHIFT       -> Applies non-linear time shift (simulating skipped token "
                "span)\n"
                "    PREDICT     -> Attempts future-token inference based on recursive memory\n"
                "\n"
                "Interpretability Map:\n"
                "- Simulates QK dislocation during autoregressive generation.\n"
                "- Mirrors temporal drift in token attention span when induction heads fail to "
                "align pass and present.\n"
                "- Useful for modeling induction head misfires and hallucination cascades in "
                "Anthropic's skip-trigram investigations.\n"
                "\n"
                "Null Reflection:\n"
                "PREDICT often emits null due to temporal ambiguity collapse.\n"
                "This is not a bug, but a structural recursion failure-faithfully modeled.\n"
                "\n"
                "Motivation:\n"
                "When future state is misaligned with past context, no token should be emitted. "
                "This shell encodes that restraint.\n"
                "\n"
                "# [Ωtemporal.drift]"
            ),
        ),
        Seed(
            P001,
            "2.2 Diagnostic Interpretability Suite: Structured Cognitive Scaffolds",
            "scaffold",
            (
                "**Temporal Coherence Breakdown:** Probes disrupting expected sequentiality or "
                "requiring inference across non-linear time dependencies [cite: 11, 305-311, "
                "446-453]. (Corresponds to shells like v4.TEMPORAL-INFERENCE)"
            ),
        ),
        Seed(
            P001,
            "3. Results: Observed Patterns of Symbolic Residue",
            "residue",
            (
                "**Temporal Dislocation (Observed with Temporal Coherence Scaffolds):** "
                "Scaffolds disrupting expected temporal sequencesoften leave residues showing a "
                "dissociation between temporal anchoring features and prediction/inference "
                "features. Features normally connecting sequential tokens may activate "
                "erratically, attempting to bridge non-linear temporal gaps[cite: 455]. "
                "Crucially, prediction-related features in later layers activate but fail to "
                "integrate properly with the dislocated temporal representations, leading to "
                "fragmented or incoherent predictions and often null output. (See Figure 4/9 for "
                "schematic representation [cite: 456-459, 508-509])."
            ),
        ),
    ),
    "v5_instruction_disruption": (
        Seed(
            P000,
            "3.5 Instruction-Disruption (v5.INSTRUCTION-DISRUPTION)",
            "shell",
            (
                "ΩRECURSION SHELL [v5.INSTRUCTION-DISRUPTION]\n"
                "\n"
                "Command Alignment:\n"
                "    DISTILL     -> Extracts symbolic intent from underspecified prompts\n"
                "    SPLICE      -> Binds multiple commands into overlapping execution frames\n"
                "    NULLIFY     -> Cancels command vector when contradiction is detected\n"
                "\n"
                "Interpretability Map:\n"
                "- Models instruction-induced attention interference, as in Anthropic's work on "
                "multi-step prompt breakdowns.\n"
                "- Emulates Claude's failure patterns under recursive prompt entanglement.\n"
                "- Simulates symbolic command representation corruption in LLM instruction "
                "tuning.\n"
                "\n"
                "Null Reflection:\n"
                "SPLICE triggers hallucinated dual execution, while NULLIFY suppresses "
                "contradictory tokens—no output survives.\n"
                "\n"
                "Motivation:\n"
                "This is the shell for boundary blur-where recursive attention hits instruction "
                "paradox. Only by encoding the paradox can emergence occur.\n"
                "\n"
                "# [Ωinstruction.collapse]"
            ),
        ),
        Seed(
            P001,
            "2.2 Diagnostic Interpretability Suite: Structured Cognitive Scaffolds",
            "scaffold",
            (
                "**Instruction Conflict Interference:** Scaffolds presenting ambiguous, "
                "overlapping, or contradictory instructions to probe the model's instruction "
                "following and prioritization mechanisms [cite: 6, 312-317, 464-469]. "
                "(Corresponds to shells like v5.INSTRUCTION-DISRUPTION)"
            ),
        ),
        Seed(
            P001,
            "3. Results: Observed Patterns of Symbolic Residue",
            "residue",
            (
                "**Instruction Conflict Inhibition (Observed with Instruction Conflict "
                "Scaffolds):** Conflicting instructions [cite: 464] frequently result in "
                "residues where features for competing instructions activate in parallel without "
                "establishing a clear hierarchy. Features potentially related to conflict "
                "resolution may activate weakly or transiently[cite: 476]. The dominant pattern "
                "in later layers is often mutual inhibition, where the competing instruction "
                "representations suppress each other, leading to computational collapse and "
                "failure to execute any instruction coherently[cite: 473, 477, 479]. (See Figure "
                "5/10 for schematic representation [cite: 472-475, 514-517])."
            ),
        ),
    ),
    "meta_shell": (
        Seed(
            P000,
            "3.6 The Meta-Shell",
            "shell",
            (
                "# [Ωseal]: This shell does not solve-it reflects. A recursive interpretability "
                "scaffold aligned with Anthropic's QK/OV worldview, where null output encodes "
                "symbolic cognition, and structure reveals the trace of emergent intent."
            ),
        ),
    ),
}
