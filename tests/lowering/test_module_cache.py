"""The module cache: one key per (layer, optimisation level, target, arch, code), found again by a
process that rebuilds the same layer, and a clear error where a runtime-only machine lacks a module."""
import pytest

from dnir.api import compiled_graph
from dnir.errors import BackendError, DnirError
from dnir.lowering import module_cache, runtime_loader
from dnir.models import DeltaNetConfig


def _config(**overrides):
    options = dict(batch=2, seq_len=1, heads=2, value_heads=4, head_dim=16, value_dim=16, mode="decode",
                   initial_state=True, final_state=True)
    return DeltaNetConfig(overrides.pop("variant", "gdn"), **{**options, **overrides})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DNIR_CACHE", str(tmp_path))
    return tmp_path / "tvm"


def test_key_follows_layer_level_target_and_arch(cache):
    base = module_cache.module_path(compiled_graph(_config(), "O2"), "cuda sm_90")
    assert base.parent == cache and base.suffix == ".so"
    # a layer built again (another process would) has the same key: its graph prints the same
    again = compiled_graph.__wrapped__(_config(), "O2")
    assert module_cache.module_path(again, "cuda sm_90") == base
    others = [module_cache.module_path(compiled_graph(_config(batch=3), "O2"), "cuda sm_90"),
              module_cache.module_path(compiled_graph(_config(variant="kda"), "O2"), "cuda sm_90"),
              module_cache.module_path(compiled_graph(_config(dtype="bf16"), "O2"), "cuda sm_90"),
              module_cache.module_path(compiled_graph(_config(precision="tf32"), "O2"), "cuda sm_90"),
              module_cache.module_path(compiled_graph(_config(), "O0"), "cuda sm_90"),
              module_cache.module_path(compiled_graph(_config(), "O2"), "cuda sm_80"),
              module_cache.module_path(compiled_graph(_config(), "O2"), "llvm")]
    assert len({base, *others}) == 1 + len(others)


def test_key_changes_with_the_code_and_tvm(cache, monkeypatch):
    graph = compiled_graph(_config(), "O2")
    base = module_cache.module_path(graph, "cuda sm_90")
    monkeypatch.setattr(module_cache, "code_hash", lambda: "other kernels")
    assert module_cache.module_path(graph, "cuda sm_90") != base
    monkeypatch.undo()
    monkeypatch.setenv("DNIR_CACHE", str(cache.parent))
    monkeypatch.setattr(module_cache, "tvm_version", lambda: "0.0")
    assert module_cache.module_path(graph, "cuda sm_90") != base


def test_fatbins_are_kept_by_source_and_arch(cache):
    a = module_cache.fatbin_path("__global__ void f() {}", "sm_90")
    assert a.parent == cache / "cuda"
    assert a == module_cache.fatbin_path("__global__ void f() {}", "sm_90")
    assert a != module_cache.fatbin_path("__global__ void f() {}", "sm_80")
    assert a != module_cache.fatbin_path("__global__ void g() {}", "sm_90")


def test_layer_key_follows_the_layers_options_not_a_graph(cache):
    base = module_cache.layer_path(_config(), "O2", "cuda sm_90")
    assert base.parent == cache / "layers" and base == module_cache.layer_path(_config(), "O2", "cuda sm_90")
    others = [module_cache.layer_path(_config(batch=3), "O2", "cuda sm_90"),
              module_cache.layer_path(_config(dtype="bf16"), "O2", "cuda sm_90"),
              module_cache.layer_path(_config(precision="tf32"), "O2", "cuda sm_90"),
              module_cache.layer_path(_config(), "O0", "cuda sm_90"),
              module_cache.layer_path(_config(), "O2", "cuda sm_80")]
    assert len({base, *others}) == 1 + len(others)


def test_runtime_only_machine_names_the_missing_module(cache, monkeypatch):
    monkeypatch.setattr(runtime_loader, "compiler_available", lambda: False)
    graph = compiled_graph(_config(), "O2")
    with pytest.raises(BackendError, match=r"no compiled CUDA module for this graph \(sm_90\) in .*tvm, and "
                                           r"TVM's compiler is not installed here") as e:
        runtime_loader.cuda_vm(graph, "sm_90")
    assert isinstance(e.value, DnirError) and "dnir compile" in str(e.value) and "DNIR_CACHE" in str(e.value)
    built = []
    with pytest.raises(BackendError, match=r"no compiled CUDA module for the layer DeltaNetConfig\(variant='gdn'"):
        runtime_loader.cuda_layer(_config(), "O2", lambda: built.append(1))
    assert not built and not cache.exists()       # no graph built, nothing compiled or loaded


def test_prebuild_exports_the_module_its_interface_and_fatbin(cache):
    """What a machine with TVM's compiler (and nvcc) puts into the cache for a GPU server."""
    import json
    import shutil
    cfg = _config(dtype="bf16")
    graph = compiled_graph(cfg, "O2", "cuda")
    path = runtime_loader.prebuild_layer(cfg, "O2", graph, "sm_90")
    assert path == module_cache.layer_path(cfg, "O2", "cuda sm_90") and path.stat().st_size > 0
    interface = json.loads(path.with_suffix(".json").read_text())
    assert interface == {"input_names": list(graph.input_names), "output_names": list(graph.output_names),
                         "input_dtypes": [t.dtype for t in graph.input_types]}
    assert "bf16" in interface["input_dtypes"] and "f32" in interface["input_dtypes"]
    assert runtime_loader.prebuild_layer(cfg, "O2", None, "sm_90") == path       # found, not compiled again
    if shutil.which("nvcc"):
        assert [p.suffix for p in (cache / "cuda").iterdir()] == [".fatbin"]


def test_dnir_compile_fills_the_cache_where_the_api_looks(cache, tmp_path, capsys):
    """The command-line route (build, compile --cache) lands on the functional API's key."""
    from dnir.cli import main
    layer = tmp_path / "d.dnir"
    assert main(["build", "gdn", "--mode", "decode", "--batch", "2", "--seq-len", "1", "--heads", "2",
                 "--value-heads", "4", "--head-dim", "16", "--value-dim", "16", "--initial-state", "--final-state",
                 "-o", str(layer)]) == 0
    assert main(["compile", str(layer), "--target", "cuda", "--cache", "--opt", "O2"]) == 0
    expected = module_cache.layer_path(_config(), "O2", "cuda sm_90")
    assert str(expected) in capsys.readouterr().out and expected.exists()
