"""Print the tables of docs/scaling.md: parameters, tokens, activations and memory per GPU for RRHF training of
Llama-3-8B, Llama-3-70B and Llama-3.1-405B shapes with rrhf_fast.train.

    python docs/scaling_numbers.py            # the tables of docs/scaling.md, in its order

Pure arithmetic (no torch, no GPU, no download); every formula is the one docs/scaling.md writes out.
Units: GiB = 2**30 bytes, as torch.cuda.memory_allocated() reports; parameter counts exact; activations are
estimates (docs/scaling.md, "Activations").
"""

GIB = 2**30

# name: hidden D, layers L, attention heads H, key-value heads KV, FFN width F, vocabulary V
MODELS = {
    "Llama-3-8B": dict(D=4096, L=32, H=32, KV=8, F=14336, V=128256),
    "Llama-3-70B": dict(D=8192, L=80, H=64, KV=8, F=28672, V=128256),
    "Llama-3.1-405B": dict(D=16384, L=126, H=128, KV=8, F=53248, V=128256),
}
REFERENCE_MODELS = {"LLaMA-7B (the paper's)": dict(D=4096, L=32, H=32, KV=32, F=11008, V=32000)}

# name: prompt tokens P, response tokens R, candidates k, queries (groups) per GPU micro-batch G
WORKLOADS = {"A": dict(P=512, R=128, k=4, G=1), "B": dict(P=1024, R=256, k=8, G=2)}

LORA_R = 16  # adapters on q, k, v, o, gate, up, down of every layer; embeddings and LM head frozen
CUDA_CHUNK_ELEMENTS = 2**28  # logits per chunk of the fused head on CUDA: as in rrhf_fast/chunked.py
# An 80 GB H100 shows 79.1 GiB to torch; a case fits when its estimate is at most 70 GiB, leaving 9.1 GiB for
# what is not counted (CUDA context, NCCL buffers, allocator fragmentation)
BUDGET_GIB = 70.0
MAX_GPUS = 512  # the largest GPU count searched
FULL_FT_GPUS = {"Llama-3-8B": (2, 4, 8), "Llama-3-70B": (8, 16, 32), "Llama-3.1-405B": (128, 256, 512)}


def params(m):
    """Exact parameter counts of a Llama decoder (untied embeddings, no biases)."""
    D, L, H, KV, F, V = (m[x] for x in "D L H KV F V".split())
    dkv = KV * (D // H)  # width of k and v: key-value heads x head size
    attn = 2 * D * D + 2 * D * dkv  # q, o: D x D; k, v: D x dkv
    mlp = 3 * D * F  # gate, up: D -> F; down: F -> D
    layer = attn + mlp + 2 * D  # + two RMSNorm weights
    embed = head = V * D
    total = L * layer + embed + head + D  # + final norm
    lora = LORA_R * ((D + D) + 2 * (D + dkv) + (D + D) + 3 * (D + F))  # r (in + out) per adapted linear
    return dict(attn=attn, mlp=mlp, layer=layer, body=L * layer, embed=embed, head=head, total=total,
                root=embed + head + D, lora=L * lora, dkv=dkv)


def tokens(w):
    P, R, k, G = w["P"], w["R"], w["k"], w["G"]
    return dict(shared=G * (P + k * R), reencoded=G * k * (P + R), N=G * k * R, row=P + k * R, rows=G)


def act_per_token(m, p, regime):
    """Bytes one decoder layer saves for the backward per token, without checkpointing (docs/scaling.md).

    bf16:     the layer computes with bf16 weights (FSDP2 param_dtype=bf16, or a model held in bf16):
                two RMSNorms, each its fp32 input (4D) and bf16 normalised input (2D)      12D
                inputs of q/k/v, o_proj, gate/up (bf16)                                     6D
                attention: q (2D), k and v (2 Dkv each), its output (2D)                    4D + 4Dkv
                MLP: gate output, SiLU output, up output, down input (bf16)                 8F
              = 22D + 4Dkv + 8F
    autocast: fp32 weights under torch.autocast(bf16): the residual stream and both norms stay fp32 (8D each),
              q, k, v, gate and up each cast their fp32 input to bf16 (5 x 2D), o_proj's input 2D
              = 32D + 4Dkv + 8F, plus every linear's bf16 weight copy (2 bytes x layer parameters, a layer)
    """
    D, F, dkv = m["D"], m["F"], p["dkv"]
    return (22 * D if regime == "bf16" else 32 * D) + 4 * dkv + 8 * F


def mask_per_layer(w, t):
    """The packed mode's attention mask as each layer keeps it, a bf16 bias: rows x T x T x 2 bytes."""
    return t["rows"] * t["row"] ** 2 * 2


def activations(m, p, w, regime, ckpt, body_tokens=None):
    """Bytes of saved activations at the start of the backward (all layers), with or without checkpointing."""
    t = tokens(w)
    T = body_tokens or t["shared"]
    a = act_per_token(m, p, regime)
    mask = mask_per_layer(w, t) if body_tokens is None else 0
    resid = 2 * m["D"] if regime == "bf16" else 4 * m["D"]  # the layer input a checkpoint keeps
    if ckpt:  # every layer keeps its input; one layer is recomputed at a time (its activations + mask)
        return m["L"] * resid * T + a * T + mask
    weights = 2 * p["layer"] * m["L"] if regime == "autocast" else 0
    return m["L"] * (a * T + mask) + weights


def head(m, w, kind, trainable_head=True, T=None):
    """Peak bytes the loss head adds (the LM head's weight gradient included when it is trained)."""
    t = tokens(w)
    V, D = m["V"], m["D"]
    if kind == "naive":
        T = T or t["N"]
        # three fp32 [T, V] tensors in the log-softmax backward (its output, the gradient arriving, the gradient
        # leaving: kernels/README.md); later the bf16 gradient of the logits beside the weight gradient
        return max(12 * T * V, 2 * T * V + 2 * V * D) if trainable_head else 12 * T * V
    # a chunk holds as many whole groups as fit CUDA_CHUNK_ELEMENTS // V rows; a larger group is a chunk of its own
    group = w["k"] * w["R"]
    rows = min(t["N"], max(1, (CUDA_CHUNK_ELEMENTS // V) // group) * group)
    chunk = 2 * rows * V  # one bf16 [rows, V] buffer, overwritten in place by dz
    if not trainable_head:
        return chunk
    return max(chunk + 4 * V * D, 6 * V * D)  # fp32 dW accumulator; then its bf16 copy beside it


def gib(x):
    return x / GIB


def fmt(x, digits=1):
    return f"{gib(x):.{digits}f}"


def full_ft(m, p, w, W, ckpt=True):
    """Per-GPU bytes for full fine-tuning with FSDP2 over W GPUs (bf16 gathered params, fp32 sharded state)."""
    sharded = p["total"] / W
    root = 2 * p["root"]  # the root unit (embeddings, final norm, LM head) stays gathered, bf16
    layers = 10 * p["layer"]  # 2 gathered layers in bf16 + a layer's bf16 gradient + its fp32 reduce-scatter copy
    act = activations(m, p, w, "bf16", ckpt)
    hd = head(m, w, "fused")
    rows = dict(weights=4 * sharded, grads=4 * sharded, adam=8 * sharded, gathered=root + layers, act=act, head=hd)
    rows["backward"] = sum(rows.values())  # at the start of the backward, everything above is held at once
    # the optimizer step: the shards, plus AdamW's (foreach) fp32 temporary the size of v; nothing else is held
    rows["step"] = 20 * sharded
    rows["total"] = max(rows["backward"], rows["step"])
    return rows


def lora(m, p, w, W, base_bytes, ckpt=True, fsdp=True):
    """Per-GPU bytes for LoRA: base frozen in base_bytes (4 fp32, 2 bf16) a parameter, adapters fp32 + AdamW."""
    # fp32 weight, grad, m, v (16 bytes); DDP adds its fp32 gradient buckets (4 bytes)
    adapters = 16 * p["lora"] / W if fsdp else 20 * p["lora"]
    if fsdp:
        base = base_bytes * p["total"] / W
        gathered = 2 * p["root"] + 2 * 2 * p["layer"]  # root + 2 layers, bf16; frozen: no gradients to reduce
        regime = "bf16"
    else:
        base = base_bytes * p["total"]
        gathered = 0
        regime = "bf16" if base_bytes == 2 else "autocast"
    act = activations(m, p, w, regime, ckpt)
    if regime == "autocast" and ckpt:
        act += 2 * p["layer"]  # the recomputed layer's bf16 weight copies
    hd = head(m, w, "fused", trainable_head=False)
    rows = dict(base=base, adapters=adapters, gathered=gathered, act=act, head=hd)
    rows["total"] = sum(rows.values())
    return rows


def fits(r):
    return "yes" if r["total"] <= BUDGET_GIB * GIB else "no"


def fewest(per_gpu, start=1):
    """The fewest GPUs (a power of two from `start` up to MAX_GPUS) whose total fits the budget, or None."""
    W = start
    while W <= MAX_GPUS:
        if per_gpu(W)["total"] <= BUDGET_GIB * GIB:
            return W
        W *= 2
    return None


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def main():
    print("## Parameters\n")
    rows = []
    for name, m in {**MODELS, **REFERENCE_MODELS}.items():
        p = params(m)
        rows.append([name, m["D"], m["L"], f"{m['H']} / {m['KV']}", m["F"], m["V"], f"{p['layer']:,}",
                     f"{p['embed'] + p['head']:,}", f"{p['total']:,}", f"{p['total'] / 1e9:.2f} B",
                     f"{p['lora']:,}"])
    print(table(["model", "D", "L", "heads / kv", "F", "V", "per layer", "embed + head", "total", "total",
                 f"LoRA r={LORA_R}"], rows))

    print("\n## Fixed pieces (GiB)\n")
    rows = []
    for name, m in MODELS.items():
        p = params(m)
        V, D = m["V"], m["D"]
        rows.append([name, fmt(16 * p["total"]), fmt(4 * p["total"]), fmt(2 * p["total"]), fmt(2 * p["root"], 2),
                     fmt(2 * p["layer"], 2), fmt(10 * p["layer"], 2), fmt(4 * p["layer"], 2), fmt(4 * V * D, 2),
                     fmt(2 * p["body"])])
    print(table(["model", "16 bytes x params", "4 bytes x params", "2 bytes x params", "root unit, bf16",
                 "one layer, bf16", "10 bytes x layer (full FT)", "4 bytes x layer (LoRA)", "fp32 LM head dW, 4VD",
                 "2 bytes x decoder layers"], rows))

    print("\n## Tokens\n")
    rows = []
    for name, w in WORKLOADS.items():
        t = tokens(w)
        rows.append([name, w["P"], w["R"], w["k"], w["G"], t["reencoded"], t["shared"],
                     f"{t['reencoded'] / t['shared']:.2f}", t["N"], f"{t['rows']} x {t['row']}"])
    print(table(["workload", "P", "R", "k", "queries / GPU", "body tokens, re-encoded k(P+R)G",
                 "body tokens, shared (P+kR)G", "ratio", "response tokens N = kRG", "packed rows x T"], rows))

    print("\n## Activations per layer\n")
    rows = []
    for name, m in MODELS.items():
        p = params(m)
        for regime in ("bf16", "autocast"):
            a = act_per_token(m, p, regime)
            extra = f"{fmt(2 * p['layer'], 2)}" if regime == "autocast" else "0"
            rows.append([name, regime, f"{a:,}", f"{a / 1024:.0f}", extra,
                         *(fmt(a * tokens(w)["shared"] + mask_per_layer(w, tokens(w)), 2) for w in WORKLOADS.values())])
    print(table(["model", "regime", "bytes / token / layer", "KiB", "weight copies / layer, GiB",
                 *(f"workload {n}, GiB / layer" for n in WORKLOADS)], rows))

    print("\n## Activations, all layers (GiB, bf16 regime)\n")
    rows = []
    for name, m in MODELS.items():
        p = params(m)
        for wn, w in WORKLOADS.items():
            t = tokens(w)
            rows.append([name, wn,
                         fmt(activations(m, p, w, "bf16", False, body_tokens=t["reencoded"])),
                         fmt(activations(m, p, w, "bf16", False)),
                         fmt(activations(m, p, w, "bf16", True, body_tokens=t["reencoded"])),
                         fmt(activations(m, p, w, "bf16", True))])
    print(table(["model", "workload", "no ckpt, re-encoded", "no ckpt, shared", "ckpt, re-encoded", "ckpt, shared"],
                rows))

    print("\n## Loss head (GiB)\n")
    rows = []
    for name, m in MODELS.items():
        for wn, w in WORKLOADS.items():
            t = tokens(w)
            rows.append([name, wn, fmt(head(m, w, "naive", T=t["reencoded"]), 2),
                         fmt(head(m, w, "naive", T=t["shared"]), 2), fmt(head(m, w, "naive"), 2),
                         fmt(head(m, w, "fused"), 2), fmt(head(m, w, "fused", trainable_head=False), 2)])
    print(table(["model", "workload", "naive, all re-encoded positions", "naive, all shared positions",
                 "naive, response tokens", "fused", "fused, frozen head (LoRA)"], rows))

    print("\n## Full fine-tuning, FSDP2 (GiB per GPU)\n")
    rows = []
    for name, m in MODELS.items():
        p = params(m)
        for wn, w in WORKLOADS.items():
            for W in FULL_FT_GPUS[name]:
                r, r0 = full_ft(m, p, w, W), full_ft(m, p, w, W, ckpt=False)
                rows.append([name, wn, W, *(fmt(r[c]) for c in ("weights", "grads", "adam", "gathered", "act", "head",
                                                                "backward", "step")), fits(r), fmt(r0["act"]),
                             fmt(r0["total"]), fits(r0)])
    print(table(["model", "workload", "GPUs", "weights fp32", "grads fp32", "AdamW m, v", "gathered bf16",
                 "activations, ckpt", "loss head", "backward peak, ckpt", "step peak", f"<= {BUDGET_GIB:.0f}",
                 "activations, no ckpt", "peak, no ckpt", f"<= {BUDGET_GIB:.0f}"], rows))

    print("\n## LoRA r=16 (GiB per GPU)\n")
    rows = []
    for name, m in MODELS.items():
        p = params(m)
        for wn, w in WORKLOADS.items():
            for label, base_bytes, fsdp in (("DDP, fp32 base", 4, False), ("DDP, bf16 base", 2, False),
                                            ("FSDP2, fp32 base", 4, True), ("FSDP2, bf16 base", 2, True)):
                W = max(8, fewest(lambda W: lora(m, p, w, W, base_bytes), start=2) or MAX_GPUS) if fsdp else 1
                r = lora(m, p, w, W, base_bytes, fsdp=fsdp)
                r0 = lora(m, p, w, W, base_bytes, ckpt=False, fsdp=fsdp)
                rows.append([name, wn, label, W if fsdp else "any", *(fmt(r[c]) for c in (
                    "base", "adapters", "gathered", "act", "head", "total")), fits(r), fmt(r0["act"]),
                    fmt(r0["total"]), fits(r0)])
    print(table(["model", "workload", "setup", "GPUs (FSDP2: fewest, at least 8)", "base weights",
                 "adapters + grads + AdamW", "gathered bf16", "activations, ckpt", "loss head", "total, ckpt",
                 f"<= {BUDGET_GIB:.0f}", "activations, no ckpt", "total, no ckpt", f"<= {BUDGET_GIB:.0f}"], rows))

    print("\n## Fewest GPUs (powers of two, gradient checkpointing)\n")
    rows = []
    for name, m in MODELS.items():
        p = params(m)
        for wn, w in WORKLOADS.items():
            cells = []
            W = fewest(lambda W: full_ft(m, p, w, W), start=2)
            cells.append(f"{W} ({fmt(full_ft(m, p, w, W)['total'])} GiB)" if W else f"more than {MAX_GPUS}")
            for base_bytes in (4, 2):
                one = lora(m, p, w, 1, base_bytes, fsdp=False)
                W = fewest(lambda W: lora(m, p, w, W, base_bytes), start=2)
                if one["total"] <= BUDGET_GIB * GIB:
                    cells.append(f"1, unsharded ({fmt(one['total'])} GiB)")
                else:
                    cells.append(f"{W}, FSDP2 ({fmt(lora(m, p, w, W, base_bytes)['total'])} GiB)" if W
                                 else f"more than {MAX_GPUS}")
            rows.append([name, wn, *cells])
    print(table(["model", "workload", "full fine-tuning", "LoRA, fp32 base", "LoRA, bf16 base"], rows))


if __name__ == "__main__":
    main()
