"""The mock upstream: a fake OpenAI/Anthropic/Azure server for development, tests
and benchmarks. Only ``llm-broker mock-upstream`` and ``llm-broker dev`` import it;
the production roles never do."""
