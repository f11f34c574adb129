"""The pass context: entered with `with`, nested, one stack per thread, remarks kept once."""
import threading

from dnir.passes.context import PassContext, Target, any_node, current


def test_contexts_nest_and_are_left_again():
    assert current().target is None
    with PassContext(Target("outer")) as outer:
        with PassContext(Target("inner", shared_bytes=1024)):
            assert current().target.name == "inner" and current().target.shared_bytes == 1024
        assert current() is outer
    assert current().target is None


def test_each_thread_reads_its_own_context():
    seen, entered = {}, threading.Barrier(3)

    def prepare(name):
        with PassContext(Target(name)):
            entered.wait()              # all three inside their contexts at once
            seen[name] = current().target.name
    threads = [threading.Thread(target=prepare, args=(name,)) for name in ("cuda", "vulkan", "llvm")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"cuda": "cuda", "vulkan": "vulkan", "llvm": "llvm"}


def test_a_target_says_why_it_has_no_kernel_and_remarks_are_kept_once():
    from dnir import fused
    from dnir.builder import Builder
    b = Builder()
    shapes = [(2, 4, 4), (2, 1, 1), (2, 4, 1), (2, 1, 4), (2, 4), (2, 4), (2, 1), (2,)]
    node = fused.token_step(*[b.input(f"x{i}", s) for i, s in enumerate(shapes)])[0].inputs[0]
    assert Target("t", {"token_step": any_node}).rejects(node) is None
    assert Target("t").rejects(node) == "target 't' has no token_step kernel"
    ctx = PassContext()
    for _ in range(2):
        ctx.remark("p", "seen")
    assert ctx.remarks == [("p", "seen")]
