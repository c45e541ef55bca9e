"""Long-context experiment (dense vs window vs sinks, 0.5x-8x the training context): thin wrapper over
``modern_llm.evaluation.long_context.main``.

Examples:
  python scripts/long_context.py --config configs/long_context/embedded-cpu.yaml
  python scripts/long_context.py --config configs/long_context/embedded-cpu.yaml \
      --no_sink_run runs/long_context/embedded/no_sink --learned_sink_run runs/long_context/embedded/learned_sink
"""

from modern_llm.evaluation.long_context import main

if __name__ == "__main__":
    raise SystemExit(main())
