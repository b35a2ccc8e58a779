"""Print the tables of docs/scaling.md: parameters, tokens, activations and memory per GPU for RRHF training of
Llama-3-8B, Llama-3-70B and Llama-3.1-405B shapes with rrhf_fast.train.

    python docs/scaling_numbers.py            # the tables of docs/scaling.md, in its order

Pure arithmetic (no torch, no GPU, no download); every formula is the one docs/scaling.md writes out.
Units: GiB = 2**30 bytes, as torch.cuda.memory_allocated() reports; parameter counts exact; activations are
estimates (docs/scaling.md, "Activations").

What the trainer does: `--fsdp --bf16` = fully_shard with MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32) over fp32 shards (bf16 gathers, no autocast); `--cpu-offload` keeps the shards, their
gradients and the AdamW step in host memory; `--bf16` without --fsdp = torch.autocast(bf16, cache_enabled=False)
over fp32 weights; LoRA under DDP or --fsdp, the base loaded in fp32. Marked "not implemented": a LoRA base
loaded in bf16. Marked "before": --fsdp --bf16 as autocast over fp32 gathers, which the trainer did until the
MixedPrecisionPolicy, kept for comparison.
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
LORA_MODULES = 7
CUDA_CHUNK_ELEMENTS = 2**28  # logits per chunk of the fused head on CUDA: as in rrhf_fast/head.py
# An 80 GB H100 shows 79.1 GiB to torch; a case fits when its estimate is at most 70 GiB, leaving 9.1 GiB for
# what is not counted (CUDA context, NCCL buffers, allocator fragmentation)
BUDGET_GIB = 70.0
MAX_GPUS = 512  # the largest GPU count searched
# --cpu-offload: host memory of a node of 8 GPUs (an HGX H100 server has 2 TiB) that its 8 ranks' shards, gradients
# and AdamW state may take, leaving the rest for the processes, pinned buffers and the page cache
HOST_BUDGET_GIB = 1500.0
GPUS_PER_NODE = 8
FULL_FT_GPUS = {"Llama-3-8B": (2, 4, 8, 16), "Llama-3-70B": (8, 16, 32, 64), "Llama-3.1-405B": (128, 256, 512)}

# Measured on an H100 (docs/scaling.md, section 5): the allocated bytes a Llama-3-8B-shaped layer adds after the
# forward (2 layers minus 1, prefix_forward in packed mode); under autocast they include the layer's bf16 weight copies,
# which the matmuls save for the backward without checkpointing, with autocast's weight cache on or off
MEASURED_8B_LAYER = [  # (case, workload, regime, checkpointing, bytes a layer)
    ("A, bf16", "A", "bf16", False, 186_786_816),
    ("B, bf16", "B", "bf16", False, 1_347_732_480),
    ("A, fp32 weights under autocast", "A", "autocast", False, 698_491_904),
    ("A, bf16, checkpointing", "A", "bf16", True, 8_388_608),
    ("B, bf16, checkpointing", "B", "bf16", True, 50_855_936),
]

# LoRA setups: label -> (bytes a base parameter is held in, FSDP2, bytes a gathered parameter has under FSDP2).
LORA_DDP = "DDP, fp32 base"
LORA_FSDP = "--fsdp, fp32 base, fp32 gather"
LORA_FSDP_BF16 = "--fsdp --bf16, fp32 base, bf16 param_dtype"
LORA_DDP_BF16_BASE = "not implemented: DDP, bf16 base"
LORA_FSDP_BF16_BASE = "not implemented: --fsdp, bf16 base, bf16 param_dtype"
LORA_SETUPS = {
    LORA_DDP: (4, False, None),
    LORA_FSDP: (4, True, 4),
    LORA_FSDP_BF16: (4, True, 2),
    LORA_DDP_BF16_BASE: (2, False, None),
    LORA_FSDP_BF16_BASE: (2, True, 2),
}


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
    return dict(attn=attn, mlp=mlp, linear=attn + mlp, layer=layer, body=L * layer, embed=embed, head=head,
                total=total, root=embed + head + D, lora=L * lora, dkv=dkv)


def tokens(w):
    P, R, k, G = w["P"], w["R"], w["k"], w["G"]
    return dict(shared=G * (P + k * R), reencoded=G * k * (P + R), N=G * k * R, row=P + k * R, rows=G)


def act_per_token(m, p, regime):
    """Bytes one decoder layer saves for the backward per token, without checkpointing (docs/scaling.md).

    bf16:     the layer computes with bf16 weights (not implemented: FSDP2 param_dtype=bf16, or a model loaded in
              bf16):
                two RMSNorms, each its fp32 input (4D) and bf16 normalised input (2D)      12D
                inputs of q/k/v, o_proj, gate/up (bf16)                                     6D
                attention: q (2D), k and v (2 Dkv each), its output (2D)                    4D + 4Dkv
                MLP: gate output, SiLU output, up output, down input (bf16)                 8F
              = 22D + 4Dkv + 8F
    autocast: fp32 weights under torch.autocast(bf16, cache_enabled=False), what --bf16 does today, with or
              without --fsdp: the residual stream and both norms stay fp32 (8D each), q, k, v, gate and up each
              cast their fp32 input to bf16 (5 x 2D), o_proj's input 2D
              = 32D + 4Dkv + 8F, plus every linear's bf16 weight copy (2 bytes x linear parameters, a layer)
    """
    D, F, dkv = m["D"], m["F"], p["dkv"]
    return (22 * D if regime == "bf16" else 32 * D) + 4 * dkv + 8 * F


def lora_act_per_token(m, adapters_bf16, dropout=False):
    """Bytes the LoRA adapters of one layer save per token, beyond the base layer's (act_per_token).

    Each of the 7 adapters keeps lora_A's bf16 output (r wide) for lora_B: 14r. fp32 adapters (peft keeps them
    fp32) under autocast: peft casts each adapter's input to fp32 and lora_A casts it back to bf16, a copy of its
    own for each adapter (q, k, v, o, gate, up: D wide; down: F wide): 2 (6D + F). Adapters gathered in bf16 read
    the base layer's input as it is. With dropout, each adapter keeps its dropped input (bf16) and the mask
    (1 byte an element): 3 (6D + F).
    """
    D, F = m["D"], m["F"]
    own_inputs = 3 * (6 * D + F) if dropout else 0 if adapters_bf16 else 2 * (6 * D + F)
    return own_inputs + LORA_MODULES * 2 * LORA_R


def mask_per_layer(w, t):
    """The packed mode's attention mask as each layer keeps it, a bf16 bias: rows x T x T x 2 bytes."""
    return t["rows"] * t["row"] ** 2 * 2


def activations(m, p, w, regime, ckpt, body_tokens=None, extra=0):
    """Bytes of saved activations at the start of the backward (all layers), with or without checkpointing.

    extra: bytes a token a layer beyond act_per_token (LoRA's adapters). With checkpointing under autocast the
    recomputed layer also holds its bf16 weight copies."""
    t = tokens(w)
    T = body_tokens or t["shared"]
    a = act_per_token(m, p, regime) + extra
    mask = mask_per_layer(w, t) if body_tokens is None else 0
    copies = 2 * p["linear"] if regime == "autocast" else 0  # one layer's bf16 weight copies under autocast
    if ckpt:  # every layer keeps its input; one layer is recomputed at a time (its activations + mask)
        return m["L"] * layer_input(m, regime) * T + a * T + mask + copies
    return m["L"] * (a * T + mask + copies)


def layer_input(m, regime):
    """Bytes a token of the residual stream: what a checkpointed layer keeps (bf16, or fp32 under autocast)."""
    return 2 * m["D"] if regime == "bf16" else 4 * m["D"]


def head(m, w, kind, trainable_head=True, T=None, master="bf16"):
    """Peak bytes the loss head adds in its forward (the LM head's weight gradient included when it is trained).

    The fused head computes with bf16 hidden states and a bf16 head weight in every case: under autocast rrhf_loss
    casts the fp32 hidden states to bf16 and turns autocast off inside (_autocast_head in rrhf_fast/loss.py), so the
    chunk of logits is bf16. master="fp32": the head weight is an fp32 master weight (--bf16 today), which
    _head_like casts once a call to a bf16 copy (2VD) that the autograd Function keeps for the backward; the
    forward fills an fp32 dW accumulator (4VD) and hands dW back as a bf16 copy (2VD), also kept for the backward.
    master="bf16": a bf16 head weight (not implemented: bf16 param_dtype, bf16 base), used as it is."""
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
    copy = 2 * V * D if master == "fp32" else 0  # the bf16 copy of an fp32 head weight
    chunk = 2 * rows * V  # one bf16 [rows, V] buffer, overwritten in place by dz
    if not trainable_head:
        return copy + chunk
    return copy + max(chunk + 4 * V * D, 6 * V * D)  # fp32 dW accumulator; then its bf16 copy beside it


def head_backward(m):
    """Bytes of a trained fp32 head under autocast in its own backward: the bf16 weight copy and the bf16 dW the
    Function kept from the forward (2VD each), and the fp32 gradient autograd makes from the bf16 dW (4VD)."""
    return 8 * m["V"] * m["D"]


def gib(x):
    return x / GIB


def fmt(x, digits=1):
    return f"{gib(x):.{digits}f}"


def shard(p, W, bytes_per_param):
    """Bytes a GPU holds of something spread over W GPUs; W=None: the floor as W grows without bound (0)."""
    return bytes_per_param * p["total"] / W if W else 0


def full_ft(m, p, w, W, ckpt=True, offload=False):
    """Full fine-tuning as `--fsdp --bf16` runs over W GPUs: FSDP2 with MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32): bf16 gathered params, fp32 sharded state, no autocast casts. offload (--cpu-offload): the
    fp32 shards, their gradients, AdamW's moments and its step live in host memory (16 bytes x params / W a rank,
    20 during the step); the GPU holds what is gathered and computed."""
    sharded = 0 if offload else shard(p, W, 1)
    root = 2 * p["root"]  # the root unit (embeddings, final norm, LM head) stays gathered, bf16
    layers = 10 * p["layer"]  # 2 gathered layers in bf16 + a layer's bf16 gradient + its fp32 reduce-scatter copy
    act = activations(m, p, w, "bf16", ckpt)
    hd = head(m, w, "fused")
    rows = dict(weights=4 * sharded, grads=4 * sharded, adam=8 * sharded, gathered=root + layers, act=act, head=hd)
    rows["backward"] = sum(rows.values())  # at the start of the backward, everything above is held at once
    # the optimizer step: the shards, plus AdamW's (foreach) fp32 temporary the size of v; nothing else is held
    rows["step"] = 20 * sharded
    rows["host"] = shard(p, W, 20) if offload else 0  # a rank's share in host memory, step temporary included
    rows["total"] = max(rows["backward"], rows["step"])
    return rows


def host_per_node(r, W):
    """Host bytes a node holds under --cpu-offload: its ranks' shares (min(W, 8) ranks)."""
    return r["host"] * min(W, GPUS_PER_NODE) if W else 0


def full_ft_offload(m, p, w, W):
    """--fsdp --bf16 --cpu-offload, for the fewest-GPU search: a GPU count fits when the GPU peak fits the budget
    and the node's host memory HOST_BUDGET_GIB (else total is infinite)."""
    r = full_ft(m, p, w, W, offload=True)
    return r if host_per_node(r, W) <= HOST_BUDGET_GIB * GIB else {**r, "total": float("inf")}


def full_ft_before(m, p, w, W, ckpt=True):
    """Before: full fine-tuning as `--fsdp --bf16` ran until the MixedPrecisionPolicy, over W GPUs (W=None: the
    floor as W grows), for comparison.

    fp32 gathered: the root unit (4 bytes x its parameters) for the whole step; two decoder layers (8 bytes x a
    layer) in the forward, and in the backward also one layer's fp32 gradient and the fp32 reduce-scatter buffer
    it is copied into (16 bytes x a layer). Autocast runs without its weight cache (bf16_autocast in
    rrhf_fast/train.py): a bf16 weight copy lives only while its matmul needs it. Under checkpointing the forward
    casts one linear weight at a time and frees the copy after its matmul, so the running layer adds at most its
    largest linear's copy (gate, up or down: 2DF bytes); the recomputed layer saves its copies for its backward
    (2 bytes x its linear parameters, in activations()). Without checkpointing the matmuls save every layer's
    copies, counted in the activations. The peak is the largest of the forward, the backward and the optimizer
    step."""
    L, V, D = m["L"], m["V"], m["D"]
    t = tokens(w)
    r = dict(shards=shard(p, W, 16), root=4 * p["root"], layers_fwd=8 * p["layer"], layers_bwd=16 * p["layer"],
             head_fwd=head(m, w, "fused", master="fp32"), head_bwd=head_backward(m),
             head_grad=4 * V * D)  # the LM head's fp32 gradient, from its backward to the root's reduce-scatter
    if ckpt:
        r["copy_fwd"] = 2 * D * m["F"]  # the bf16 copy of the largest linear weight of the running layer
        r["inputs"] = L * layer_input(m, "autocast") * t["shared"]
        r["recomputed"] = activations(m, p, w, "autocast", True) - r["inputs"]  # one layer and its weight copies
    else:  # the matmuls save every layer's bf16 weight copies for the backward: they are part of the activations
        r["copy_fwd"], r["inputs"], r["recomputed"] = 0, activations(m, p, w, "autocast", False), 0
    held = r["shards"] + r["root"] + r["inputs"]
    # the forward: two layers gathered and the running layer's weight copy, or the loss head (after they are resharded)
    r["forward"] = held + max(r["layers_fwd"] + r["copy_fwd"], r["head_fwd"])
    # the head's backward comes first, before any layer is gathered or recomputed for the backward
    r["backward"] = held + max(r["head_bwd"], r["layers_bwd"] + r["recomputed"] + r["head_grad"])
    r["step"] = shard(p, W, 20)
    r["total"] = max(r["forward"], r["backward"], r["step"])
    return r


def lora(m, p, w, W, setup, ckpt=True):
    """Per-GPU bytes for LoRA in one of LORA_SETUPS: base frozen, adapters fp32 + AdamW (W=None under FSDP2: the
    floor as W grows)."""
    base_bytes, fsdp, gather_bytes = LORA_SETUPS[setup]
    # fp32 weight, grad, m, v (16 bytes); DDP adds its fp32 gradient buckets (4 bytes)
    adapters = (16 * p["lora"] / W if W else 0) if fsdp else 20 * p["lora"]
    if fsdp:
        base = shard(p, W, base_bytes)
        gathered = gather_bytes * (p["root"] + 2 * p["layer"])  # root + 2 layers; frozen: no gradients to reduce
        weights_bf16 = gather_bytes == 2
    else:
        base = base_bytes * p["total"]
        gathered = 0
        weights_bf16 = base_bytes == 2
    regime = "bf16" if weights_bf16 else "autocast"
    extra = lora_act_per_token(m, adapters_bf16=fsdp and weights_bf16)
    act = activations(m, p, w, regime, ckpt, extra=extra)
    hd = head(m, w, "fused", trainable_head=False, master="bf16" if weights_bf16 else "fp32")
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


def fewest_cell(per_gpu, label=""):
    """'W<label> (peak GiB)' for the fewest GPUs that fit, else why none do: the floor as W grows, or the search."""
    W = fewest(per_gpu, start=2)
    if W:
        return f"{W}{label} ({fmt(per_gpu(W)['total'])} GiB)"
    floor = per_gpu(None)["total"]
    if floor > BUDGET_GIB * GIB:
        return f"none at any GPU count (floor {fmt(floor)} GiB)"
    return f"more than {MAX_GPUS}"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def cases():
    """(model name, shape, parameter counts, workload name, workload) for every model and workload."""
    for name, m in MODELS.items():
        p = params(m)
        for wn, w in WORKLOADS.items():
            yield name, m, p, wn, w


FITS = f"<= {BUDGET_GIB:.0f}"

# Each table: a function returning (title, header, rows); main() prints them in the order of docs/scaling.md.


def summary_table():
    rows = []
    for name, m, p, wn, w in cases():

        def lora_cell(ddp, fsdp=None, note=""):
            """DDP when one GPU holds the whole case, else the fewest GPUs of the --fsdp setup (None: DDP only)."""
            one = lora(m, p, w, 1, ddp)
            if one["total"] <= BUDGET_GIB * GIB:
                return f"1, unsharded ({fmt(one['total'])} GiB){note}"
            if fsdp is None:
                return f"none: DDP holds {fmt(one['total'])} GiB a GPU"
            return fewest_cell(lambda W: lora(m, p, w, W, fsdp), ", FSDP2")

        rows.append([name, wn, fewest_cell(lambda W: full_ft(m, p, w, W)),
                     fewest_cell(lambda W: full_ft_offload(m, p, w, W)),
                     lora_cell(LORA_DDP, LORA_FSDP), lora_cell(LORA_DDP, LORA_FSDP_BF16),
                     lora_cell(LORA_DDP_BF16_BASE, LORA_FSDP_BF16_BASE),
                     fewest_cell(lambda W: full_ft_before(m, p, w, W))])
    header = ["model", "workload", "full fine-tuning: --fsdp --bf16", "full fine-tuning: --fsdp --bf16 --cpu-offload",
              "LoRA: DDP, or --fsdp (fp32 gather)", "LoRA: DDP, or --fsdp --bf16",
              "not implemented: LoRA, bf16 base", "before: full fine-tuning, autocast over fp32 gathers"]
    return "Fewest GPUs (powers of two, gradient checkpointing)", header, rows


def parameters_table():
    rows = []
    for name, m in {**MODELS, **REFERENCE_MODELS}.items():
        p = params(m)
        rows.append([name, m["D"], m["L"], f"{m['H']} / {m['KV']}", m["F"], m["V"], f"{p['layer']:,}",
                     f"{p['embed'] + p['head']:,}", f"{p['total']:,}", f"{p['total'] / 1e9:.2f} B",
                     f"{p['lora']:,}"])
    header = ["model", "D", "L", "heads / kv", "F", "V", "per layer", "embed + head", "total", "total",
              f"LoRA r={LORA_R}"]
    return "Parameters", header, rows


def pieces_table():
    rows = []
    for name, m in MODELS.items():
        p = params(m)
        rows.append([name, fmt(16 * p["total"]), fmt(4 * p["total"]), fmt(2 * p["total"]), fmt(4 * p["root"], 2),
                     fmt(2 * p["root"], 2), fmt(16 * p["layer"], 2), fmt(10 * p["layer"], 2), fmt(8 * p["layer"], 2),
                     fmt(4 * p["layer"], 2), fmt(4 * m["V"] * m["D"], 2), fmt(2 * p["linear"] * m["L"]),
                     fmt(8 * 4 * p["total"])])
    header = ["model", "16 bytes x params", "4 bytes x params", "2 bytes x params", "root unit, fp32",
              "root unit, bf16", "16 bytes x layer (full FT, fp32 gather)", "10 bytes x layer (full FT, bf16)",
              "8 bytes x layer (LoRA, fp32 gather)", "4 bytes x layer (LoRA, bf16)", "fp32 LM head dW, 4VD",
              "bf16 weight copies: 2 bytes x linear weights of all layers", "8 ranks x 4 bytes x params (host)"]
    return "Fixed pieces (GiB)", header, rows


def tokens_table():
    rows = []
    for name, w in WORKLOADS.items():
        t = tokens(w)
        rows.append([name, w["P"], w["R"], w["k"], w["G"], t["reencoded"], t["shared"],
                     f"{t['reencoded'] / t['shared']:.2f}", t["N"], f"{t['rows']} x {t['row']}"])
    header = ["workload", "P", "R", "k", "queries / GPU", "body tokens, re-encoded k(P+R)G",
              "body tokens, shared (P+kR)G", "ratio", "response tokens N = kRG", "packed rows x T"]
    return "Tokens", header, rows


def measured_table():
    m = MODELS["Llama-3-8B"]
    p = params(m)
    rows = []
    for case, wn, regime, ckpt, measured in MEASURED_8B_LAYER:
        t = tokens(WORKLOADS[wn])
        T = t["shared"]
        copies = 2 * p["linear"] if regime == "autocast" else 0
        per_token = round((measured - copies) / T)
        if ckpt:
            formula, shown = 2 * m["D"], f"2D = {2 * m['D']:,}"
        else:
            a, mask = act_per_token(m, p, regime), mask_per_layer(WORKLOADS[wn], t) // T
            formula, shown = a + mask, f"{a:,} + {mask:,} = {a + mask:,}"
        ratio = round(100 * (formula / per_token - 1))
        versus = "exact" if formula == per_token else f"{abs(ratio)}% {'high' if ratio > 0 else 'low'}"
        rows.append([case, f"{measured:,}", f"{copies:,}", f"{per_token:,}", shown, versus])
    header = ["case", "measured, bytes a layer", "of which bf16 weight copies", "the rest, a token",
              "formula + mask, a token", "formula vs measured"]
    return "Measured on an H100, a Llama-3-8B-shaped layer", header, rows


def per_layer_table():
    rows = []
    for name, m in MODELS.items():
        p = params(m)
        for regime in ("bf16", "autocast"):
            a = act_per_token(m, p, regime)
            extra = f"{fmt(2 * p['linear'], 2)}" if regime == "autocast" else "0"
            rows.append([name, regime, f"{a:,}", f"{a / 1024:.0f}", extra,
                         *(fmt(a * tokens(w)["shared"] + mask_per_layer(w, tokens(w)), 2) for w in WORKLOADS.values())])
    header = ["model", "regime", "bytes / token / layer", "KiB", "weight copies / layer, GiB",
              *(f"workload {n}, GiB / layer" for n in WORKLOADS)]
    return "Activations per layer", header, rows


def lora_per_token_table():
    rows = [[name, f"{lora_act_per_token(m, True):,}", f"{lora_act_per_token(m, False):,}",
             f"{lora_act_per_token(m, False, dropout=True):,}"] for name, m in MODELS.items()]
    header = ["model", "adapters in bf16 (14r)", "fp32 adapters under autocast (2(6D+F) + 14r)",
              "with dropout (3(6D+F) + 14r)"]
    return "LoRA adapters' own activations (bytes / token / layer)", header, rows


def all_layers_table():
    rows = []
    for name, m, p, wn, w in cases():
        t = tokens(w)
        rows.append([name, wn, *(fmt(activations(m, p, w, "bf16", ckpt, body_tokens=T))
                                 for ckpt in (False, True) for T in (t["reencoded"], None))])
    header = ["model", "workload", "no ckpt, re-encoded", "no ckpt, shared", "ckpt, re-encoded", "ckpt, shared"]
    return "Activations, all layers (GiB, bf16 regime)", header, rows


def head_table():
    rows = []
    for name, m, p, wn, w in cases():
        t = tokens(w)
        rows.append([name, wn, *(fmt(head(m, w, "naive", T=T), 2) for T in (t["reencoded"], t["shared"], None)),
                     *(fmt(head(m, w, "fused", trainable_head=trained, master=master), 2)
                       for master in ("fp32", "bf16") for trained in (True, False))])
    header = ["model", "workload", "naive, all re-encoded positions", "naive, all shared positions",
              "naive, response tokens", "fused, fp32 head weight (today)",
              "fused, fp32 head weight, frozen (LoRA today)", "fused, bf16 head weight",
              "fused, bf16 head weight, frozen"]
    return "Loss head (GiB)", header, rows


def full_ft_before_table():
    rows = []
    for name, m, p, wn, w in cases():
        for W in (*FULL_FT_GPUS[name], None):
            r, r0 = full_ft_before(m, p, w, W), full_ft_before(m, p, w, W, ckpt=False)
            rows.append([name, wn, W or "floor", fmt(r["shards"]), fmt(r["root"]),
                         f"{fmt(r['layers_fwd'])} / {fmt(r['layers_bwd'])}", fmt(r["copy_fwd"], 2), fmt(r["inputs"]),
                         fmt(r["recomputed"]), " / ".join(fmt(r[c]) for c in ("head_fwd", "head_bwd", "head_grad")),
                         fmt(r["forward"]), fmt(r["backward"]), fmt(r["step"]), fits(r), fmt(r0["inputs"]),
                         fmt(r0["total"]), fits(r0)])
    header = ["model", "workload", "GPUs", "fp32 shards: weights, grads, AdamW", "root unit, fp32",
              "gathered layers, fp32: forward / backward", "bf16 weight copy in the forward (one linear, 2DF)",
              "checkpointed inputs, fp32", "recomputed layer",
              "loss head: forward / its backward / fp32 dW in the layers' backward", "forward peak",
              "backward peak", "step peak", FITS, "activations, no ckpt", "peak, no ckpt", FITS]
    return "Before: full fine-tuning as --fsdp --bf16 ran with autocast over fp32 gathers (GiB per GPU)", header, rows


def full_ft_table():
    rows = []
    for name, m, p, wn, w in cases():
        for W in FULL_FT_GPUS[name]:
            r, r0, off = full_ft(m, p, w, W), full_ft(m, p, w, W, ckpt=False), full_ft(m, p, w, W, offload=True)
            rows.append([name, wn, W, *(fmt(r[c]) for c in ("weights", "grads", "adam", "gathered", "act", "head",
                                                            "backward", "step")), fits(r), fmt(r0["act"]),
                         fmt(r0["total"]), fits(r0), fmt(off["total"]), fmt(host_per_node(off, W))])
    header = ["model", "workload", "GPUs", "weights fp32", "grads fp32", "AdamW m, v", "gathered bf16",
              "activations, ckpt", "loss head", "backward peak, ckpt", "step peak", FITS, "activations, no ckpt",
              "peak, no ckpt", FITS, "--cpu-offload: GPU peak, ckpt", f"--cpu-offload: host memory a node (<= {HOST_BUDGET_GIB:.0f})"]
    return "Full fine-tuning: --fsdp --bf16, bf16 param_dtype over fp32 shards (GiB per GPU)", header, rows


def lora_table():
    rows = []
    for name, m, p, wn, w in cases():
        for setup, (_, fsdp, _) in LORA_SETUPS.items():
            found = fewest(lambda W: lora(m, p, w, W, setup), start=2)
            W = max(8, found or MAX_GPUS) if fsdp else 1
            r, r0 = lora(m, p, w, W, setup), lora(m, p, w, W, setup, ckpt=False)
            cell = "any" if not fsdp else W if found else f"{W}: none fits"
            rows.append([name, wn, setup, cell, *(fmt(r[c]) for c in ("base", "adapters", "gathered", "act", "head",
                                                                      "total")), fits(r), fmt(r0["act"]),
                         fmt(r0["total"]), fits(r0)])
    header = ["model", "workload", "setup", "GPUs (FSDP2: fewest, at least 8)", "base weights",
              "adapters + grads + AdamW", "gathered", "activations, ckpt", "loss head", "total, ckpt", FITS,
              "activations, no ckpt", "total, no ckpt", FITS]
    return "LoRA r=16 (GiB per GPU)", header, rows


def main():
    tables = (summary_table, parameters_table, pieces_table, tokens_table, measured_table, per_layer_table,
              lora_per_token_table, all_layers_table, head_table, full_ft_table, full_ft_before_table, lora_table)
    print("\n\n".join(f"## {title}\n\n{table(header, rows)}" for title, header, rows in (t() for t in tables)))


if __name__ == "__main__":
    main()
