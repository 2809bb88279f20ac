# one part of the Qwen2.5-Coder-0.5B GGUF carried to a warm machine (.dev/q/qwen05.gguf.partNN, 50 MB each); the
# parts already there stay (ignored paths are kept while the machine is warm)
ls -la .dev/q/ 2>&1 | tail -12
