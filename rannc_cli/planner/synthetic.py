"""Analytic profiles: valid `Profile` objects for model families from FLOP and byte formulas.

    prof = bert_profile(layers=24, hidden=1024, batch_size=256)            # BERT-class, tied embedding
    prof = resnet_profile(width=8, depths=(3, 8, 36, 3), batch_size=256)  # wide ResNet-152-class
    prof = hybrid_profile(cnn_width=4, layers=24, hidden=2048)             # CNN stem + Transformer
    prof = random_profile(random.Random(0), blocks=6)                      # small, irregular: tests

Used by tests, property tests and benchmarks where capturing the real model is impossible here
(a 96-layer hidden-2048 BERT has about 5B parameters). Every profile passes `Profile.validate`.

Formulas (per sample; `m` = microbatch size; mixed precision: fp32 parameters, fp16 activations):
- time of one block: ``ops * launch + max(flops * m / (peak * efficiency), (param_bytes + traffic * m) / bandwidth)``
  (a roofline with a per-kernel launch cost, so small microbatches use the device less well);
  backward: twice the FLOPs and traffic, twice the launches; ``recompute_backward = forward + backward``.
- Transformer layer (hidden h, sequence s, heads a = h/64): params ``12h^2 + 13h``; forward FLOPs
  ``24 s h^2 + 4 s^2 h``; saved activations ``34 s h + 5 a s^2`` bytes (Korthikanti et al. 2022);
  output ``2 s h`` bytes; working peak ``8 s h + 2 a s^2`` bytes.
- Embedding: params ``(V + s) h + 2h``; head: dense ``h^2 + h``, LayerNorm, decoder tied to the word
  embedding plus a bias of V; FLOPs ``2 s h V + 2 s h^2``; saved logits ``4 s V`` bytes (fp16 + fp32 loss).
- Bottleneck conv block (in c, mid k, out 4k, output H x W): params ``c k + 9 k^2 + 4 k^2 (+ 4 c k
  projection on a stage's first block)``; FLOPs ``2 H W (params/4)``; saved activations
  ``2 H W (c + 6k + 8k)`` bytes; output ``2 H W 4k`` bytes.
"""

from __future__ import annotations

import math
import random as _random
from dataclasses import dataclass, field

from rannc_cli.profiler.format import BlockClass, BlockCost, BlockInfo, ParamInfo, Profile, ValueInfo

DEVICES: dict[str, dict[str, float]] = {
    # name: peak FLOP/s (tensor cores, fp16), efficiency reached by large GEMMs, memory bytes/s, memory, launch s
    "V100-16GB": {"peak_flops": 125e12, "efficiency": 0.45, "memory_bandwidth": 900e9, "memory_bytes": 16 << 30, "launch": 8e-6},
    "A100-40GB": {"peak_flops": 312e12, "efficiency": 0.45, "memory_bandwidth": 1555e9, "memory_bytes": 40 << 30, "launch": 6e-6},
    "H100-80GB": {"peak_flops": 989e12, "efficiency": 0.40, "memory_bandwidth": 3350e9, "memory_bytes": 80 << 30, "launch": 5e-6},
}


@dataclass
class LayerSpec:
    """One block, per sample: FLOPs, bytes moved, saved activations, working peak, output size."""

    name: str
    module_type: str
    signature: str  # blocks with equal signatures share a class (and costs)
    params: list[tuple[str, int, bool]]  # (name, bytes, trainable)
    flops: float
    traffic: float
    activation: float
    peak: float
    output: float
    ops: int = 20
    extra_inputs: list[str] = field(default_factory=list)  # user inputs it reads besides the previous output


def _cost(layer: LayerSpec, m: int, dev: dict[str, float], param_bytes: int) -> BlockCost:
    compute = layer.flops * m / (dev["peak_flops"] * dev["efficiency"])
    memory = (param_bytes + layer.traffic * m) / dev["memory_bandwidth"]
    fwd = layer.ops * dev["launch"] + max(compute, memory)
    bwd = 2 * layer.ops * dev["launch"] + max(2 * compute, 2 * memory)
    return BlockCost(microbatch=m, forward_seconds=fwd, backward_seconds=bwd, recompute_backward_seconds=fwd + bwd,
                     activation_bytes=int(layer.activation * m), peak_bytes=int(layer.peak * m),
                     flops_forward=layer.flops * m, flops_backward=2 * layer.flops * m)


def build_profile(name: str, layers: list[LayerSpec], inputs: dict[str, int], batch_size: int,
                  device: str = "V100-16GB", microbatch_sizes: list[int] | None = None) -> Profile:
    """Assemble a chain of blocks (each reads the previous block's output) into a Profile.

    ``inputs`` maps user-input names to bytes per sample; layers name the ones they read in
    ``extra_inputs``. The last layer's output is the scalar loss.
    """
    dev = DEVICES[device]
    if microbatch_sizes is None:
        microbatch_sizes = sorted({1 << i for i in range(0, max(1, int(math.log2(max(1, batch_size)))) + 1)} | {batch_size})
    values: dict[str, ValueInfo] = {}
    for inp, per_sample in inputs.items():
        values[inp] = ValueInfo(id=inp, producer=None, shape=[batch_size], dtype="int64", batch_dim=0,
                                bytes_per_sample=per_sample, fixed_bytes=0, consumers=[], is_tensor=True)
    parameters: dict[str, ParamInfo] = {}
    classes: dict[str, BlockClass] = {}
    blocks: list[BlockInfo] = []
    for i, layer in enumerate(layers):
        if layer.signature not in classes:
            pbytes = sum(b for _, b, _ in layer.params)
            classes[layer.signature] = BlockClass(id=len(classes), signature=layer.signature, blocks=[],
                                                  costs=[_cost(layer, m, dev, pbytes) for m in microbatch_sizes])
        cls = classes[layer.signature]
        cls.blocks.append(i)
        ins = ([f"v{i - 1}"] if i > 0 else []) + list(layer.extra_inputs)
        for v in ins:
            values[v].consumers.append(i)
        out = f"v{i}" if i < len(layers) - 1 else "loss"
        last = i == len(layers) - 1
        values[out] = ValueInfo(id=out, producer=i, shape=[] if last else [batch_size, int(layer.output) // 2],
                                dtype="float32" if last else "float16", batch_dim=None if last else 0,
                                bytes_per_sample=0 if last else int(layer.output), fixed_bytes=4 if last else 0,
                                consumers=[])
        for pname, pbytes, trainable in layer.params:
            if pname in parameters:
                parameters[pname].blocks.append(i)
            else:
                parameters[pname] = ParamInfo(name=pname, shape=[pbytes // 4], dtype="float32", bytes=pbytes,
                                              kind="parameter", trainable=trainable, blocks=[i])
        blocks.append(BlockInfo(id=i, name=layer.name, module_type=layer.module_type, cls=cls.id, ops=layer.ops,
                                params=[p for p, _, _ in layer.params], inputs=ins, outputs=[] if last else [out]))
    prof = Profile(
        model={"name": name, "script": "<synthetic>", "graph_hash": name, "batch_size": batch_size, "dynamic_batch": True,
               "training": True, "inputs": [], "ops": sum(lay.ops for lay in layers), "torch_version": "n/a"},
        device={"type": "cuda", "name": device, "mode": "estimated", "memory_bytes": int(dev["memory_bytes"]),
                "spec": {"name": device, **dev}},
        microbatch_sizes=list(microbatch_sizes), blocks=blocks, classes=list(classes.values()), values=values,
        parameters=parameters, loss_value="loss", key=f"synthetic-{name}", created="")
    prof.validate(f"<synthetic {name}>")
    return prof


# ---------------------------------------------------------------------------------------- families
def _transformer_layer(i: int, h: int, s: int, prefix: str = "encoder.layer") -> LayerSpec:
    a = max(1, h // 64)
    return LayerSpec(name=f"{prefix}.{i}", module_type="TransformerLayer", signature=f"tf-{h}-{s}",
                     params=[(f"{prefix}.{i}.weight", 4 * (12 * h * h + 13 * h), True)],
                     flops=24 * s * h * h + 4 * s * s * h, traffic=2 * (20 * s * h + 2 * a * s * s),
                     activation=34 * s * h + 5 * a * s * s, peak=8 * s * h + 2 * a * s * s, output=2 * s * h,
                     ops=28, extra_inputs=["attention_mask"])


def bert_profile(layers: int = 24, hidden: int = 1024, seq: int = 512, vocab: int = 32000, batch_size: int = 256,
                 device: str = "V100-16GB") -> Profile:
    """BERT-class: embedding, ``layers`` identical Transformer layers, head tied to the word embedding."""
    h, s, v = hidden, seq, vocab
    emb = LayerSpec(name="embeddings", module_type="BertEmbeddings", signature=f"emb-{h}-{s}-{v}",
                    params=[("embeddings.word_embeddings.weight", 4 * v * h, True),
                            ("embeddings.position_embeddings.weight", 4 * s * h, True),
                            ("embeddings.LayerNorm.weight", 8 * h, True)],
                    flops=10 * s * h, traffic=2 * 6 * s * h, activation=6 * s * h, peak=4 * s * h, output=2 * s * h,
                    ops=8, extra_inputs=["input_ids"])
    body = [_transformer_layer(i, h, s) for i in range(layers)]
    head = LayerSpec(name="cls", module_type="BertLMHead", signature=f"head-{h}-{s}-{v}",
                     params=[("cls.transform.weight", 4 * (h * h + 3 * h), True),
                             ("embeddings.word_embeddings.weight", 4 * v * h, True), ("cls.bias", 4 * v, True)],
                     flops=2 * s * h * v + 2 * s * h * h, traffic=2 * (3 * s * v + 4 * s * h),
                     activation=4 * s * v + 6 * s * h, peak=8 * s * v, output=0, ops=12, extra_inputs=["labels"])
    return build_profile(f"BERT-L{layers}-H{hidden}", [emb, *body, head],
                         {"input_ids": 8 * s, "attention_mask": 8 * s, "labels": 8 * s}, batch_size, device)


def _resnet_blocks(width: int, depths: tuple[int, ...], image: int = 224, first_in: int = 64,
                   prefix: str = "layer") -> tuple[list[LayerSpec], int, int]:
    out_blocks: list[LayerSpec] = []
    c = first_in
    hw = image // 4
    for k, depth in enumerate(depths):
        mid = 64 * (2 ** k) * width
        out = 4 * mid
        if k > 0:
            hw = max(1, hw // 2)
        for j in range(depth):
            proj = 4 * c * mid if j == 0 else 0
            params = c * mid + 9 * mid * mid + mid * out + proj + 4 * (2 * mid + out)
            area = hw * hw
            out_blocks.append(LayerSpec(
                name=f"{prefix}{k + 1}.{j}", module_type="Bottleneck", signature=f"bn-{c}-{mid}-{hw}-{int(proj > 0)}",
                params=[(f"{prefix}{k + 1}.{j}.weight", 4 * params, True)], flops=2 * area * params,
                traffic=2 * area * (2 * c + 8 * mid + 3 * out), activation=2 * area * (c + 6 * mid + 2 * out),
                peak=2 * area * (2 * out + mid), output=2 * area * out, ops=12))
            c = out
    return out_blocks, c, hw


def _stem(image: int, stem_c: int) -> LayerSpec:
    """7x7 stride-2 convolution + pooling on ``image`` x ``image`` RGB inputs (shared by ResNet and the hybrid)."""
    return LayerSpec(name="stem", module_type="Stem", signature=f"stem-{image}",
                     params=[("conv1.weight", 4 * 3 * 49 * stem_c, True)],
                     flops=2 * (image // 2) ** 2 * 3 * 49 * stem_c, traffic=2 * (image // 2) ** 2 * stem_c * 4,
                     activation=2 * (image // 2) ** 2 * stem_c * 3, peak=2 * (image // 2) ** 2 * stem_c * 2,
                     output=2 * (image // 4) ** 2 * stem_c, ops=6, extra_inputs=["images"])


def resnet_profile(width: int = 8, depths: tuple[int, ...] = (3, 8, 36, 3), image: int = 224, classes: int = 1000,
                   batch_size: int = 256, device: str = "V100-16GB") -> Profile:
    """Wide ResNet (bottleneck) class: big activations and small parameters early, the reverse late."""
    stem_c = 64
    stem = _stem(image, stem_c)
    blocks, c, _ = _resnet_blocks(width, depths, image, stem_c)
    head = LayerSpec(name="fc", module_type="Head", signature=f"fc-{c}-{classes}",
                     params=[("fc.weight", 4 * (c * classes + classes), True)], flops=2 * c * classes, traffic=2 * c * 4,
                     activation=2 * c + 4 * classes, peak=8 * classes, output=0, ops=5, extra_inputs=["labels"])
    return build_profile(f"ResNet-w{width}-{'-'.join(map(str, depths))}", [stem, *blocks, head],
                         {"images": 2 * 3 * image * image, "labels": 8}, batch_size, device)


def hybrid_profile(cnn_width: int = 4, cnn_depths: tuple[int, ...] = (3, 4, 6), layers: int = 24, hidden: int = 2048,
                   image: int = 224, classes: int = 1000, batch_size: int = 256, device: str = "V100-16GB") -> Profile:
    """CNN stem (wide bottleneck stages at high resolution) feeding a Transformer over the feature map's patches."""
    stem_c = 64
    stem = _stem(image, stem_c)
    convs, c, hw = _resnet_blocks(cnn_width, cnn_depths, image, stem_c, prefix="cnn")
    s, h = hw * hw, hidden
    proj = LayerSpec(name="patch_proj", module_type="Linear", signature=f"proj-{c}-{h}-{s}",
                     params=[("patch_proj.weight", 4 * (c * h + h + s * h), True)], flops=2 * s * c * h,
                     traffic=2 * s * (c + h), activation=2 * s * c, peak=2 * s * h, output=2 * s * h, ops=4)
    body = [_transformer_layer(i, h, s, prefix="transformer.layer") for i in range(layers)]
    head = LayerSpec(name="head", module_type="Head", signature=f"head-{h}-{classes}",
                     params=[("head.weight", 4 * (h * classes + classes), True)], flops=2 * s * h + 2 * h * classes,
                     traffic=2 * s * h, activation=2 * s * h, peak=4 * classes, output=0, ops=5, extra_inputs=["labels"])
    for layer in body:
        layer.extra_inputs = []
    return build_profile(f"Hybrid-w{cnn_width}-L{layers}-H{hidden}", [stem, *convs, proj, *body, head],
                         {"images": 2 * 3 * image * image, "labels": 8}, batch_size, device)


def random_profile(rng: _random.Random, blocks: int = 6, batch_size: int = 8, tied: bool = True,
                   skips: bool = True, batchless: float = 0.0) -> Profile:
    """A small irregular profile for property tests: random costs, sizes, a tied parameter, skip values.

    Blocks read the previous output and, sometimes, an earlier block's output (a value skipping stages).
    With ``batchless`` > 0 each block's output has no batch dimension with that probability (a
    partial loss or batch statistic: read by a later block, it may only cross between stages of
    equal replica counts, see redistribution.py).
    """
    dev = {"peak_flops": 1e12, "efficiency": 1.0, "memory_bandwidth": 1e11, "memory_bytes": 1 << 30, "launch": 0.0}
    sizes = [1, 2, 4, 8] if batch_size >= 8 else [1, batch_size]
    sizes = sorted(set(sizes + [batch_size]))
    values: dict[str, ValueInfo] = {"x": ValueInfo("x", None, [batch_size], "float32", 0, 64, 0, [])}
    parameters: dict[str, ParamInfo] = {}
    classes: list[BlockClass] = []
    infos: list[BlockInfo] = []
    for i in range(blocks):
        fwd = rng.choice([0.0, rng.uniform(1e-4, 1e-2), rng.uniform(1e-3, 5e-2)])
        bwd = fwd * rng.uniform(1.0, 3.0)
        fixed = rng.uniform(0, 1e-3)
        act = rng.choice([0, rng.randrange(1 << 10, 1 << 24)])
        peak = rng.randrange(0, 1 << 22)
        costs = [BlockCost(microbatch=m, forward_seconds=fixed + fwd * m, backward_seconds=2 * fixed + bwd * m,
                           recompute_backward_seconds=3 * fixed + (fwd + bwd) * m, activation_bytes=act * m,
                           peak_bytes=peak * m) for m in sizes]
        classes.append(BlockClass(id=i, signature=f"r{i}", blocks=[i], costs=costs))
        ins = ["x"] if i == 0 else [f"v{i - 1}"]
        if skips and i >= 2 and rng.random() < 0.3:
            ins.append(f"v{rng.randrange(0, i - 1)}")
        for v in ins:
            values[v].consumers.append(i)
        out = f"v{i}" if i < blocks - 1 else "loss"
        last = i == blocks - 1
        values[out] = ValueInfo(out, i, [batch_size], "float32", None if last else 0,
                                0 if last else rng.randrange(1, 1 << 20), 4 if last else rng.choice([0, 128]), [])
        if batchless > 0 and not last and rng.random() < batchless:
            values[out].batch_dim, values[out].bytes_per_sample, values[out].fixed_bytes = None, 0, 4
        pname = f"p{i}"
        parameters[pname] = ParamInfo(pname, [1], "float32", rng.choice([0, rng.randrange(1 << 10, 1 << 26)]),
                                      "parameter", True, [i])
        params = [pname]
        if tied and i in (0, blocks - 1):
            if "tied" not in parameters:
                parameters["tied"] = ParamInfo("tied", [1], "float32", rng.randrange(1 << 10, 1 << 24), "parameter", True, [])
            parameters["tied"].blocks.append(i)
            params.append("tied")
        infos.append(BlockInfo(id=i, name=f"b{i}", module_type="Block", cls=i, ops=1, params=params, inputs=ins,
                               outputs=[] if last else [out]))
    prof = Profile(model={"name": "random", "script": "<synthetic>", "graph_hash": "random", "batch_size": batch_size,
                          "dynamic_batch": True, "training": True, "inputs": [], "ops": blocks, "torch_version": "n/a"},
                   device={"type": "cuda", "name": "synthetic", "mode": "estimated", "memory_bytes": 1 << 30, "spec": dev},
                   microbatch_sizes=sizes, blocks=infos, classes=classes, values=values, parameters=parameters,
                   loss_value="loss", key="synthetic-random")
    prof.validate("<random profile>")
    return prof
