"""Content hashes: of bytes, JSON values, files, folders, Arrow datasets and source code.

A stage's cache key is built from these (see flows/keys.py); a file is hashed once, when the manifest that
lists it is written.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20  # 1 MiB read buffer for hashing
# Files hashed by this process, by suffix (".safetensors": weights). A fully cached run hashes no weights: the
# manifests carry every output's hash (tests/test_cache_keys.py counts this).
HASHED_FILES: Counter[str] = Counter()

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object in canonical form (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return sha256_bytes(text.encode())

def sha256_file(path: Path) -> str:
    HASHED_FILES[Path(path).suffix] += 1
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()

def sha256_tree(path: Path, skip: tuple[str, ...] = ()) -> str:
    """Hash of a file, or of a folder's relative file names and contents (sorted, so order-free)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel.split("/")[0] in skip:
            continue
        h.update(rel.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()

# Weight folders (a training stage's `adapter/` or `model/`): what they compute, not where they were saved.
# Files that only describe provenance: PEFT's model card names the base by its absolute path.
WEIGHTS_SKIP = frozenset({"README.md"})
# JSON fields that say where the weights came from or how they were saved, never what they compute: the base's
# path, the hub revision, the writing library's version, tokenizer loading flags. lora_dropout is hashed: it is
# off at inference, but these weights are trained further (sft's init adapter, dpo over sft's adapter), where it
# acts, and sft's cache key reads this hash for its init adapter.
PROVENANCE_FIELDS = frozenset({"base_model_name_or_path", "revision", "inference_mode", "peft_version",
                               "_name_or_path", "name_or_path", "transformers_version", "_commit_hash",
                               "is_local", "local_files_only"})
# What sha256_weights also left out before lora_dropout was hashed: a version registered then is found by that
# hash once (tasks/lib/registry.find_version's legacy hashes) and re-tagged.
LEGACY_SKIPPED_FIELDS = frozenset({"lora_dropout"})
# JSON list fields that are sets (PEFT writes target_modules in no fixed order): compared sorted
UNORDERED_FIELDS = frozenset({"target_modules", "modules_to_save", "exclude_modules", "layers_to_transform"})


def sha256_safetensors(path: Path) -> dict[str, str]:
    """{tensor name: hash of its dtype, shape and bytes} of a .safetensors file, read from its header (8-byte
    little-endian length, then JSON {name: {dtype, shape, data_offsets}}): independent of the tensors' order in
    the file and of the free-form `__metadata__`."""
    import struct

    HASHED_FILES[Path(path).suffix] += 1
    found: dict[str, str] = {}
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        start = 8 + length
        for name, info in sorted(header.items()):
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            h = hashlib.sha256(f"{info['dtype']}:{info['shape']}\n".encode())
            f.seek(start + begin)
            left = end - begin
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise ValueError(f"{path}: tensor {name} is cut short")
                h.update(chunk)
                left -= len(chunk)
            found[name] = h.hexdigest()
    return found


def _normalised_json(path: Path, skip: frozenset[str] = frozenset()) -> Any:
    HASHED_FILES[path.suffix] += 1
    value = json.loads(path.read_text())
    if not isinstance(value, dict):
        return value
    value = {k: v for k, v in value.items() if k not in PROVENANCE_FIELDS | skip}
    for k in UNORDERED_FIELDS & value.keys():
        if isinstance(value[k], list):
            value[k] = sorted(value[k], key=str)
    return value


def sha256_weights(path: Path, skip_fields: frozenset[str] = frozenset()) -> str:
    """Hash of what a weights folder computes (a LoRA adapter or a full model, with its tokenizer files): the
    tensors of every .safetensors file by name, dtype, shape and bytes (shards merged: how the tensors are split
    into files does not matter), the JSON configs without their provenance fields and with their set-valued
    lists sorted, and the other files by content. Paths never enter: the same weights saved from two work dirs
    (adapter_config.json names the base's absolute path) hash the same. Recorded as the folder's hash in the
    training stage's manifest and tagged `alignflow.adapter_sha256` on registered versions. `skip_fields`: JSON
    fields also left out (LEGACY_SKIPPED_FIELDS gives the hash of an older alignflow)."""
    path = Path(path)
    tensors: dict[str, str] = {}
    files: dict[str, str] = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if f.name in WEIGHTS_SKIP or f.name.endswith(".safetensors.index.json"):  # the index: which shard holds what
            continue
        if f.suffix == ".safetensors":
            folder = f.parent.relative_to(path).as_posix()
            tensors.update({f"{folder}/{name}": digest for name, digest in sha256_safetensors(f).items()})
        elif f.suffix == ".json":
            try:
                files[rel] = sha256_json(_normalised_json(f, skip_fields))
            except (ValueError, UnicodeDecodeError):  # not JSON after all: its bytes
                files[rel] = sha256_file(f)
        else:
            files[rel] = sha256_file(f)
    return sha256_json({"weights-hash": 1, "tensors": tensors, "files": files})


def code_version(*modules: str) -> str:
    """Hash of the source files of the given modules (e.g. `alignflow.tasks.sft`): a code change re-runs the stage."""
    import importlib.util

    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"cannot find source of module {name}")
        h.update(Path(spec.origin).read_bytes())
    return h.hexdigest()


def sha256_dataset(dataset: Any, columns: list[str]) -> str:
    """Hash of every row of the given columns of a `datasets.Dataset`, plus the row count.

    Row values are serialised in batches of 1,000 as canonical JSON, so two datasets that differ in any row
    hash differently. (`dataset[col]` is a lazy `Column` in datasets 5: its `str()` shows only the first rows.)
    """
    h = hashlib.sha256(f"{len(dataset)}:{sorted(columns)}".encode())
    for batch in dataset.select_columns(sorted(columns)).with_format(None).iter(batch_size=1000):
        h.update(json.dumps(batch, sort_keys=True, separators=(",", ":"), default=str).encode())
    return h.hexdigest()


def package_modules(module: str, package: str = "alignflow.tasks") -> dict[str, Path]:
    """`module` and every module of `package` it imports, directly or through others (imports inside functions
    too): the code a stage runs, as {module name: source file}. Found by parsing sources; nothing is imported."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"cannot find package {package}")
    root = Path(next(iter(spec.submodule_search_locations)))

    def source(name: str) -> Path | None:
        parts = name.removeprefix(package + ".").split(".")
        for candidate in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
            if candidate.is_file():
                return candidate
        return None

    found: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = source(name) if name.startswith(package + ".") else None
        if name in found or path is None:
            continue
        found[name] = path
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` may name a module: source() keeps only names that are files
                todo += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
    return dict(sorted(found.items()))
