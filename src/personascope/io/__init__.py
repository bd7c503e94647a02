"""The edges: files written atomically, run directories, chat datasets, layer choices, progress display."""
