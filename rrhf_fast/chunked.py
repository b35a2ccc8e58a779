"""The RRHF loss in pure PyTorch, chunked so that no [N, V] tensor ever exists: the CPU fast path.

Two ways through the LM head, both with one [rows, V] buffer at a time:

    linear_rrhf_fwd      the training path. Chunks hold whole groups, so a chunk's ranking term is complete
                         once its logits are; the forward also computes the gradient for d loss = 1:
                         logits once, dz = g (onehot - softmax) in place, dh = dz W, dW += dz^T h. 6NVD
                         FLOPs, the floor. `impl` (this module or rrhf_fast.kernels) does the elementwise
                         and ranking work, so the Triton backend runs the same loop.
    linear_logprob_fwd / linear_logprob_bwd
                         per-token log-probabilities and their backward for any upstream gradient, two-pass:
                         the forward keeps only logsumexp, the backward recomputes the logits. 8NVD.

and the pieces with the same names and signatures as in rrhf_fast.kernels: logprob_fwd / logprob_bwd
(from given logits), rank_fwd / rank_bwd (scores, pairwise hinge, SFT term, per-token upstream gradient).
Maths: DESIGN.md section 2 and kernels/README.md.
"""

import torch

# A chunk of logits holds about this many elements (64 MiB in fp32, 512 rows of a 32k vocabulary): small
# enough to keep the peak far below the naive path's several [N, V] tensors, large enough that each chunk's
# matmuls run near full speed.
CHUNK_ELEMENTS = 1 << 24
# On a GPU each chunk also costs one read and write of the fp32 [V, D] dW accumulator (2 GB at V = 128256,
# D = 4096), and short chunks leave the matmuls' row dimension too small to fill the chip: fewer, larger
# chunks: 2^28 bf16 logits = 512 MiB, 2093 rows at V = 128256. On an H100 at N = 8192, D = 4096 the one-sweep
# head took 3.1x / 1.4x / 1.19x the 6NVD floor with 2^25 / 2^27 / 2^28 (benchmarks/tune_head.py, NOTES.md).
CUDA_CHUNK_ELEMENTS = 1 << 28

# bf16 / fp16 products accumulated straight into an fp32 tensor by one cuBLAS call (torch >= 2.8, CUDA only)
_ADDMM_OUT_DTYPE = "dtype_out" in torch.ops.aten.addmm.overloads()


def _chunk_elements(device: torch.device) -> int:
    return CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _row_chunks(num_rows: int, vocab: int, device: torch.device):
    rows = max(1, _chunk_elements(device) // max(vocab, 1))
    for start in range(0, num_rows, rows):
        yield start, min(start + rows, num_rows)


def _chunk_logits(hidden_chunk, weight, bias, dtype):
    # The matmul runs in the inputs' dtype (bf16 on a GPU stays on tensor cores); softmax maths in `dtype`.
    logits = (hidden_chunk @ weight.T).to(dtype)
    return logits if bias is None else logits.add_(bias.to(dtype))


def _logp_lse(logits, targets):
    lse = torch.logsumexp(logits, dim=-1)
    return logits.gather(1, targets[:, None])[:, 0] - lse, lse


def _softmax_grad_(logits, targets, lse, grad_logp):
    """Overwrite [rows, V] logits with dz = g * (onehot(target) - softmax), using the saved logsumexp."""
    dz = logits.sub_(lse[:, None]).exp_().mul_(-grad_logp[:, None])
    dz[torch.arange(dz.shape[0], device=dz.device), targets] += grad_logp
    return dz


def _multiply_out(dz, h, weight, dh_out, dw_acc):
    """dh_out = dz @ W and dw_acc += dz^T @ h for one chunk; dw_acc accumulates in fp32 (or fp64)."""
    dz = dz.to(h.dtype)  # low-precision inputs multiply in their own dtype, as on tensor cores
    if dw_acc is not None and dw_acc.dtype == dz.dtype:
        dw_acc.addmm_(dz.T, h)  # in place: no [V, D] temporary per chunk
    elif dw_acc is not None and dw_acc.is_cuda and _ADDMM_OUT_DTYPE:
        # fp32 accumulation inside cuBLAS: no low-precision [V, D] product and fp32 copy of it per chunk
        torch.addmm(dw_acc, dz.T, h, out_dtype=dw_acc.dtype, out=dw_acc)
    elif dw_acc is not None:
        dw_acc += (dz.T @ h).to(dw_acc.dtype)
    if dh_out is not None:
        torch.mm(dz, weight, out=dh_out)


def linear_logprob_fwd(hidden, weight, bias, targets, elementwise=None):
    """[N, D] hidden, [V, D] weight, [V] bias or None, [N] targets -> ([N] logp, [N] lse) in fp32 (fp64 for fp64).

    `elementwise` (rrhf_fast.kernels) replaces the torch log-softmax of each chunk with its logprob_fwd kernel,
    which reads the buffer in the matmul's dtype: the Triton backend's two-pass head.
    """
    dtype = _compute_dtype(hidden)
    logp = hidden.new_empty(hidden.shape[0], dtype=dtype)
    lse = torch.empty_like(logp)
    for start, end in _row_chunks(hidden.shape[0], weight.shape[0], hidden.device):
        if elementwise is None:
            logits = _chunk_logits(hidden[start:end], weight, bias, dtype)  # [rows, V]
            logp[start:end], lse[start:end] = _logp_lse(logits, targets[start:end])
        else:
            logits = _chunk_logits(hidden[start:end], weight, bias, hidden.dtype)
            logp[start:end], lse[start:end] = elementwise.logprob_fwd(logits, targets[start:end])
    return logp, lse


def linear_logprob_bwd(hidden, weight, bias, targets, lse, grad_logp, compute_dh=True, compute_dw=True, elementwise=None):
    """Gradients of sum_n grad_logp[n] * logp[n] -> (dh [N, D] or None, dw [V, D] or None, db [V] or None).

    `elementwise` as in linear_logprob_fwd: its logprob_bwd kernel writes dz over the chunk's logits.
    """
    dtype = lse.dtype
    grad_logp = grad_logp.to(dtype)
    dh = torch.empty_like(hidden) if compute_dh else None
    dw = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if compute_dw else None
    db = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if bias is not None else None
    for start, end in _row_chunks(hidden.shape[0], weight.shape[0], hidden.device):
        h, rows = hidden[start:end], slice(start, end)
        if elementwise is None:
            logits = _chunk_logits(h, weight, bias, dtype)  # [rows, V]
            dz = _softmax_grad_(logits, targets[rows], lse[rows], grad_logp[rows])
        else:
            logits = _chunk_logits(h, weight, bias, hidden.dtype)
            dz = elementwise.logprob_bwd(logits, targets[rows], lse[rows], grad_logp[rows], inplace=True)
        if db is not None:
            db += dz.sum(0, dtype=dtype)
        _multiply_out(dz, h, weight, dh[rows] if compute_dh else None, dw)
    return (
        dh,
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )


def logprob_fwd(logits, targets):
    """[N, V] logits, [N] targets -> ([N] logp, [N] lse), converting one chunk of rows at a time."""
    dtype = _compute_dtype(logits)
    logp = logits.new_empty(logits.shape[0], dtype=dtype)
    lse = torch.empty_like(logp)
    for start, end in _row_chunks(*logits.shape, logits.device):
        logp[start:end], lse[start:end] = _logp_lse(logits[start:end].to(dtype), targets[start:end])
    return logp, lse


def logprob_bwd(logits, targets, lse, grad_logp, inplace=False):
    """dlogits = grad_logp * (onehot - softmax) in logits' dtype; written over `logits` when inplace."""
    if inplace and logits.dtype == lse.dtype:
        return _softmax_grad_(logits, targets, lse, grad_logp.to(lse.dtype))
    out = logits if inplace else torch.empty_like(logits)
    grad_logp = grad_logp.to(lse.dtype)
    for start, end in _row_chunks(*logits.shape, logits.device):
        chunk = logits[start:end].to(lse.dtype, copy=True)
        out[start:end] = _softmax_grad_(chunk, targets[start:end], lse[start:end], grad_logp[start:end])
    return out


def _group_layout(cu_seqlens, cu_groups):
    """Index tensors shared by rank_fwd and rank_bwd."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # [C]
    group_sizes = cu_groups[1:] - cu_groups[:-1]  # [G]
    width = int(group_sizes.max())
    slot = torch.arange(width, device=cu_groups.device)
    member = cu_groups[:-1, None] + slot  # [G, K] candidate index of each slot
    valid = slot < group_sizes[:, None]  # [G, K]
    return lengths, member.clamp(max=cu_groups[-1] - 1), valid


def rank_fwd(logp, cu_seqlens, rewards, cu_groups, length_penalty, margin, sft_reduction):
    """Scores, per-group hinge and SFT terms, and what the backward needs.

    Returns scores [C], rank [G], sft [G], coef [C] (net count of active hinge pairs: as the lower-rewarded
    side minus as the higher-rewarded side) and best [G] (the first highest-rewarded candidate).
    """
    cu_seqlens, cu_groups = cu_seqlens.long(), cu_groups.long()
    lengths, member, valid = _group_layout(cu_seqlens, cu_groups)
    candidate_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=logp.device), lengths)
    sums = logp.new_zeros(len(lengths)).index_add_(0, candidate_of_token, logp)  # [C]
    lengths = lengths.to(logp.dtype)
    scores = sums / lengths**length_penalty

    p = scores[member]  # [G, K]
    r = rewards.to(logp.dtype)[member].masked_fill(~valid, float("-inf"))  # [G, K]
    ordered = (r[:, :, None] < r[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # [G, K, K]: r_i < r_j
    gap = p[:, :, None] - p[:, None, :] + margin  # [G, K, K]
    rank = (gap.clamp(min=0) * ordered).sum((1, 2))
    active = (ordered & (gap > 0)).to(logp.dtype)
    net = active.sum(2) - active.sum(1)  # [G, K]
    coef = torch.zeros_like(scores).index_put_((member[valid],), net[valid])

    best = member.gather(1, r.argmax(1, keepdim=True))[:, 0]  # argmax returns the first maximum
    sft = -sums[best] / (lengths[best] if sft_reduction == "mean" else 1.0)
    return scores, rank, sft, coef, best


def rank_bwd(cu_seqlens, cu_groups, coef, best, grad_scores, rank_scale, sft_scale, length_penalty, sft_reduction):
    """[N] upstream gradient of every token's logp: dS_c for each token of candidate c (DESIGN.md section 2)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    lengths_f = lengths.to(coef.dtype)
    grad_sums = (rank_scale * coef + grad_scores) / lengths_f**length_penalty  # [C]
    sft_grad = sft_scale / lengths_f[best] if sft_reduction == "mean" else sft_scale.expand(best.shape)
    grad_sums = grad_sums.index_add(0, best, -sft_grad.to(coef.dtype))
    return torch.repeat_interleave(grad_sums, lengths)


def _group_chunks(seq_offsets, group_offsets, max_rows):
    """Split the groups into runs whose tokens fit `max_rows` (a larger group gets a run of its own).

    Yields (first_group, end_group, first_token, end_token) with Python ints.
    """
    first = 0
    num_groups = len(group_offsets) - 1
    while first < num_groups:
        end = first + 1
        start_token = seq_offsets[group_offsets[first]]
        while end < num_groups and seq_offsets[group_offsets[end + 1]] - start_token <= max_rows:
            end += 1
        yield first, end, start_token, seq_offsets[group_offsets[end]]
        first = end


def logprob_step_(logits, targets, grad_of_logp):
    """One chunk of the one-sweep loss: log-probabilities, their upstream gradient, and dz in place.

    logits [rows, V] in the compute dtype is overwritten. grad_of_logp maps the chunk's [rows] logp to its
    [rows] upstream gradient (or None for a forward only). Returns (lse [rows], dz [rows, V] or None).
    On a CPU the exponentials dominate the elementwise work, so the buffer keeps e = exp(z - max) from the
    forward and the backward rescales it, dz = g (onehot - e / sum e): one exp per logit instead of two.
    """
    rows = torch.arange(logits.shape[0], device=logits.device)
    target_logits = logits[rows, targets]
    row_max = logits.amax(-1)
    e = logits.sub_(row_max[:, None]).exp_()  # [rows, V]
    total = e.sum(-1)
    lse = row_max + total.log()
    grad_logp = grad_of_logp(target_logits - lse)
    if grad_logp is None:
        return lse, None
    dz = e.mul_((-grad_logp / total)[:, None])
    dz[rows, targets] += grad_logp
    return lse, dz


def _logprob_step_from_kernels(impl, logits, targets, grad_of_logp):
    """logprob_step_ for an implementation that has only logprob_fwd and logprob_bwd."""
    logp, lse = impl.logprob_fwd(logits, targets)
    grad_logp = grad_of_logp(logp)
    return lse, None if grad_logp is None else impl.logprob_bwd(logits, targets, lse, grad_logp, inplace=True)


def linear_rrhf_fwd(hidden, weight, bias, targets, cu_seqlens, rewards, cu_groups, options, impl, grads=(True, True, True)):
    """The whole RRHF loss from the head in one sweep over the vocabulary, with its gradient for d loss = 1.

    Chunks hold whole groups, so each chunk's ranking term is complete once its logits are: the chunk's
    logits are computed once (2 ND V_chunk), turned into log-probabilities, scored and ranked, turned in place
    into dz = g (onehot - softmax), and multiplied out into dh and dW. That is the 6NVD floor with one
    [rows, V] buffer. `impl` supplies rank_fwd/bwd and logprob_step_ (or logprob_fwd/bwd): this module or
    rrhf_fast.kernels. `grads` says which of (dh, dw, db) to compute; none computes the loss alone (2NVD).

    Returns (scores [C], rank [G], sft [G], coef [C], best [G], lse [N], dh, dw, db), gradients None when
    not asked for.
    """
    length_penalty, rank_weight, sft_weight, margin, sft_reduction = options
    dtype = _compute_dtype(hidden)
    seq_offsets, group_offsets = cu_seqlens.tolist(), cu_groups.tolist()
    num_groups = len(group_offsets) - 1
    want_dh, want_dw, want_db = grads[0], grads[1], grads[2] and bias is not None
    dh = torch.zeros_like(hidden) if want_dh else None
    dw = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if want_dw else None
    db = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if want_db else None
    step = getattr(impl, "logprob_step_", None)
    # Kernels read the buffer in its own dtype and do the softmax maths in fp32 registers, so the buffer stays
    # in the matmul's dtype (half the traffic for bf16, as in any HF model's logits); this module's step
    # works on the buffer with torch ops and needs it in the compute dtype.
    buffer_dtype = dtype if step is not None else hidden.dtype
    step = step or (lambda *args: _logprob_step_from_kernels(impl, *args))
    per_token, per_candidate, per_group = [], [], []

    max_rows = max(1, _chunk_elements(hidden.device) // weight.shape[0])
    for g0, g1, t0, t1 in _group_chunks(seq_offsets, group_offsets, max_rows):
        c0, c1 = group_offsets[g0], group_offsets[g1]
        local_seqlens = cu_seqlens[c0 : c1 + 1] - t0
        local_groups = cu_groups[g0 : g1 + 1] - c0

        def grad_of_logp(logp):
            scores, rank, sft, coef, best = impl.rank_fwd(
                logp, local_seqlens, rewards[c0:c1].to(logp.dtype), local_groups, length_penalty, margin, sft_reduction
            )
            per_candidate.append((scores, coef))
            per_group.append((rank, sft, best + c0))
            if not (want_dh or want_dw or want_db):
                return None
            return impl.rank_bwd(
                local_seqlens,
                local_groups,
                coef,
                best,
                torch.zeros_like(scores),
                torch.tensor(rank_weight / num_groups, dtype=coef.dtype, device=coef.device),
                torch.tensor(sft_weight / num_groups, dtype=coef.dtype, device=coef.device),
                length_penalty,
                sft_reduction,
            )

        h = hidden[t0:t1]
        lse, dz = step(_chunk_logits(h, weight, bias, buffer_dtype), targets[t0:t1], grad_of_logp)  # [rows, V]
        per_token.append(lse)
        if dz is None:
            continue
        if want_db:
            db += dz.sum(0)
        _multiply_out(dz, h, weight, dh[t0:t1] if want_dh else None, dw)
        del dz  # free this chunk's buffer before the next one is allocated

    scores, coef = (torch.cat(parts) for parts in zip(*per_candidate))
    rank, sft, best = (torch.cat(parts) for parts in zip(*per_group))
    return (
        scores,
        rank,
        sft,
        coef,
        best,
        torch.cat(per_token),
        dh,
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )
