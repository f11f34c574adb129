"""chunk_states (dnir/fused.py) on tensor cores: the loop over chunks with its products as mma.

The same loop as chunk_scan.py's chunk_states kernel: a thread block owns vt state
columns of one head in shared memory for all chunks, and per chunk n

    starts[n] = S;   v_new = u[n] - w[n] S;   S = S * last_decay[n] + k_to_end[n]^T v_new

but both products run on tensor cores (mma.py: 3xTF32 with split, the default here: the
state carries each chunk's rounding into every later chunk), by four warps of 16 rows:

- v_new (C x vt): warp w owns rows 16 w .. 16 w + 15; the sum over K runs in two halves,
  each half of w[n] (C x K/2) staged in shared memory (rows padded by 4 words: the A
  fragments' loads hit 32 banks), S read in place as B;
- the update (K x vt): per half of the state's rows, k_to_end[n]'s half staged (rows
  padded by 8: its fragments are read transposed), warp w owns rows 16 w .. of that half
  (K/2 = 64 rows: four warps), its accumulators start at S * last_decay and go back to S.

Shared memory: S [K, vt + 8], v_new [C, vt + 8], one staged half [C, K/2 + 8]; 36 KiB at
C = 64, K = 128, vt = 16. Takes C = 64 and K = 128 (four warps of 16 rows either way) and
vt a multiple of 8.

The cuda target's translator takes it for float32 (Vulkan keeps chunk_scan.py's kernel). On an
H200 at (1, 8192, 32, 128) it matched the CUDA-core kernel within 8.5e-7 (relative) and ran
1.24 -> 0.89 ms (TF32 alone: 0.78 ms but 1.2e-3; benchmarks/results/gpu_sweep.md).

That loop waits on global memory: each half is loaded, then the block waits at a barrier, then
multiplies. The staged operands do not depend on S, so two variants fetch them ahead (keyword
`prefetch`, timed by benchmarks/gpu_sweep.py; the cuda target runs `CHOSEN`):

- "registers": while the block multiplies half q, each thread's loads of half q + 1 (its 32
  floats, as float4) are in flight; the thread stores them into a second slot before the next
  barrier. Two slots [C, K/2 + 8]: 54 KiB at vt = 16 (66 at vt = 32).
- "async": cp.async copies (global -> shared, 16 bytes each) into a ring of `stages` slots, half
  q + stages - 1 issued while half q is multiplied; cp.async.wait_group, then the barrier, before
  a half is used. 90 KiB at vt = 16 and 4 slots (2 blocks an SM, 256 blocks on 132 SMs all
  resident), 102 KiB at vt = 32 (128 blocks: one an SM).

A bf16 layer at precision "tf32" hands this kernel w, u and k_to_end in bf16 and takes its starts and
v_new in bf16 (passes/narrow_loop_results.py): "async" then copies the halves as bf16 (a 16-byte
copy moves 8 values; rows padded by the same 4 and 8 words, 58 KiB at vt = 16 and 4 slots) and
widens each fragment value as a warp loads it; S, v_new and all arithmetic stay float32.

Two more knobs, for benchmarks/gpu_sweep.py: `chains` (accumulator sets the products alternate
between) and `products="bf16"` (m16n8k16, S and v_new rounded to bf16 as a warp loads them). On an
H100 neither helps the bf16 loop (0.445 ms by default; 0.467 with two sets, 0.495 with bf16
products: results/gpu_sweep_states.md): the products' chain is not what limits it.

Either has one barrier a half (the default two, and TVM adds 17 more a chunk to the
default's stores of v_new and S, see shared_address), u[n]'s tile and last_decay[n] loaded at
the step's start, v_new written to global memory from registers; S, v_new and the ring all
live in dynamic shared memory (over 48 KiB together).
"""
from __future__ import annotations

import math

from tvm.script import tirx as T

from dnir.errors import AttrError, DTypeError

from . import mma
from .fused_signatures import chunk_states_function
from .kernels import converted, itemsize, shared_address, unravel_index

WARPS = 4
# state columns of a block; 3xTF32 unless the layer's precision is "tf32" (translate.py passes split)
VT, SPLIT = 16, True
PREFETCH = (None, "registers", "async")   # how the staged halves arrive (None: synchronously)
# what the cuda target runs. Alone, on an H100 at (1, 8192, 32, 128), GDA and KDA: 0.88 ms synchronously,
# 0.80 through registers, 0.57-0.60 async, the same outputs bit for bit (benchmarks/results/gpu_sweep_prefetch.md);
# in the layers of benchmarks/results/gpu.md 0.49-0.57 ms (0.80 synchronously in the run before)
CHOSEN = "async"
STAGES = 4                                # prefetch="async": halves resident or in flight
# accumulator sets a warp's products alternate between (steps of 8 terms: k8 % chains), added at the end:
# independent sets let a warp's next product start before the last one's result is back
CHAINS = 1
# the products' operands: "tf32" (m16n8k8, 3xTF32 with split) or "bf16" (m16n8k16: w and k_to_end as a bf16
# layer stages them, S and v_new rounded to bf16 as they are loaded, float32 accumulation)
PRODUCTS = ("tf32", "bf16")


def takes(C: int, K: int, V: int, vt: int = VT) -> bool:
    return C == WARPS * mma.M and K == 2 * WARPS * mma.M and vt % mma.N == 0 and V % vt == 0


def _layout(batch: tuple, C: int, K: int, V: int, Kg: int, vt: int, staged: str = "float32"):
    """(heads, tiles, threads, nt, half, ps, pw, pk, per_key): the blocks' sizes and shared strides
    (staged: the dtype w and k_to_end are staged in; their rows padded by 4 and 8 words either way)."""
    half, per_word = K // 2, 4 // itemsize(staged)
    return (math.prod(batch), V // vt, 32 * WARPS, vt // mma.N, half,
            vt + 8,                       # ps: S's and v_new's row stride, B loads at (8t + g) mod 32, no conflict
            half + 4 * per_word,          # pw, pk: the staged w (read by rows) and k_to_end (read by columns)
            half + 8 * per_word,
            1 if Kg == K else 0)          # per_key: last_decay per key row, or one a head


def chunk_states_mma_kernel(steps: int, batch: tuple, C: int, K: int, V: int, Kg: int, dtype: str,
                            vt: int = VT, split: bool = SPLIT, prefetch: str | None = None, stages: int = STAGES,
                            stored: str = "", narrow: dict | None = None, chains: int = CHAINS,
                            products: str = "tf32"):
    """chunk_states' function (fused_signatures.chunk_states_function) with this kernel's loop nest.
    prefetch: None (each half staged synchronously), "registers" or "async" (the module's docstring);
    stages: the halves "async" keeps resident or in flight (2 to 4); stored: the dtype of starts and
    v_new where narrower than `dtype` (the op's `dtype`: each value rounded as it is written to global
    memory, the loop going on with the float32 one); narrow: operands narrower than `dtype` (role ->
    dtype: intra_chunk's bf16 w, u and k_to_end), widened as they are loaded. "async" copies w and
    k_to_end as they are (bytes: a 16-byte copy moves 8 bf16 values) and widens them as a warp loads
    its fragments; the others widen them as they stage them. chains: accumulator sets (CHAINS);
    products: PRODUCTS."""
    narrow = narrow or {}
    staged = narrow.get("w", dtype) if prefetch == "async" else dtype
    if prefetch is not None and narrow.get("k_to_end", dtype) != narrow.get("w", dtype):
        raise DTypeError(f"narrow: w and k_to_end share the staging slots, got {narrow!r}")
    if prefetch == "registers" and staged != dtype:
        raise DTypeError(f"narrow: prefetch='registers' moves float32 pieces, got {narrow!r}")
    if prefetch not in PREFETCH:
        raise AttrError(f"prefetch: expected one of {PREFETCH}, got {prefetch!r}")
    if products not in PRODUCTS:
        raise AttrError(f"products: expected one of {PRODUCTS}, got {products!r}")
    if products == "bf16" and split:
        raise AttrError("products='bf16' is one product a tile: split (3xTF32) does not apply")
    if chains not in (1, 2, 4):
        raise AttrError(f"chains: expected 1, 2 or 4 accumulator sets, got {chains!r}")
    if prefetch == "async" and not 2 <= stages <= 4:
        raise AttrError(f"stages: expected 2 to 4 staged halves for prefetch='async', got {stages!r}")
    heads, tiles, threads, nt, half, ps, pw, pk, per_key = _layout(batch, C, K, V, Kg, vt, staged)

    def head(bx):
        return unravel_index(bx // tiles, batch)

    def col0(bx):
        return bx % tiles * vt

    def narrowed(x):                       # a value of starts or v_new as it is stored
        return converted(x, dtype, stored or dtype)

    @T.macro
    def stage(X, src, n, h, stride, bx, tx):
        """X[c, :half] = src[n, head, c, h half : (h + 1) half], every row of the chunk."""
        for e in T.unroll(C * half // threads):
            X[(e * threads + tx) // half * stride + (e * threads + tx) % half] = converted(src[(n,) + head(bx) + (
                (e * threads + tx) // half, h * half + (e * threads + tx) % half)], src.dtype, dtype)
        T.tvm_storage_sync("shared")

    # the products' fragments: TF32 m16n8k8 (each value's low part beside it for split) or bf16 m16n8k16
    bf16 = products == "bf16"
    fragment = "bfloat16" if bf16 else dtype
    kstep, a_at, b_at = (mma.K16, mma.a16_at, mma.b16_at) if bf16 else (mma.K8, mma.a_at, mma.b_at)
    na, nb = (8, 4) if bf16 else (4, 2)       # a lane's elements of A and of B

    @T.macro
    def put(frag, count, i, x, have):
        """Element i of a lane's fragment (of `count`) from x, a value in `have`."""
        if bf16:
            frag[i] = converted(x, have, "bfloat16")
        else:
            frag[i] = converted(x, have, dtype)
            frag[count + i] = mma.low_part(frag[i])

    @T.macro
    def product(acc, offset, fa, fb):
        if bf16:
            mma.mma_bf16(acc, offset, fa, fb)
        else:
            mma.mma(acc, offset, fa, fb, split)

    @T.macro
    def vnew_products(X, xo, S, acc, fa, fb, h, w, lane):
        """acc += w[n]'s half h (staged at X[xo:], rows of stride pw) times S's rows of that half: warp w's
        16 rows of v_new."""
        for ks in T.unroll(half // kstep):
            for i in T.unroll(na):
                put(fa, na, i, X[xo + (w * mma.M + a_at(lane, i)[0]) * pw + ks * kstep + a_at(lane, i)[1]], staged)
            for j in T.unroll(nt):
                for i in T.unroll(nb):
                    put(fb, nb, i, S[(h * half + ks * kstep + b_at(lane, i)[0]) * ps + j * mma.N + b_at(lane, i)[1]],
                        dtype)
                product(acc, 4 * nt * (ks % chains) + 4 * j, fa, fb)

    @T.macro
    def update_products(X, xo, N, acc, fa, fb, w, lane):
        """acc += k_to_end[n]'s half (staged at X[xo:], rows of stride pk) transposed times v_new: warp w's
        16 rows of that half of the state."""
        for ks in T.unroll(C // kstep):
            for i in T.unroll(na):     # A = k_to_end^T: element (row r, term c) at X[c, r]
                put(fa, na, i, X[xo + (ks * kstep + a_at(lane, i)[1]) * pk + w * mma.M + a_at(lane, i)[0]], staged)
            for j in T.unroll(nt):
                for i in T.unroll(nb):
                    put(fb, nb, i, N[(ks * kstep + b_at(lane, i)[0]) * ps + j * mma.N + b_at(lane, i)[1]], dtype)
                product(acc, 4 * nt * (ks % chains) + 4 * j, fa, fb)

    @T.macro
    def clear_chains(acc, first):
        """The accumulator sets from `first` on start at zero."""
        for i in T.unroll(4 * nt * first, 4 * nt * chains):
            acc[i] = T.float32(0)

    @T.macro
    def add_chains(acc):
        """Set 0 += the other sets: the products' sum."""
        for c in T.unroll(1, chains):
            for i in T.unroll(4 * nt):
                acc[i] = acc[i] + acc[4 * nt * c + i]

    @T.macro
    def body(S0, W, U, Kte, LD, S1, St, Vn):
        T.reads()                              # the tensor-core calls read registers TVM cannot see
        T.writes()
        for bx in T.thread_binding(heads * tiles, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                S = T.alloc_shared((K * ps,), dtype)
                N = T.alloc_shared((C * ps,), dtype)
                X = T.alloc_shared((C * pk,), dtype)
                acc = T.alloc_local((4 * nt * chains,), dtype)
                fa = T.alloc_local((8,), fragment)
                fb = T.alloc_local((4,), fragment)
                w, lane = tx // 32, tx % 32
                for e in T.unroll(K * vt // threads):
                    S[(e * threads + tx) // vt * ps + (e * threads + tx) % vt] = S0[head(bx) + (
                        (e * threads + tx) // vt, col0(bx) + (e * threads + tx) % vt)]
                T.tvm_storage_sync("shared")
                for n in range(steps):
                    for e in T.unroll(K * vt // threads):
                        St[(n,) + head(bx) + ((e * threads + tx) // vt, col0(bx) + (e * threads + tx) % vt)] = narrowed(
                            S[(e * threads + tx) // vt * ps + (e * threads + tx) % vt])
                    # v_new = u - w S: rows 16 w.. of the chunk
                    clear_chains(acc, 0)
                    for h in range(2):
                        stage(X, W, n, h, pw, bx, tx)
                        vnew_products(X, 0, S, acc, fa, fb, h, w, lane)
                        T.tvm_storage_sync("shared")      # X is staged again next
                    add_chains(acc)
                    for j in T.unroll(nt):
                        for i in T.unroll(4):
                            N[(w * mma.M + mma.d_at(lane, i)[0]) * ps + j * mma.N + mma.d_at(lane, i)[1]] = converted(U[
                                (n,) + head(bx) + (w * mma.M + mma.d_at(lane, i)[0],
                                                   col0(bx) + j * mma.N + mma.d_at(lane, i)[1])], U.dtype, dtype) \
                                - acc[4 * j + i]
                            Vn[(n,) + head(bx) + (w * mma.M + mma.d_at(lane, i)[0],
                                                  col0(bx) + j * mma.N + mma.d_at(lane, i)[1])] = narrowed(
                                N[(w * mma.M + mma.d_at(lane, i)[0]) * ps + j * mma.N + mma.d_at(lane, i)[1]])
                    # S = S last_decay + k_to_end^T v_new, per half of the state's rows
                    for h in range(2):
                        stage(X, Kte, n, h, pk, bx, tx)    # also orders v_new's writes before its reads
                        for j in T.unroll(nt):
                            for i in T.unroll(4):
                                acc[4 * j + i] = S[(h * half + w * mma.M + mma.d_at(lane, i)[0]) * ps + j * mma.N
                                                   + mma.d_at(lane, i)[1]] * LD[(n,) + head(bx) + (
                                                       (h * half + w * mma.M + mma.d_at(lane, i)[0]) * per_key, 0)]
                        clear_chains(acc, 1)
                        update_products(X, 0, N, acc, fa, fb, w, lane)
                        add_chains(acc)
                        for j in T.unroll(nt):      # each lane writes back only what it read: no barrier
                            for i in T.unroll(4):
                                S[(h * half + w * mma.M + mma.d_at(lane, i)[0]) * ps + j * mma.N
                                  + mma.d_at(lane, i)[1]] = acc[4 * j + i]
                        T.tvm_storage_sync("shared")      # X is staged again next; S is read whole next
                for e in T.unroll(K * vt // threads):
                    S1[head(bx) + ((e * threads + tx) // vt, col0(bx) + (e * threads + tx) % vt)] = S[
                        (e * threads + tx) // vt * ps + (e * threads + tx) % vt]
    if prefetch is None:
        return chunk_states_function(steps, batch, C, K, V, Kg, dtype, body, stored, narrow)

    return _pipelined(steps, batch, C, K, V, Kg, dtype, vt, split, prefetch, stages, head, col0, narrowed,
                      vnew_products, update_products, clear_chains, add_chains, chains, fragment, stored, narrow,
                      staged)


def _pipelined(steps, batch, C, K, V, Kg, dtype, vt, split, prefetch, stages, head, col0, narrowed, vnew_products,
               update_products, clear_chains, add_chains, chains, fragment, stored, narrow, staged):
    """The prefetching variants' loop nest (the module's docstring). The halves of the chunks in order,
    q = 4 n + 2 p + h (p = 0: w[n], 1: k_to_end[n]; h: the half of K), half q in slot q % slots of a ring
    in shared memory. The loop's barriers are the four written here, one a half, in `arrive`: every shared
    write in the loop (the ring's slots, v_new, S's write-back) is a PTX store or copy (shared_address),
    which TVM's ThreadSync does not see. It would fence them with more: it takes S, N and the ring for one
    buffer (they share the dynamic shared memory) and compares accesses element by element."""
    if dtype != "float32":
        raise DTypeError(f"dtype: prefetch={prefetch!r} stores float32 (tensor cores in TF32), got {dtype!r}")
    heads, tiles, threads, nt, half, ps, pw, pk, per_key = _layout(batch, C, K, V, Kg, vt, staged)
    total = 4 * steps
    slots = 2 if prefetch == "registers" else stages
    slot = C * pk                       # a slot holds either operand's half (w's rows take pw <= pk words)
    span = 16 // itemsize(staged)         # values in a 16-byte piece: 4 float32, 8 bf16
    pieces = C * half // span // threads   # a thread's pieces of a half: 8 at C = 64, K = 128 in float32
    q4 = half // span                   # pieces a row

    def piece(e, tx):
        """(row, first column in the half) of the thread's piece e: 16 threads a row, a warp two rows."""
        return (e * threads + tx) // q4, (e * threads + tx) % q4 * span

    def src_at(q, e, tx, bx, v=0):      # the piece's place (plus v columns) in w[n] or k_to_end[n], n = q // 4
        return (q // 4,) + head(bx) + (piece(e, tx)[0], q % 2 * half + piece(e, tx)[1] + v)

    def dst_at(q, p, e, tx):            # its place in half q's slot
        return q % slots * slot + piece(e, tx)[0] * (pw if p == 0 else pk) + piece(e, tx)[1]

    @T.macro
    def fetch(pf, W, Kte, q, bx, tx):
        """pf = the thread's pieces of half q, a float4 load each, in flight while the block multiplies."""
        if q // 2 % 2 == 0:
            for e in T.unroll(pieces):
                for v in T.vectorized(4):
                    pf[4 * e + v] = W[src_at(q, e, tx, bx, v)]
        else:
            for e in T.unroll(pieces):
                for v in T.vectorized(4):
                    pf[4 * e + v] = Kte[src_at(q, e, tx, bx, v)]

    @T.macro
    def copy(X, W, Kte, q, bx, tx):
        """cp.async of the thread's pieces of half q into its slot (global -> shared, no registers)."""
        if q // 2 % 2 == 0:
            for e in T.unroll(pieces):
                T.ptx.cp.async_.cg.shared.global_(shared_address(X, dst_at(q, 0, e, tx), staged),
                                                  T.address_of(W[src_at(q, e, tx, bx)]), 16)
        else:
            for e in T.unroll(pieces):
                T.ptx.cp.async_.cg.shared.global_(shared_address(X, dst_at(q, 1, e, tx), staged),
                                                  T.address_of(Kte[src_at(q, e, tx, bx)]), 16)

    # Half q is used between arrive(q) and arrive(q + 1). Each arrive holds the block's one barrier of its
    # half, after which (RAW) every thread's part of half q is in its slot, and (WAR) every thread has
    # finished with half q - 1 (its products came before the barrier), so that its slot may be refilled.
    @T.macro
    def start_registers(X, pf, W, Kte, bx, tx):
        fetch(pf, W, Kte, 0, bx, tx)

    @T.macro
    def arrive_registers(X, pf, W, Kte, q, p, bx, tx):
        # WAR: slot q % 2 last held half q - 2, whose reads every thread finished before arrive(q - 1)'s barrier
        for e in T.unroll(pieces):
            T.ptx.st.shared.v4.f32(shared_address(X, dst_at(q, p, e, tx), dtype),
                                   pf[4 * e], pf[4 * e + 1], pf[4 * e + 2], pf[4 * e + 3])
        T.tvm_storage_sync("shared")   # RAW: half q whole in its slot
        if q + 1 < total:
            fetch(pf, W, Kte, q + 1, bx, tx)

    @T.macro
    def start_async(X, pf, W, Kte, bx, tx):
        for q in T.unroll(slots - 1):      # halves 0 .. slots - 2 in flight, a commit group each
            copy(X, W, Kte, q, bx, tx)
            T.ptx.cp.async_.commit_group()

    @T.macro
    def arrive_async(X, pf, W, Kte, q, p, bx, tx):
        # groups committed so far: slots - 1 + q, the last for half q + slots - 2; leaving slots - 2 of
        # them pending completes this thread's copies of half q
        T.ptx.cp.async_.wait_group(slots - 2)
        T.tvm_storage_sync("shared")   # RAW: every thread's copies of half q landed; WAR: half q - 1 done
        if q + slots - 1 < total:      # into slot (q - 1) % slots, free since the barrier
            copy(X, W, Kte, q + slots - 1, bx, tx)
        T.ptx.cp.async_.commit_group()   # empty past the end: keeps one group a half for the count

    start, arrive = (start_registers, arrive_registers) if prefetch == "registers" else (start_async, arrive_async)

    def at(lane, i, j):                 # accumulator element i of tile j: (row in the warp's 16, column)
        return mma.d_at(lane, i)[0], j * mma.N + mma.d_at(lane, i)[1]

    @T.macro
    def body(S0, W, U, Kte, LD, S1, St, Vn):
        T.reads()                              # the tensor-core calls read registers TVM cannot see
        T.writes()
        for bx in T.thread_binding(heads * tiles, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                # all dynamic: over 48 KiB together, and a launch may hold more than that only in dynamic
                # shared memory (TVM raises the limit to the dynamic size, whatever the static one)
                S = T.alloc_buffer((K * ps,), dtype, scope="shared.dyn")
                N = T.alloc_buffer((C * ps,), dtype, scope="shared.dyn")
                X = T.alloc_buffer((slots * slot,), staged, scope="shared.dyn")
                acc = T.alloc_local((4 * nt * chains,), dtype)
                fa = T.alloc_local((8,), fragment)
                fb = T.alloc_local((4,), fragment)
                pf = T.alloc_local((4 * pieces,), dtype)       # "registers": the next half's pieces
                pu = T.alloc_local((4 * nt,), dtype)           # the warp's tile of u[n], loaded early
                pl = T.alloc_local((4,), dtype)                # last_decay[n] of the lane's four state rows
                w, lane = tx // 32, tx % 32
                start(X, pf, W, Kte, bx, tx)
                for e in T.unroll(K * vt // threads):
                    S[(e * threads + tx) // vt * ps + (e * threads + tx) % vt] = S0[head(bx) + (
                        (e * threads + tx) // vt, col0(bx) + (e * threads + tx) % vt)]
                # (S is first read after arrive(0)'s barrier)
                for n in range(steps):
                    for j in T.unroll(nt):
                        for i in T.unroll(4):
                            pu[4 * j + i] = converted(U[(n,) + head(bx) + (w * mma.M + at(lane, i, j)[0],
                                                                           col0(bx) + at(lane, i, j)[1])], U.dtype, dtype)
                    for h2 in T.unroll(2):         # rows h2 half + 16 w + g + 8 r
                        for r in T.unroll(2):
                            pl[2 * h2 + r] = LD[(n,) + head(bx) + (
                                (h2 * half + w * mma.M + mma.d_at(lane, 2 * r)[0]) * per_key, 0)]
                    # v_new = u - w S; S's last writes (step n - 1's, in half 4 n - 1) came before arrive(4 n)
                    clear_chains(acc, 0)
                    for h in range(2):
                        arrive(X, pf, W, Kte, 4 * n + h, 0, bx, tx)
                        vnew_products(X, (4 * n + h) % slots * slot, S, acc, fa, fb, h, w, lane)
                    add_chains(acc)
                    # N: step n - 1 read it in halves 4 n - 2 and 4 n - 1, before arrive(4 n)'s barrier.
                    # Vn from registers, not read back from N
                    for j in T.unroll(nt):
                        for i in T.unroll(4):
                            acc[4 * j + i] = pu[4 * j + i] - acc[4 * j + i]
                            Vn[(n,) + head(bx) + (w * mma.M + at(lane, i, j)[0], col0(bx) + at(lane, i, j)[1])] = \
                                narrowed(acc[4 * j + i])
                        for r in T.unroll(2):       # elements 2 r, 2 r + 1: two adjacent columns
                            T.ptx.st.shared.v2.f32(shared_address(
                                N, (w * mma.M + at(lane, 2 * r, j)[0]) * ps + at(lane, 2 * r, j)[1], dtype),
                                acc[4 * j + 2 * r], acc[4 * j + 2 * r + 1])
                    # starts[n] = S: S unchanged since arrive(4 n)'s barrier, and until arrive(4 n + 2)'s
                    for e in T.unroll(K * vt // threads):
                        St[(n,) + head(bx) + ((e * threads + tx) // vt, col0(bx) + (e * threads + tx) % vt)] = narrowed(
                            S[(e * threads + tx) // vt * ps + (e * threads + tx) % vt])
                    # S = S last_decay + k_to_end^T v_new, per half of the state's rows. arrive(4 n + 2)'s
                    # barrier orders v_new's writes before its reads, and every other lane's reads of S in
                    # this step (the products of v_new, starts) before the writes of S
                    for h in range(2):
                        arrive(X, pf, W, Kte, 4 * n + 2 + h, 1, bx, tx)
                        for j in T.unroll(nt):
                            for i in T.unroll(4):
                                acc[4 * j + i] = S[(h * half + w * mma.M + at(lane, i, j)[0]) * ps
                                                   + at(lane, i, j)[1]] * T.Select(h == 0, pl[i // 2], pl[2 + i // 2])
                        clear_chains(acc, 1)
                        update_products(X, (4 * n + 2 + h) % slots * slot, N, acc, fa, fb, w, lane)
                        add_chains(acc)
                        for j in T.unroll(nt):      # each lane writes back only what it read: no barrier
                            for r in T.unroll(2):   # elements 2 r, 2 r + 1: two adjacent columns
                                T.ptx.st.shared.v2.f32(shared_address(
                                    S, (h * half + w * mma.M + at(lane, 2 * r, j)[0]) * ps + at(lane, 2 * r, j)[1],
                                    dtype), acc[4 * j + 2 * r], acc[4 * j + 2 * r + 1])
                # no copy is pending: arrive(total - 1) waited for the last one, the later groups are empty
                T.tvm_storage_sync("shared")      # the last step's writes of S, by every warp
                for e in T.unroll(K * vt // threads):
                    S1[head(bx) + ((e * threads + tx) // vt, col0(bx) + (e * threads + tx) % vt)] = S[
                        (e * threads + tx) // vt * ps + (e * threads + tx) % vt]
    return chunk_states_function(steps, batch, C, K, V, Kg, dtype, body, stored, narrow)
