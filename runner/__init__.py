"""The jaxlora application: the `runner` command, the recipe schema, the
pipeline wiring the five steps, and the reports."""
