"""ggml (the tensor library under llama.cpp) as a backend and as the CPU benchmark's peer.

`build.ggml_build()` returns this machine's shared-library build of ggml 0.25.3,
building it on first use.
"""
