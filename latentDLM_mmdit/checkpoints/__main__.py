"""`python -m latentDLM_mmdit.checkpoints inspect IN` / `convert IN OUT.safetensors`."""

from latentDLM_mmdit.checkpoints.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
