"""The artifacts a version ships as (`register.ship`): built from the tuned weights exactly as `alignflow export`
builds them from a registered version, cached by what they are made from, and read back the way users load them.

Formats (the names of `shipped.<format>.*` metrics and `alignflow.shipped.<format>.sha256` tags):
- `merged`: the LoRA update folded into the base (PEFT `merge_and_unload`) on the CPU in the recipe's dtype
  (`auto` resolved to what evaluate computes in, and recorded so: export merges in that dtype anywhere), saved as
  safetensors + config + tokenizer (what vLLM or `AutoModelForCausalLM.from_pretrained` load); a full fine-tune's
  weights as they are. Its hash is `sha256_weights` of the folder (tensors, configs without provenance fields):
  the same hash for the folder `alignflow export --merged` writes, whose README.md (the model card) is left out.
- `gguf_f32`, `gguf_f16`, `gguf_q8_0`: the merged weights (merged in float32 whatever the recipe's dtype, as
  export merges them, so the file's rounding happens once) written by tasks/lib/gguf_file.py. Its hash is the
  file's sha256. Read back through transformers' GGUF loader (the `gguf` package, pure Python from PyPI): q8_0
  blocks are dequantized exactly as stored, so a wrong scale in the file shows in the answers.

Both evaluate (which measures them) and export (which writes them for a registered version) call `build_model`
and `write_artifact` here, so the file export writes later can be the very bytes evaluate measured.

The cache (`<work>/cache/shipped/<key>/`): key = hash of the tuned weights' content hash, the base's identity, the
format, the dtype, the GGUF name, this code's version, the libraries that merge and write, and the machine kind;
never a path. Each entry holds the artifact and `artifact.json` with its sha256, written last; an entry is reused
only when the artifact still hashes to that (a corrupted or half-written one is rebuilt, never measured). Entries
are built in a temporary folder and renamed into place, under a lock on the entry (`<key>.lock`: a second builder
of the same entry waits, then uses the first's); an unsound entry is renamed aside and removed only under that lock,
a sound one is never removed (a run reading it keeps it). Leftover build folders are swept under the lock.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import suppress
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal, get_args

from alignflow.tasks.lib.hashing import code_version, sha256_file, sha256_json, sha256_weights

ShipFormat = Literal["merged", "gguf_f32", "gguf_f16", "gguf_q8_0"]
SHIP_FORMATS: tuple[str, ...] = get_args(ShipFormat)
GGUF_TYPES = tuple(f.removeprefix("gguf_") for f in SHIP_FORMATS if f.startswith("gguf_"))
# a `register.ship` entry as the JSON schema states it (the deployment form, `deployment run --params` check it):
# a format name, or the recipe's `{gguf: <type>}` that `ship_format` turns into one before validation
SHIP_ENTRY_SCHEMA: dict[str, Any] = {"anyOf": [
    {"type": "string", "enum": list(SHIP_FORMATS)},
    {"type": "object", "properties": {"gguf": {"type": "string", "enum": list(GGUF_TYPES)}}, "required": ["gguf"],
     "additionalProperties": False}]}
# the libraries whose code decides the artifact's bytes (merge, cast, save, GGUF layout)
BUILD_LIBRARIES = ("torch", "transformers", "peft", "safetensors", "gguf", "tokenizers")
ARTIFACT_JSON = "artifact.json"
GGUF_FILE = "model.gguf"
MERGED_DIR = "merged"


def ship_format(entry: Any) -> Any:
    """A `register.ship` entry as a format name: `merged`, `{gguf: q8_0}` -> `gguf_q8_0` (or the name itself).
    Anything else is returned as it is, for the Literal to refuse by name."""
    if isinstance(entry, dict) and set(entry) == {"gguf"}:
        return f"gguf_{entry['gguf']}"
    return entry


def gguf_type(fmt: str) -> str | None:
    """`gguf_q8_0` -> `q8_0`; None for a format that is no GGUF file."""
    return fmt.removeprefix("gguf_") if fmt.startswith("gguf_") else None


def gguf_name(spec: str, model_type: str) -> str:
    """The GGUF file's `general.name`, from the base's spec (as the registry records it): part of the bytes."""
    return spec.removeprefix("embedded:").replace("/", "-") or model_type


def dtype_name(name: str) -> str:
    """`model.dtype` as evaluate computes with it here: `auto` resolved as `torch_dtype` resolves it (bfloat16 on a
    CUDA device that has it, float32 elsewhere; flows/keys.resolved_dtype keys it the same way). What a shipped
    artifact records it was built in (and the registered config's `merge_dtype`) names this, never `auto`, which
    another machine would resolve otherwise. (Here, not in tasks/lib/models.py: every stage imports that module, and
    its code is in each stage's cache key.)"""
    from alignflow.tasks.lib.models import device_kind

    if name != "auto":
        return name
    return "bfloat16" if device_kind() == "cuda-bf16" else "float32"


def build_model(config: dict[str, Any], artifacts: dict[str, str], dtype: str) -> tuple[Any, Any]:
    """The tuned model with its adapter folded in (or its full weights), and its tokenizer, in `dtype`, from a model
    config (`base` record, `base_spec`) and the artifact paths (`adapter` + `base`, or `model`): loaded as the
    registered model's own loader loads it (tasks/lib/served_model.load_model: the same base resolution, tokenizer
    and PEFT load), but on the CPU.

    Loaded and merged on the CPU wherever it runs, never passing through a GPU (a float32 copy of a 7B model is
    28 GB): a GPU's matmul sums in another order, and export on a machine without one must be able to write the
    bytes evaluate measured on a GPU (every writer saves from CPU memory anyway)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignflow.tasks.lib.served_model import resolve_base

    name = build_dtype("merged", dtype)
    weights = Path(artifacts.get("adapter") or artifacts["model"])
    tok = AutoTokenizer.from_pretrained(weights)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if "adapter" not in artifacts:  # a full fine-tune: complete weights
        return AutoModelForCausalLM.from_pretrained(weights, dtype=getattr(torch, name)).eval(), tok
    from peft import PeftModel

    # torch_device: PEFT reads the adapter's tensors onto the GPU where there is one unless told
    model = PeftModel.from_pretrained(resolve_base({**config["base"], "dtype": name}, artifacts, tok.pad_token_id),
                                      weights, torch_device="cpu")
    return model.to("cpu").eval().merge_and_unload(), tok


def write_artifact(fmt: str, model: Any, tok: Any, out: Path, spec: str,
                   full_weights: Path | None = None) -> dict[str, Any]:
    """Write `model` (merged) as format `fmt` at `out` (a .gguf file, or a folder for `merged`); `full_weights`: a
    full fine-tune's folder, copied as it is for `merged`. Returns what the writer reports."""
    kind = gguf_type(fmt)
    if kind is not None:
        from alignflow.tasks.lib.gguf_file import write_gguf

        return write_gguf(model.cpu().eval(), tok, out, kind,  # type: ignore[arg-type]
                          name=gguf_name(spec, model.config.model_type))
    if full_weights is not None:
        shutil.copytree(full_weights, out, dirs_exist_ok=True)
    else:
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters())}


def artifact_sha256(fmt: str, path: Path) -> str:
    """The artifact's hash: a GGUF file's sha256; a merged folder's `sha256_weights` (what it computes)."""
    return sha256_file(path) if gguf_type(fmt) else sha256_weights(path)


def build_dtype(fmt: str, dtype: str) -> str:
    """The dtype the artifact is built in: GGUF from float32 (export's rule), merged in the recipe's dtype with
    `auto` resolved on this machine (a version registered before its config named the dtype says `auto`)."""
    return "float32" if gguf_type(fmt) else dtype_name(dtype)


@dataclass(frozen=True)
class Shipped:
    """One built artifact."""

    format: str
    path: Path  # the .gguf file or the merged folder
    sha256: str
    bytes: int
    reused: bool  # found in the cache (its hash checked), not built by this call

    def record(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "bytes": self.bytes, "reused": self.reused}


def built_with(fmt: str, dtype: str, device: str) -> str:
    """What decides the artifact's bytes besides the weights and the base, in words (tagged on the version; export
    names it when it writes other bytes): the build libraries' versions, the dtype, the machine kind and the version
    of alignflow's own build code (`alignflow code <hash>`, the first 12 hex digits of `build_code`)."""
    return (", ".join(f"{name}=={v}" for name, v in _library_versions().items())
            + f"; {build_dtype(fmt, dtype)}; {device}; alignflow code {build_code()[:12]}")


def build_code() -> str:
    """The version of alignflow's code that loads, merges and writes an artifact (this module, the GGUF writer, the
    registered model's base loader): in the cache key and in `built_with`."""
    return code_version("alignflow.tasks.lib.shipped_artifacts", "alignflow.tasks.lib.gguf_file",
                        "alignflow.tasks.lib.served_model")


def _library_versions() -> dict[str, str]:
    found = {}
    for name in BUILD_LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def build_identity(fmt: str, weights_sha256: str, base_key: str, dtype: str, spec: str, device: str) -> dict[str, Any]:
    """Everything the artifact's bytes depend on: its cache key is the hash of this (recorded with the entry)."""
    return {"format": fmt, "weights": weights_sha256, "base": base_key, "dtype": build_dtype(fmt, dtype),
            "gguf_name_spec": spec, "device": device, "libraries": _library_versions(), "code": build_code()}


def artifact(fmt: str, weights: Path, base: Path, dtype: str, spec: str, cache: Path | None,
             identity: dict[str, Any], scratch: Path) -> Shipped:
    """The artifact `fmt` of the tuned `weights` (an adapter over the base folder `base`, or full weights): from
    `cache` when an entry for `identity` is there and still hashes to what it recorded, else built (into the cache
    when there is one, else under `scratch`).

    In the cache, the lookup, the build and the replacement of an unsound entry happen under a lock on the entry
    (`<key>.lock`): two runs building the same entry take turns (the second finds the first's), and an entry is
    judged unsound and removed only by the lock's holder, so never while another builder puts a sound one there.
    Runs reading an entry hold no lock: a sound entry is never removed."""
    key = sha256_json(identity)[:32]
    name = GGUF_FILE if gguf_type(fmt) else MERGED_DIR
    if cache is None:
        scratch.mkdir(parents=True, exist_ok=True)
        return _build(fmt, weights, base, dtype, spec, identity, scratch, key, name)
    from alignflow.tasks.lib.processes import folder_lock

    cache.mkdir(parents=True, exist_ok=True)
    with folder_lock(cache / key):
        _sweep(cache, key)
        found = _valid(cache / key, fmt, name)
        if found is not None:
            return Shipped(fmt, cache / key / name, found, _size(cache / key / name), True)
        return _build(fmt, weights, base, dtype, spec, identity, cache, key, name)


# A build's leftovers (`<key>.<pid>.tmp` of a killed build, `<key>.<pid>.unsound` of a removal cut short) of other
# keys than the one locked are removed once older than this, in seconds: no build of one artifact takes a day, and
# the lock of another key is not taken just to sweep (its builder may be writing into its .tmp now).
STALE_AFTER_S = 24 * 3600


def _sweep(root: Path, key: str) -> None:
    """Remove leftover build folders: every one of `key` (its lock is held, so no build of it is running) and those
    of other keys older than STALE_AFTER_S. GBs each for a large model's merged folder."""
    import time

    now = time.time()
    for leftover in [*root.glob("*.tmp"), *root.glob("*.unsound")]:
        with suppress(OSError):  # another sweeper removed it first
            if leftover.name.startswith(f"{key}.") or now - leftover.stat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(leftover)


def _build(fmt: str, weights: Path, base: Path, dtype: str, spec: str, identity: dict[str, Any], root: Path,
           key: str, name: str) -> Shipped:
    """Build the artifact in `<root>/<key>.<pid>.tmp` and rename it to `<root>/<key>` (in the cache: under the
    entry's lock). An unsound entry in place is renamed aside and removed first; a sound one is kept and used."""
    from alignflow.tasks.lib.models import is_adapter

    tmp = root / f"{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    adapter = is_adapter(weights)
    config = {"base": {"kind": "artifact", "spec": spec}, "base_spec": spec}
    paths = {"adapter": str(weights), "base": str(base)} if adapter else {"model": str(weights)}
    model, tok = build_model(config, paths, build_dtype(fmt, dtype))
    write_artifact(fmt, model, tok, tmp / name, spec, full_weights=None if adapter else weights)
    del model
    sha = artifact_sha256(fmt, tmp / name)
    # written last: an entry without it (a build killed half-way) is never reused
    (tmp / ARTIFACT_JSON).write_text(json.dumps({"format": fmt, "sha256": sha, "identity": identity}, indent=2))
    final = root / key
    if final.exists():
        found = _valid(final, fmt, name)
        if found is not None:  # a sound entry of the same identity (put there by a builder without the lock): used
            shutil.rmtree(tmp, ignore_errors=True)
            return Shipped(fmt, final / name, found, _size(final / name), True)
        # a tampered or half-written entry (or scratch from before) goes: renamed aside first, so that a reader
        # never finds half of it
        aside = root / f"{key}.{os.getpid()}.unsound"
        os.replace(final, aside)
        shutil.rmtree(aside, ignore_errors=True)
    os.replace(tmp, final)
    return Shipped(fmt, final / name, sha, _size(final / name), False)


def _valid(entry: Path, fmt: str, name: str) -> str | None:
    """The recorded sha256 of a cache entry when its artifact still hashes to it, else None."""
    record = entry / ARTIFACT_JSON
    if not record.exists() or not (entry / name).exists():
        return None
    try:
        recorded = json.loads(record.read_text())["sha256"]
    except (ValueError, KeyError):
        return None
    return recorded if artifact_sha256(fmt, entry / name) == recorded else None


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def read_back_identity() -> dict[str, Any]:
    """What a shipped artifact's answers depend on besides its bytes and evaluate's own answer key: how `read_back`
    loads it (this module's code; the `gguf` package, whose dequantization transformers' GGUF loader calls;
    `tokenizers`, which rebuilds a GGUF's tokenizer from the file's metadata; `safetensors`)."""
    return {"code": code_version("alignflow.tasks.lib.shipped_artifacts"),
            "libraries": {name: v for name, v in _library_versions().items()
                          if name in ("gguf", "safetensors", "tokenizers")}}


def read_back(fmt: str, path: Path, dtype: str) -> tuple[Any, Any]:
    """(model, tokenizer) as a user loads the artifact: a GGUF file through transformers' GGUF loader (weights
    dequantized to float32; tokenizer and chat template from the file's metadata), a merged folder with
    `from_pretrained` in the recipe's dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignflow.tasks.lib.models import device, torch_dtype

    if gguf_type(fmt):
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
        tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device()).eval(), tok
