"""Loading: source files (YAML with line numbers), schemas, config with its defaults,
the catalog compiled into core objects, and the bundle that carries both with their
revisions. Everything here runs at load and reload time, never per request."""
