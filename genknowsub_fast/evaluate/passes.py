"""Batched next-token NLLs of many token sequences that come in groups sharing a prefix (the options of an example).

For each group, the longest common token prefix P of its sequences (capped so every sequence keeps at least one
token after it) runs once in a "prefix pass", batched with other groups' prefixes (right-padded). Its KV cache is
then gathered per sequence and the sequences' remaining tokens run on it in an "option pass" (right-padded, the
prefix padding masked out, position ids continuing at P). The last token of a sequence is never fed: its logits
would predict nothing that is scored.
"""

from __future__ import annotations

import copy

import torch

from ..hf_compat import cache_kwarg


def _lcp(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs) - 1  # every sequence keeps >= 1 token after the prefix
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return max(n, 0)


def _batches(order: list[int], sizes: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive groups whose sequence counts add up to at most ``batch_size`` (a larger group stands alone)."""
    out, cur, n = [], [], 0
    for g in order:
        if cur and n + sizes[g] > batch_size:
            out.append(cur)
            cur, n = [], 0
        cur.append(g)
        n += sizes[g]
    if cur:
        out.append(cur)
    return out


def _gather_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[targets] in float32; logits (..., V), targets (...)."""
    return -torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]


def next_token_nlls(
    model: torch.nn.Module,
    groups: list[list[list[int]]],
    pad_id: int,
    batch_size: int,
    progress: bool = False,
) -> list[list[torch.Tensor]]:
    """For each group and sequence ``s`` (n tokens), the float32 CPU tensor ``nll[t-1] = -log p(s[t] | s[:t])``."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    pad = pad_id if 0 <= pad_id < vocab else 0
    cache_kw = cache_kwarg(model)
    prefix = [_lcp(seqs) for seqs in groups]
    # Groups without a shared prefix (P = 0: the options differ at their first token) never share a batch with
    # groups that have one, so every prefix row in a prefix pass holds at least one real token (no fully masked
    # attention row). Longest first, so that a batch holds sequences of similar lengths (less padding).
    sizes = [len(s) for s in groups]
    batches = []
    for shares in (True, False):
        order = [g for g in range(len(groups)) if (prefix[g] > 0) == shares]
        order.sort(key=lambda g: max(map(len, groups[g])), reverse=True)
        batches += _batches(order, sizes, batch_size)
    out: list[list[torch.Tensor]] = [[] for _ in groups]
    bar = tqdm(total=len(groups), desc="scoring", unit="example", disable=not progress)
    with torch.inference_mode():
        for batch in batches:
            for g, nlls in zip(
                batch,
                _run_batch(
                    model, [groups[g] for g in batch], [prefix[g] for g in batch], pad, batch_size, device, cache_kw
                ),
            ):
                out[g] = nlls
            bar.update(len(batch))
    bar.close()
    return out


def _run_batch(model, groups, prefix, pad, batch_size, device, cache_kw) -> list[list[torch.Tensor]]:
    n_groups = len(groups)
    p_max = max(prefix)
    shared: list[torch.Tensor] = [torch.empty(0)] * n_groups  # NLLs of tokens 1..P-1, shared by the group
    next_lp: list[torch.Tensor | None] = [None] * n_groups  # log-probs of the token after the prefix
    cache = None
    prefix_mask = None
    if p_max > 0:
        ids = torch.full((n_groups, p_max), pad, dtype=torch.long)
        prefix_mask = torch.zeros((n_groups, p_max), dtype=torch.long)
        for g, (seqs, p) in enumerate(zip(groups, prefix)):
            ids[g, :p] = torch.tensor(seqs[0][:p])
            prefix_mask[g, :p] = 1
        ids, prefix_mask = ids.to(device), prefix_mask.to(device)
        pos = torch.arange(p_max, device=device).expand(n_groups, -1)
        res = model(input_ids=ids, attention_mask=prefix_mask, position_ids=pos, use_cache=True)
        cache = res.get("cache", None) if cache_kw == "cache" else res.get("past_key_values", None)
        if cache is None:
            raise ValueError(f"{type(model).__name__} returned no KV cache; it cannot share the options' prefix")
        for g, p in enumerate(prefix):
            shared[g] = _gather_nll(res.logits[g, : p - 1], ids[g, 1:p]).cpu()
            next_lp[g] = torch.log_softmax(res.logits[g, p - 1].float(), -1)
        del res

    # Every (group, sequence) pair, chunked by batch_size for the option passes over the shared cache.
    pairs = [(g, j) for g, seqs in enumerate(groups) for j in range(len(seqs))]
    chunks = [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
    out: list[list[torch.Tensor | None]] = [[None] * len(seqs) for seqs in groups]
    for c, chunk in enumerate(chunks):
        # The option pass appends to the cache it is given: all chunks but the last get a copy.
        chunk_cache = None
        if cache is not None:
            chunk_cache = cache if c == len(chunks) - 1 else copy.deepcopy(cache)
        tail = _option_pass(model, groups, prefix, chunk, pad, device, cache_kw, chunk_cache, prefix_mask)
        for (g, j), nll_tail in zip(chunk, tail):
            parts = [shared[g]]
            if prefix[g] > 0:
                parts.append(-next_lp[g][groups[g][j][prefix[g]]].reshape(1).cpu())
            parts.append(nll_tail)
            out[g][j] = torch.cat(parts)
    return out  # type: ignore[return-value]


def _option_pass(model, groups, prefix, chunk, pad, device, cache_kw, cache, prefix_mask) -> list[torch.Tensor]:
    """NLLs of tokens P+1..n-1 of each sequence in ``chunk``, from one forward over tokens P..n-2 on the cache."""
    feeds = [groups[g][j][prefix[g] : -1] for g, j in chunk]
    width = max(len(f) for f in feeds)
    if width == 0:  # every sequence ends one token after its prefix: the prefix pass scored it
        return [torch.empty(0) for _ in chunk]
    n = len(chunk)
    ids = torch.full((n, width), pad, dtype=torch.long)
    targets = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    start = torch.tensor([prefix[g] for g, _ in chunk])
    for i, ((g, j), f) in enumerate(zip(chunk, feeds)):
        if f:
            ids[i, : len(f)] = torch.tensor(f)
            targets[i, : len(f)] = torch.tensor(groups[g][j][prefix[g] + 1 :])
            mask[i, : len(f)] = 1
    ids, targets, mask = ids.to(device), targets.to(device), mask.to(device)
    pos = (start[:, None] + torch.arange(width)).to(device)
    kwargs = {}
    if cache is not None:
        rows = torch.tensor([g for g, _ in chunk], device=device)
        cache.reorder_cache(rows)  # one copy of its group's prefix cache per sequence
        mask = torch.cat([prefix_mask.index_select(0, rows), mask], dim=1)
        kwargs[cache_kw] = cache
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=cache is not None, **kwargs).logits
    nll = _gather_nll(logits, targets).cpu()
    return [nll[i, : len(f)] for i, f in enumerate(feeds)]
