"""The pass manager's record of which pass first made each node (a side table, read by the ggml C
export's comments)."""
import dnir
from dnir.passes import run_pipeline
from dnir.passes.manager import made_by


def _all(graph):
    for node in graph.topo_order():
        yield node
        if node.op == "scan":
            yield from _all(node.attrs["body"])


def test_a_node_a_pass_made_names_the_pass_and_a_rebuilt_reader_keeps_its_maker():
    b = dnir.Builder()
    x = b.input("x", (4, 8))
    y = b.input("y", (4, 8))
    graph = b.build(b.exp(b.add(b.mul(x, b.full((4, 8), 1.0)), y)), names=["z"])
    new, _ = run_pipeline(graph, ["remove_identities"])      # x * 1 -> x: the add is rebuilt on x
    add, = [n for n in new.topo_order() if n.op == "add"]
    assert add not in set(graph.topo_order()) and made_by(add) is None
    assert made_by(new.outputs[0]) is None


def test_block_tril_makes_the_blocks_of_the_scores():
    from dnir.models import build
    graph = build("gdn", mode="chunked", seq_len=128, heads=2, head_dim=16, value_dim=16)
    new, _ = run_pipeline(graph, "O2")
    makers = {made_by(n) for n in _all(new)}
    assert None in makers and "block_tril" in makers and "input" not in makers
    assert all(made_by(n) is None for n in new.inputs)
