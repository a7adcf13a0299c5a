"""The router's embedder as a program in the bundle: all-MiniLM-L6-v2 exported per target, tokenizer included.

A device routes a context with text in, path out: its WordPiece tokenizer (``router/tokenizer.json``, the
reference tokenizer with truncation to :data:`MAX_TOKENS` and no padding, exactly what
:class:`~hm_export.router.MiniLMEmbedder` runs) gives ``input_ids`` ``int64 [1, n]`` (``2 <= n <= 256``:
``[CLS] ... [SEP]``), the router program returns ``context_embedding`` ``float32 [1, 384]``, mean pooled over the n
positions and L2-normalised inside the program, and the greedy descent of ``router.safetensors`` gives the path.
One program per bundle target: ExecuTorch (``router/minilm.pte``, XNNPACK), ONNX (``router/minilm.onnx`` +
``.data``), Core ML (``router/minilm.mlpackage``, float32 compute).  The sequence axis is dynamic (bounded by
256), so a short context costs a short run.  Batch 1 without padding needs no attention mask: every position
is a real token.

:func:`emit_router_programs` is the export stage; :func:`open_router_program` runs an emitted program here
(ExecuTorch, ONNX Runtime) for tests and for ``scripts/router_agreement.py``.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hm_export.errors import BundleError, ExportError, HostUnsupported, UsageError, wrapped
from hm_export.router import MINILM_DIM, MiniLMEmbedder, default_minilm_dir

ROUTER_DIR = "router"
TOKENIZER_FILE = f"{ROUTER_DIR}/tokenizer.json"
MAX_TOKENS = 256  # MiniLMEmbedder's truncation: [CLS] + 254 word pieces + [SEP]
MIN_TOKENS = 2  # [CLS] [SEP] of an empty context
INPUT = "input_ids"
OUTPUT = "context_embedding"  # not "embedding": the ONNX graph names an aten.embedding value so
EXAMPLE_TOKENS = 16


class MiniLMProgram(nn.Module):
    """``input_ids [1, n]`` -> L2-normalised mean-pooled MiniLM embedding ``[1, 384]`` (the embedder's weights)."""

    def __init__(self, embedder: MiniLMEmbedder) -> None:
        super().__init__()
        self.word, self.position, self.embed_norm = embedder.word, embedder.position, embedder.embed_norm
        self.register_buffer("token_type", embedder.token_type.weight[0].detach().clone())
        self.layers = embedder.layers

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = self.position.weight[: input_ids.shape[1]]
        x = self.embed_norm(self.word(input_ids) + positions + self.token_type)
        for layer in self.layers:
            x = layer(x, None)
        pooled = x.mean(dim=1)
        return pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def export_minilm(embedder: MiniLMEmbedder) -> torch.export.ExportedProgram:
    """``torch.export`` of :class:`MiniLMProgram` with the token axis dynamic in [2, 256]."""
    tokens = torch.export.Dim("tokens", min=MIN_TOKENS, max=MAX_TOKENS)
    example = (torch.full((1, EXAMPLE_TOKENS), 1000, dtype=torch.long),)
    with torch.no_grad():
        return torch.export.export(
            MiniLMProgram(embedder).eval(), example, dynamic_shapes={"input_ids": {1: tokens}}, strict=False
        )


def _emit_executorch(program: torch.export.ExportedProgram, out_dir: Path) -> dict[str, Any]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    (out_dir / "minilm.pte").write_bytes(edge.to_executorch().buffer)
    return {"files": {"program": f"{ROUTER_DIR}/minilm.pte"}, "runtime": "executorch", "backend": "xnnpack"}


def _emit_onnx(program: torch.export.ExportedProgram, out_dir: Path) -> dict[str, Any]:
    from hm_export.targets.onnx import OPSET

    exported = torch.onnx.export(
        program, dynamo=True, input_names=[INPUT], output_names=[OUTPUT], opset_version=OPSET, verbose=False
    )
    exported.save(str(out_dir / "minilm.onnx"), external_data=True)
    files = {"program": f"{ROUTER_DIR}/minilm.onnx", "data": f"{ROUTER_DIR}/minilm.onnx.data"}
    return {"files": files, "runtime": "onnxruntime", "opset": OPSET}


def _emit_coreml(program: torch.export.ExportedProgram, out_dir: Path) -> dict[str, Any]:
    import coremltools as ct

    shape = (1, ct.RangeDim(MIN_TOKENS, MAX_TOKENS, default=EXAMPLE_TOKENS))
    model = ct.convert(
        program.run_decompositions({}),
        convert_to="mlprogram",
        inputs=[ct.TensorType(name=INPUT, shape=shape, dtype=np.int32)],
        outputs=[ct.TensorType(name=OUTPUT, dtype=np.float32)],
        minimum_deployment_target=ct.target.iOS17,
        compute_precision=ct.precision.FLOAT32,
    )
    model.save(str(out_dir / "minilm.mlpackage"))
    structure = check_coreml_router(out_dir / "minilm.mlpackage")
    if structure["problems"]:
        raise ExportError(f"{out_dir / 'minilm.mlpackage'}: structural check failed: {structure['problems']}")
    files = {"package": f"{ROUTER_DIR}/minilm.mlpackage"}
    return {"files": files, "runtime": "coreml", "precision": "float32", "input_dtype": "int32", **structure}


def check_coreml_router(package: Path) -> dict[str, Any]:
    """What can be checked of the Core ML router off macOS: I/O names, shapes, dtypes, the token range, ops."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))
    problems = []
    inputs = {f.name: f for f in spec.description.input}
    outputs = {f.name: f for f in spec.description.output}
    if list(inputs) != [INPUT] or list(outputs) != [OUTPUT]:
        problems.append(f"I/O {list(inputs)} -> {list(outputs)}, expected [{INPUT!r}] -> [{OUTPUT!r}]")
    else:
        array = inputs[INPUT].type.multiArrayType
        ranges = [(r.lowerBound, r.upperBound) for r in array.shapeRange.sizeRanges]
        if ranges != [(1, 1), (MIN_TOKENS, MAX_TOKENS)]:
            problems.append(f"{INPUT} accepts shapes {ranges}, expected [1, {MIN_TOKENS}..{MAX_TOKENS}]")
        if array.dataType != ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32:
            problems.append(f"{INPUT} is not int32")
        if outputs[OUTPUT].type.multiArrayType.dataType != ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32:
            problems.append(f"{OUTPUT} is not float32")
    ops: dict[str, int] = {}
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                ops[op.type] = ops.get(op.type, 0) + 1
    return {"ops": dict(sorted(ops.items())), "problems": problems}


# Bundle target -> the router program it carries (a target without one routes with another's or on the host).
EMITTERS: dict[str, Callable[[torch.export.ExportedProgram, Path], dict[str, Any]]] = {
    "executorch": _emit_executorch,
    "onnx": _emit_onnx,
    "coreml": _emit_coreml,
}


def write_router_tokenizer(model_dir: Path, out: Path) -> None:
    """MiniLM's ``tokenizer.json`` as the embedder runs it: truncation to 256 tokens, no padding."""
    body = json.loads((model_dir / "tokenizer.json").read_text())
    body["truncation"] = {"direction": "Right", "max_length": MAX_TOKENS, "strategy": "LongestFirst", "stride": 0}
    body["padding"] = None
    out.write_text(json.dumps(body, ensure_ascii=False))


def emit_router_programs(root: Path, targets: Sequence[str], embedder: MiniLMEmbedder | None = None) -> dict[str, Any]:
    """Write ``router/`` under the bundle ``root`` for ``targets``; returns what the manifest's ``router`` gains:
    the tokenizer it expects, the program I/O and one entry per target (files, runtime, export seconds)."""
    embedder = embedder or MiniLMEmbedder()
    wanted = [t for t in targets if t in EMITTERS]
    out_dir = root / ROUTER_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    write_router_tokenizer(default_minilm_dir(), root / TOKENIZER_FILE)
    programs: dict[str, Any] = {}
    exported = export_minilm(embedder) if wanted else None
    for target in wanted:
        start = time.perf_counter()
        programs[target] = EMITTERS[target](exported, out_dir)
        programs[target]["seconds"] = round(time.perf_counter() - start, 2)
    return {
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "model": "wordpiece",
            "lowercase": True,
            "strip_accents": True,
            "max_tokens": MAX_TOKENS,
            "special": {"cls": "[CLS]", "sep": "[SEP]"},
        },
        "program_io": {
            "inputs": [{"name": INPUT, "dtype": "int64", "shape": [1, "tokens"], "tokens": [MIN_TOKENS, MAX_TOKENS]}],
            "outputs": [{"name": OUTPUT, "dtype": "float32", "shape": [1, MINILM_DIM]}],
            "pooling": "mean over all positions (batch 1, no padding)",
            "normalize": "l2, inside the program",
        },
        "programs": programs,
    }


def router_files(router: dict[str, Any]) -> list[str]:
    """Bundle-relative files (and package directories) of a manifest ``router`` entry's tokenizer and programs."""
    files = [router["tokenizer"]["file"]] if "tokenizer" in router else []
    return files + [f for entry in router.get("programs", {}).values() for f in entry["files"].values()]


@dataclass
class RouterProgram:
    """Runs one exported router program here: texts -> embeddings ``[N, 384]`` (its tokenizer, one text a call).

    ``source`` names the program in errors: a runtime failure or an output that is not ``dim`` finite floats per
    text is a BundleError naming it."""

    run: Callable[[np.ndarray], np.ndarray]
    tokenizer: Any
    source: str

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for text in texts:
            with wrapped(self.source, "the router tokenizer cannot encode the text", UsageError):
                ids = np.array([self.tokenizer.encode(text).ids], dtype=np.int64)
            with wrapped(self.source, "the router program failed to run"):
                row = np.asarray(self.run(ids), dtype=np.float32)
            if row.shape != (1, MINILM_DIM) or not np.isfinite(row).all():
                raise BundleError(
                    f"{self.source}: the router program returned {list(row.shape)} values, expected "
                    f"[1, {MINILM_DIM}] finite floats"
                )
            rows.append(row)
        return np.concatenate(rows) if rows else np.zeros((0, MINILM_DIM), np.float32)

    dim = MINILM_DIM


def onnx_router(program: Path, tokenizer: Path) -> RouterProgram:
    """An ONNX router program file the user names (e.g. a quantized variant of the bundle's) with a tokenizer
    file; a file either library refuses is an InputError naming it."""
    from tokenizers import Tokenizer

    from hm_export.errors import InputError
    from hm_export.targets import TARGETS

    TARGETS["onnx"].check_installed()
    import onnxruntime as ort

    with wrapped(tokenizer, "not a tokenizers tokenizer", InputError):
        words = Tokenizer.from_file(str(tokenizer))
    with wrapped(program, "ONNX Runtime cannot load the router program", InputError):
        session = ort.InferenceSession(str(program), providers=["CPUExecutionProvider"])
    return RouterProgram(lambda ids: session.run([OUTPUT], {INPUT: ids})[0], words, str(program))


def open_router_program(
    bundle: Path, target: str, verify: bool = True, verify_key: bytes | None = None
) -> RouterProgram:
    """The bundle's ``target`` router program with its tokenizer (ExecuTorch and ONNX run on this host).

    Read as the loader reads a bundle: the manifest through its seal (and a signature with ``verify_key``),
    the program's files and the tokenizer listed, inside the bundle and through no symlink, their sizes (and,
    with ``verify``, sha256s) as listed, the tokenizer at its listed size.  Every failure is an HmExportError
    naming the file (HostUnsupported where the program cannot run here, MissingExtraError for a missing extra)."""
    from hm_export.bundle import read_manifest, verify_files
    from hm_export.runtime_stubs.loader import program_file, program_files, read_tokenizer
    from hm_export.targets import TARGETS

    bundle = Path(bundle)
    manifest = read_manifest(bundle, verify_key)
    router = manifest.router
    entry = router.programs.get(target)
    if entry is None or router.tokenizer is None:
        raise BundleError(
            f"{bundle / 'manifest.json'}: no {target} router program (exported without it?)", field="router.programs"
        )
    runtime = entry.runtime
    if runtime == "coreml" and platform.system() != "Darwin":
        raise HostUnsupported(f"the {target} router program does not run on this host (check its structure instead)")
    if target in TARGETS:
        TARGETS[target].check_installed()
    what = f"{target} router program"
    files = program_files(
        bundle, manifest, entry.files, what, TARGETS[target].side_files if target in TARGETS else None
    )
    roots = [router.tokenizer.file, *entry.files.values()]
    verify_files(
        bundle, manifest, verify, {f for f in manifest.files if any(f == r or f.startswith(f"{r}/") for r in roots)}
    )
    tokenizer = read_tokenizer(bundle, manifest, router.tokenizer.file, "router.tokenizer.file")
    program = program_file(files)
    with wrapped(program, f"cannot load the {what}"):
        if runtime == "executorch":
            from executorch.runtime import Runtime

            method = Runtime.get().load_program(str(program)).load_method("forward")
            return RouterProgram(
                lambda ids: method.execute([torch.from_numpy(ids)])[0].numpy(), tokenizer, str(program)
            )
        if runtime == "onnxruntime":
            import onnxruntime as ort

            session = ort.InferenceSession(str(program), providers=["CPUExecutionProvider"])
            return RouterProgram(lambda ids: session.run([OUTPUT], {INPUT: ids})[0], tokenizer, str(program))
        import coremltools as ct

        model = ct.models.MLModel(str(program), compute_units=ct.ComputeUnit.CPU_ONLY)
        return RouterProgram(lambda ids: model.predict({INPUT: ids.astype(np.int32)})[OUTPUT], tokenizer, str(program))


def measure_agreement(
    bundle: Path, target: str | RouterProgram, contexts: Sequence[str], reference: np.ndarray | None = None
) -> dict[str, Any]:
    """``target``'s router program (or another ``RouterProgram``, e.g. a quantized variant) against the Python
    MiniLM on ``contexts`` (``reference``: their MiniLM embeddings, computed when not given): cosine of the
    embeddings, routes through the bundle's tree, and each context that routes elsewhere with its margin
    (squared-distance gap between the nearest and next-nearest child)."""
    from hm_export.runtime_stubs.loader import read_tree

    tree = read_tree(Path(bundle))
    program = open_router_program(bundle, target) if isinstance(target, str) else target
    start = time.perf_counter()
    got = program.embed(contexts)
    seconds = time.perf_counter() - start
    want = MiniLMEmbedder().embed(contexts) if reference is None else reference
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    routes_got, routes_want = tree.route(got), tree.route(want)
    differ = np.flatnonzero((routes_got != routes_want).any(1))
    return {
        "target": target if isinstance(target, str) else "custom",
        "contexts": len(contexts),
        "cosine": {"min": float(cosine.min()), "mean": float(cosine.mean()), "p01": float(np.percentile(cosine, 1))},
        "routes_identical": float(1 - len(differ) / max(len(contexts), 1)),
        "differences": [
            {
                "context": int(i),
                "python_path": routes_want[i].tolist(),
                "program_path": routes_got[i].tolist(),
                "python_margin": tree.route_margin(want[i]),
                "cosine": float(cosine[i]),
            }
            for i in differ
        ],
        "min_route_margin": float(min(tree.route_margin(vector) for vector in want)),
        "program_seconds_per_context": round(seconds / max(len(contexts), 1), 4),
    }
