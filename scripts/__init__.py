"""Command-line entry points of shoal: argument parsing over the package APIs."""
