"""Built-in agents: `echo`, and `chaos`, the fault injector."""
