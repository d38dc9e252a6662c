"""export: a registered model as plain files that need neither alignflow nor MLflow.

Reads only what the registry holds (the version's artifacts and model config): the base model is resolved from
the spec recorded there, exactly as loading the registered model does (tasks/lib/served_model.py), so no path of
the machine that trained it is needed.

- merged: the LoRA update folded into the base weights (PEFT `merge_and_unload`), saved as safetensors with
  config, generation config and tokenizer (chat template included): `AutoModelForCausalLM.from_pretrained(OUT)`
  loads it anywhere transformers runs.
- adapter: the PEFT adapter folder + tokenizer, and `base_model.json` naming the base it applies to.
- gguf: the merged weights as one GGUF file for llama.cpp / Ollama (`tasks/lib/gguf_file.py`: Llama-family
  architectures, byte-level BPE tokenizers, tokenizer and chat template in the metadata), in f32, f16 or q8_0.

A full fine-tune was registered as complete weights: `merged` copies them; it has no adapter to export.

`merged` and `adapter` also write the version's model card (`MODEL_CARD.md`, logged with the version by register:
tasks/lib/model_card.py) as the folder's `README.md`, so the folder can be pushed to a model hub as it is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from alignflow.tasks.lib.errors import StageError


class MeasuredArtifact(BaseModel):
    sha256: str  # what evaluate measured: the file export must write
    built_with: str = ""  # libraries, dtype and machine kind that built it
    artifact_uri: str = ""  # where register logged it (register.log_shipped), '' when it did not
    logged: Path | None = None  # that file, downloaded (a GGUF; a merged folder is rebuilt and checked instead)


class ExportInputs(BaseModel):
    artifacts: Path  # the version's downloaded `artifacts/` folder: adapter/ or model/, and base/ when logged
    config: dict[str, Any]  # the version's model config (base record, base spec, dtype)
    out_dir: Path
    kind: Literal["merged", "adapter", "gguf"] = "merged"
    gguf_type: Literal["f32", "f16", "q8_0"] = "f16"  # kind gguf: how the 2-D weights are stored
    # the artifacts evaluate measured for this version (register.ship; its `alignflow.shipped.<format>.*` tags)
    measured: dict[str, MeasuredArtifact] = {}


def run(inputs: ExportInputs) -> dict[str, Any]:
    if inputs.kind == "gguf":
        return _gguf(inputs)
    import os

    # a merged folder of a version measured as `merged` (register.ship) is written beside OUT, checked against the
    # measured hash, and copied into OUT only then
    want = inputs.measured.get("merged") if inputs.kind == "merged" else None
    target = inputs.out_dir.resolve()  # `.` has no name to write a sibling by; the absolute path has
    if want is not None and target.exists() and (not target.is_dir() or any(target.iterdir())):
        # the measured folder is put in place whole (one rename), never mixed into files already there
        raise StageError(f"export: {target} exists and is not empty; the merged folder this version was measured as "
                         "is written whole into a new or empty folder: choose another OUT, or empty it")
    if want is not None and Path.cwd().resolve().is_relative_to(target):
        # the empty folder is replaced by the checked one: the shell standing in it would stand in a deleted folder
        raise StageError(f"export: {target} is the current directory (or holds it); the merged folder this version "
                         "was measured as replaces OUT whole: name a new folder, e.g. --merged ./model")
    staged = inputs.model_copy(update={"out_dir": target.with_name(f".{target.name}.{os.getpid()}.partial")}) \
        if want is not None else inputs
    try:
        result = _files(staged)
        card = inputs.artifacts.parent / "MODEL_CARD.md"  # beside MLmodel; versions registered before cards have none
        if card.exists():  # replaces the README.md PEFT writes into an adapter folder (a template naming no data)
            shutil.copyfile(card, staged.out_dir / "README.md")
        sha = None
        if want is not None:
            from alignflow.tasks.lib.hashing import sha256_weights

            sha = sha256_weights(staged.out_dir)  # the hash evaluate took (README.md, the card, left out)
            if sha != want.sha256:
                raise StageError(_not_measured("merged", sha, want, target, merge_dtype(inputs.config, want),
                                               str(inputs.config.get("base_spec", ""))))
            if target.exists():
                target.rmdir()  # empty (checked above): the rename below replaces it
            os.replace(staged.out_dir, target)  # the checked folder, whole, or nothing
    finally:
        if want is not None:
            shutil.rmtree(staged.out_dir, ignore_errors=True)
    return {**result, "out_dir": str(target), "readme": card.exists(), "sha256": sha, "format": "merged",
            "measured": (want is not None) if inputs.measured and inputs.kind == "merged" else None,
            "measured_formats": sorted(inputs.measured)}


def merge_dtype(config: dict[str, Any], measured: MeasuredArtifact | None = None) -> str:
    """The dtype a merged export is built in: the dtype of the merged artifact the version's verdict measured (its
    `alignflow.shipped.merged.built_with` tag, rewritten with every verdict, so it also holds for a version created
    before register recorded `merge_dtype` and measured later); else the registered config's `merge_dtype` (what
    evaluate built in when the version was created, `auto` resolved there); else its `dtype` (`auto` is then
    resolved on this machine)."""
    recorded = measured.built_with.split("; ") if measured is not None else []
    if len(recorded) >= 3 and recorded[1] in ("float32", "bfloat16", "float16"):  # "<libraries>; <dtype>; ..."
        return recorded[1]
    return str(config.get("merge_dtype") or config.get("dtype", "float32"))


def _not_measured(fmt: str, sha: str, want: MeasuredArtifact, out: Path, dtype: str, base_spec: str) -> str:
    """Why export refuses: it built other bytes than the artifact evaluate measured for this version; what differs
    between the recorded build and this one, and what to do (only what can work for this format)."""
    from alignflow.tasks.lib.models import device_kind
    from alignflow.tasks.lib.shipped_artifacts import built_with

    here = built_with(fmt, dtype, device_kind())
    said = (f"export: the {fmt} artifact rebuilt here (sha256 {sha[:16]}…) is not the one evaluate measured for "
            f"this version (sha256 {want.sha256[:16]}…), so nothing was written to {out}. ")
    if not want.built_with:
        said += f"How it was built was not recorded; here: {here}. "
    elif want.built_with == here:
        # the recorded settings cannot tell which of these it is: each is named as a possibility, none as the cause
        said += (f"It was built with the same libraries, dtype, machine kind and alignflow build code as here "
                 f"({here}), so what differs is something that record does not cover, possibly: the base model "
                 f"resolved from the spec the version recorded ({base_spec!r}: a local folder or hub revision that "
                 "changed since); alignflow code outside the build code the record hashes, or a library outside "
                 "its list; or the recorded sha256 itself (a tag edited since). ")
    else:
        from itertools import zip_longest

        # built_with is "libraries; dtype; machine kind; alignflow code <hash>" (a tag from before the code was
        # recorded has three parts: its build code is unknown, so named as differing)
        differ = [name for name, mine, theirs in zip_longest(("the libraries", "the dtype", "the machine kind",
                                                              "alignflow's build code"),
                                                             here.split("; "), want.built_with.split("; "))
                  if name and mine != theirs]
        said += (f"It was built with {want.built_with}; here: {here}. What differs: {', '.join(differ)}; other "
                 "libraries, dtype, machine kind or build code merge, round or write differently: export where "
                 "they match the recorded ones. ")
    if want.artifact_uri:
        said += f"The measured {'file' if fmt.startswith('gguf') else 'folder'} was logged with the version: " \
                f"`mlflow artifacts download -u {want.artifact_uri}` fetches it."
    else:
        said += "The measured artifact was not logged with the version; register.log_shipped: true logs the " \
                "measured file itself with a version from the next verdict register writes on it."
    return said


def _logged_differs(fmt: str, sha: str, want: MeasuredArtifact, out: Path) -> str:
    """Why export refuses the file register logged with the version: it is not the one the version's sha256 names."""
    return (f"export: the {fmt} file logged with this version ({want.artifact_uri}) hashes to {sha[:16]}…, not to "
            f"the alignflow.shipped.{fmt}.sha256 recorded with it ({want.sha256[:16]}…): the version's tags do not "
            f"agree with its logged file, so nothing was written to {out}. Deleting the version's tag "
            f"alignflow.shipped.{fmt}.artifact_uri makes export rebuild the artifact and check it against the sha256")


def _files(inputs: ExportInputs) -> dict[str, Any]:
    out = inputs.out_dir
    if not (inputs.artifacts / "adapter").exists():
        if inputs.kind == "adapter":
            raise StageError("export: this model is a full fine-tune (complete weights, no adapter); use --merged")
        shutil.copytree(inputs.artifacts / "model", out, dirs_exist_ok=True)  # already plain transformers files
        return {"kind": "merged", "out_dir": str(out)}
    adapter = inputs.artifacts / "adapter"
    config = dict(inputs.config)
    if "base" not in config:  # registered before bases were recorded by spec: only the trainer's path is known
        config["base"] = {"kind": "artifact", "spec": config.get("base_spec", "")}
    out.mkdir(parents=True, exist_ok=True)
    if inputs.kind == "adapter":
        shutil.copytree(adapter, out, dirs_exist_ok=True)
        (out / "base_model.json").write_text(json.dumps({"base_spec": config.get("base_spec", ""),
                                                         "base": config["base"]}, indent=2))
        return {"kind": "adapter", "out_dir": str(out)}

    merged, tok = _merged(inputs, merge_dtype(config, inputs.measured.get("merged")))
    merged.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"kind": "merged", "out_dir": str(out), "params": sum(p.numel() for p in merged.parameters())}


def _merged(inputs: ExportInputs, dtype: str) -> tuple[Any, Any]:
    """The registered model with its adapter folded in (or its full weights), and its tokenizer, in `dtype`; the
    base resolved from the spec the registry recorded (tasks/lib/served_model.py)."""
    from alignflow.tasks.lib.shipped_artifacts import build_model

    config = dict(inputs.config)
    if "base" not in config:
        config["base"] = {"kind": "artifact", "spec": config.get("base_spec", "")}
    if not (inputs.artifacts / "adapter").exists():  # a full fine-tune: complete weights
        return build_model(config, {"model": str(inputs.artifacts / "model")}, dtype)
    artifacts = {"adapter": str(inputs.artifacts / "adapter")}
    logged = _logged_artifacts(inputs.artifacts.parent)
    if "base" in logged:
        artifacts["base"] = logged["base"]
    elif config["base"]["kind"] == "artifact" and config.get("base_path"):
        artifacts["base"] = str(config["base_path"])  # an older version: its base folder on this machine
    return build_model(config, artifacts, dtype)  # the same merge evaluate measured (register.ship)


def _gguf(inputs: ExportInputs) -> dict[str, Any]:
    """Merge in memory, then write one GGUF file. Merging happens in float32 whatever the recipe's dtype, so the
    file's f16 / q8_0 rounding happens once."""
    import os

    from alignflow.tasks.lib.hashing import sha256_file
    from alignflow.tasks.lib.shipped_artifacts import build_dtype, write_artifact

    fmt = f"gguf_{inputs.gguf_type}"
    out = inputs.out_dir.resolve()
    if out.is_dir():  # said before the build, not after it
        raise StageError(f"export: {out} is a folder; --gguf writes one file: name it, e.g. {out / 'model.gguf'}")
    want = inputs.measured.get(fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")  # renamed into place once checked
    try:
        if want is not None and want.logged is not None:  # the very file evaluate measured, as register logged it
            shutil.copyfile(want.logged, partial)
            written: dict[str, Any] = {"gguf_type": inputs.gguf_type, "source": "logged"}
        else:
            model, tok = _merged(inputs, build_dtype(fmt, "float32"))
            written = {**write_artifact(fmt, model, tok, partial, str(inputs.config.get("base_spec", ""))),
                       "source": "rebuilt"}
        sha = sha256_file(partial)
        if want is not None and sha != want.sha256:
            raise StageError(_logged_differs(fmt, sha, want, out) if written["source"] == "logged" else
                             _not_measured(fmt, sha, want, out, "float32", str(inputs.config.get("base_spec", ""))))
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return {"kind": "gguf", "out_dir": str(out), **written, "bytes": out.stat().st_size, "sha256": sha, "format": fmt,
            # True: the file evaluate measured; False: the version was measured as other formats only; None: none
            "measured": (want is not None) if inputs.measured else None, "measured_formats": sorted(inputs.measured)}


def _logged_artifacts(model_dir: Path) -> dict[str, str]:
    """The version's artifacts by name (MLmodel maps each name to the folder it was logged as)."""
    import yaml

    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    logged = mlmodel["flavors"]["python_function"].get("artifacts", {})
    return {name: str(model_dir / entry["path"]) for name, entry in logged.items()}
