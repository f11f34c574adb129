"""Mutated `.dnir` text never escapes as anything but a DnirError.

Real graphs (delta-net layers in every mode, before and after O2, one as a GPU
target runs it with a fused op, and a scan)
are printed, then tokens are replaced, deleted, repeated or swapped. Every
outcome is either a graph that verifies (and prints back to the same text) or
a DnirError; any other exception is a bug in the parser or in an op's checks.
"""
import re
from functools import lru_cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dnir
from dnir import DnirError
from dnir.lowering import registry
from dnir.models import DeltaNetConfig, build_delta_net
from dnir.passes import optimize

# Bounded in time: a few seconds for the whole file on one core.
bounded = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

_TOKEN = re.compile(r'\s+|%[A-Za-z0-9_]+|-?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|[A-Za-z_]\w*|"(?:[^"\\]|\\.)*"|.')

# Tokens a mutation inserts besides the graph's own: sizes nobody means, numbers at
# the edges of the formats, broken strings, brackets, other dtypes and ops.
ODD = ["0", "-1", "1", "2", "63", "64", "-64", "1099511627777", "99999999999999999999",
       "9223372036854775808", "1" * 5000, "1e999", "-inf", "nan", "0.5", "-0.0", '"\\q"', '"\\ud800"', '""',
       "[", "]", "{", "}", "(", ")", ",", ":", "=", "%0", "%999", "%q", "f16", "bf16", "i32", "bool", "f64",
       "true", "false", "body", "meta", "scan", "item", "slice", "reshape", "set", "acc", "matmul", "cumsum",
       "full", "const", "cast", "pad", "solve_tri", "broadcast_to", "concat", "as", "return", "graph"]


_NUMBER = re.compile(r"-?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?")
ODD_NUMBERS = [t for t in ODD if _NUMBER.fullmatch(t)]


def _body_scan() -> dnir.Graph:
    bb = dnir.Builder()
    c, x = bb.input("c", (2, 3)), bb.input("x", (3,))
    body = bb.build([c * bb.exp(x), bb.sum(c, axis=0)])
    b = dnir.Builder()
    c0, xs = b.input("c0", (2, 3)), b.input("xs", (5, 3))
    return b.build(b.scan(body, [c0], [xs]), names=["final", "sums"])


@lru_cache(maxsize=None)
def corpus() -> tuple[str, ...]:
    small = dict(heads=1, value_heads=2, head_dim=4, value_dim=4, seq_len=20, chunk_size=16)
    graphs = [_body_scan()]
    for variant in ("gdn", "kda"):
        graphs.append(build_delta_net(DeltaNetConfig(variant, **small, block_size=8, initial_state=True)))
        graphs.append(build_delta_net(DeltaNetConfig(variant, **small, mode="recurrent", final_state=True)))
    graphs.append(optimize(graphs[1], "O2"))
    graphs.append(build_delta_net(DeltaNetConfig("kda", **{**small, "seq_len": 1}, mode="decode")))
    # as a GPU target runs it: the loop over chunks as one fused chunk_scan op
    fusable = DeltaNetConfig("gdn", **{**small, "head_dim": 16, "value_dim": 16, "seq_len": 40})
    graphs.append(registry.prepare(optimize(build_delta_net(fusable), "O2"), "cuda"))
    return tuple(dnir.print(g) for g in graphs)


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


@st.composite
def mutated(draw) -> str:
    toks = tokens(draw(st.sampled_from(corpus())))
    own = st.sampled_from(sorted(set(t for t in toks if not t.isspace())))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(toks) - 1))
        kind = draw(st.sampled_from(["number", "replace", "delete", "repeat", "swap"]))
        numbers = [n for n, t in enumerate(toks) if _NUMBER.fullmatch(t)]
        if kind == "number" and numbers:       # sizes, axes, offsets: where most checks are
            toks[draw(st.sampled_from(numbers))] = draw(st.one_of(st.sampled_from(ODD_NUMBERS),
                                                                  st.integers(-70, 70).map(str)))
        elif kind == "replace":
            toks[i] = draw(st.one_of(st.sampled_from(ODD), own))
        elif kind == "delete":
            del toks[i:i + draw(st.integers(1, 8))]
        elif kind == "repeat":
            toks[i:i] = toks[i:i + draw(st.integers(1, 8))]
        else:
            j = draw(st.integers(0, len(toks) - 1))
            toks[i], toks[j] = toks[j], toks[i]
        if not toks:
            toks = [draw(st.sampled_from(ODD))]
    return "".join(toks)


def test_the_corpus_parses_back():
    for text in corpus():
        assert dnir.print(dnir.verify(dnir.parse(text))) == text


@bounded
@given(mutated())
def test_mutated_text_verifies_or_raises_a_dnir_error(text):
    try:
        graph = dnir.verify(dnir.parse(text, "fuzz.dnir"))
    except DnirError:
        return
    printed = dnir.print(graph)
    assert dnir.print(dnir.verify(dnir.parse(printed))) == printed
